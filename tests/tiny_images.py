"""Small generated image datasets written in the real input formats (gzipped IDX files, .npz), for tests.

Each class is a stroke (horizontal, vertical, diagonal, ...) drawn at a random strength over noise,
and a share of labels is flipped, so that exits are unsure on faint images and confidences spread.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

SIZE = 12


def templates(size: int = SIZE) -> np.ndarray:
    """[4, size, size] strokes in 0..1: horizontal bar, vertical bar, diagonal, a ring."""
    grid = np.indices((size, size))
    middle = size // 2
    horizontal = (np.abs(grid[0] - middle) <= 1).astype(float)
    vertical = (np.abs(grid[1] - middle) <= 1).astype(float)
    diagonal = (np.abs(grid[0] - grid[1]) <= 1).astype(float)
    radius = np.hypot(grid[0] - middle + 0.5, grid[1] - middle + 0.5)
    ring = (np.abs(radius - size / 3) <= 1).astype(float)
    return np.stack([horizontal, vertical, diagonal, ring])


def generate(n: int, num_classes: int, rng: np.random.Generator, label_noise: float = 0.1
             ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, SIZE, SIZE] and int labels [n]."""
    labels = rng.integers(0, num_classes, size=n)
    strength = rng.uniform(0.15, 1.0, size=(n, 1, 1))
    images = templates()[labels] * strength * 200 + rng.normal(40, 30, size=(n, SIZE, SIZE))
    flip = rng.random(n) < label_noise
    labels[flip] = (labels[flip] + rng.integers(1, num_classes, size=int(flip.sum()))) % num_classes
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An unsigned-byte IDX file, gzipped (the format Fashion-MNIST ships in)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return path


def make_idx_dataset(folder: Path, num_classes: int = 3, train: int = 1200, test: int = 300, seed: int = 0) -> Path:
    """train-/t10k- images and labels as gzipped IDX files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        images, labels = generate(n, num_classes, rng)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def make_npz_dataset(folder: Path, num_classes: int = 3, train: int = 300, test: int = 100, seed: int = 1,
                     channels: int = 1) -> Path:
    """train.npz and test.npz (images [N, C, H, W] uint8, labels, label_names in train.npz)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = np.array([f"class{i}" for i in range(num_classes)])
    for name, n in (("train", train), ("test", test)):
        images, labels = generate(n, num_classes, rng)
        images = np.repeat(images[:, None], channels, axis=1)
        extra = {"label_names": names} if name == "train" else {}
        np.savez(folder / f"{name}.npz", images=images, labels=labels, **extra)
    return folder
