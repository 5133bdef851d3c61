"""Labeled image data (IDX files or .npz) for the builder, the demo and bench/; numpy only.

Accepted data:
- a folder of IDX files as Fashion-MNIST/MNIST ship them: train-images-idx3-ubyte, train-labels-idx1-ubyte,
  t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally gzipped (.gz);
- a folder with train.npz and test.npz, each holding `images` (uint8 [N, H, W] or [N, C, H, W]) and
  `labels` (integers 0..K-1), optionally `label_names` (K strings, in train.npz).
With no path, Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist) is used.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import BuildInputError

DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                        "sandal", "shirt", "sneaker", "bag", "ankle boot"]
IDX_SPLITS = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class ImageDataset:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 indices into label_names
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.label_names, self.source)


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array (gzipped or not), e.g. [N, 28, 28] images or [N] labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise BuildInputError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise BuildInputError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    if data[2] != _IDX_UBYTE:
        raise BuildInputError(f"{path}: IDX element type 0x{data[2]:02x} is not supported (only unsigned bytes)")
    rank = data[3]
    header = 4 + 4 * rank
    if rank == 0 or len(data) < header:
        raise BuildInputError(f"{path}: IDX header of rank {rank} is truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=rank, offset=4))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise BuildInputError(f"{path}: shape {list(shape)} needs {size} bytes of data, the file holds "
                              f"{len(data) - header}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise BuildInputError(f"{folder} has no {stem}[.gz]")


def _as_nchw(images: np.ndarray, source: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise BuildInputError(f"{source}: images must be uint8 (0..255), got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise BuildInputError(f"{source}: images must be [N, H, W] or [N, C, H, W], got {list(images.shape)}")
    return np.ascontiguousarray(images)


def _checked(images: np.ndarray, labels: np.ndarray, names: list[str] | None, source: str) -> ImageDataset:
    images = _as_nchw(images, source)
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
        raise BuildInputError(f"{source}: need one integer label per image: {len(images)} images, "
                              f"labels of shape {list(labels.shape)} and dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    count = int(labels.max()) + 1 if len(labels) else 0
    names = names or [str(i) for i in range(count)]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise BuildInputError(f"{source}: labels must lie in 0..{len(names) - 1}")
    return ImageDataset(images, labels, list(names), source)


def _read_npz(path: Path, names: list[str] | None) -> tuple[ImageDataset, list[str] | None]:
    if not path.is_file():
        raise BuildInputError(f"{path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            raise BuildInputError(f"{path} lacks arrays {sorted(missing)} (it has {data.files})")
        names = [str(x) for x in data["label_names"]] if "label_names" in data.files else names
        return _checked(data["images"], data["labels"], names, str(path)), names


def load_image_splits(path: str | Path | None = None) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) from an IDX folder or a folder with train.npz/test.npz; default Fashion-MNIST."""
    folder = Path(path) if path is not None else DEFAULT_FASHION_MNIST
    if not folder.is_dir():
        hint = " (install it: apt-get install dataset-fashion-mnist)" if path is None else ""
        raise BuildInputError(f"image dataset folder {folder} does not exist{hint}")
    if (folder / "train.npz").is_file():
        train, names = _read_npz(folder / "train.npz", None)
        test, _ = _read_npz(folder / "test.npz", names or train.label_names)
    else:
        names = FASHION_MNIST_LABELS if folder.resolve() == DEFAULT_FASHION_MNIST else None
        train, test = (
            _checked(read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte")),
                     read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte")), names, str(folder))
            for prefix in IDX_SPLITS.values())
        if names is None:
            test = ImageDataset(test.images, test.labels, train.label_names, test.source)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise BuildInputError(f"{folder}: train images are {list(train.images.shape[1:])}, "
                              f"test images {list(test.images.shape[1:])}")
    if len(train.label_names) < 2 or test.labels.max(initial=0) >= len(train.label_names):
        raise BuildInputError(f"{folder}: need at least two classes, and test labels among the train classes")
    return train, test


def hold_out(data: ImageDataset, n: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(fit, calibration): `n` random examples held out of `data` (at most a fifth)."""
    n = min(n, max(1, len(data) // 5))
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(order[n:]), data.subset(order[:n])
