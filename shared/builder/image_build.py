"""The image family's part of a build: image data -> early-exit CNN -> training -> exit logits.

The calibration split is held out of the train split at random; the test split is the data's
own (Fashion-MNIST: t10k). Everything after the logits is shared with text (shared.builder.build).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.builder.config import BuildConfig
from shared.builder.family import TrainedModel
from shared.builder.train import Batch, TrainSettings, train_loop
from shared.builder.vision import EarlyExitCNN, check_cnn_chain, export_cnn_slices, predict_image_logits
from shared.contract.images import PIXEL_MAX
from shared.contract.manifest import SliceSpec
from shared.data.images import ImageDataset, hold_out, load_image_splits
from shared.errors import BuildInputError

DEFAULT_BLOCK_SPLIT = (2, 4, 6)
CHAIN_CHECK_IMAGES = 96


@dataclass(frozen=True)
class ImageProfile:
    train_samples: int | None  # None: all that is left after the calibration split
    calibration_samples: int
    epochs: float
    batch_size: int
    learning_rate: float
    width: int  # channels of the first blocks (x2, x4 deeper)
    threads: int | None = None  # torch threads; None: build()'s choice. Small CNNs gain little from more,
    # and lose a lot when other processes load the cores (OpenMP threads then wait on each other).


IMAGE_PROFILES: dict[str, ImageProfile] = {
    # quick: the default Fashion-MNIST model, a few minutes on 2 cores
    "quick": ImageProfile(None, 5000, 3.0, 128, 3e-3, 32),
    "full": ImageProfile(None, 5000, 12.0, 128, 2e-3, 48),
    # tiny: tests, on small generated images
    "tiny": ImageProfile(None, 200, 4.0, 32, 1e-2, 8, threads=1),
}


def image_split_points(points: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """Block indices after which the mobile, edge, cloud exits sit; the last is the CNN's depth."""
    if points is None:
        return DEFAULT_BLOCK_SPLIT
    if not 1 <= points[0] < points[1] < points[2]:
        raise BuildInputError(f"split points {points} must be strictly increasing block indices, starting at >= 1")
    return points


def train_image_model(config: BuildConfig) -> TrainedModel:
    if config.backbone is not None:
        raise BuildInputError("--backbone applies to the text family; the image family trains its own CNN")
    profile = IMAGE_PROFILES[config.profile]
    if profile.threads is not None:
        torch.set_num_threads(profile.threads)
    train_set, test_set = load_image_splits(config.data)
    ids = [str(i) for i in range(len(train_set.label_names))]
    if config.label_names is not None and train_set.label_names != ids and config.label_names != train_set.label_names:
        raise BuildInputError(  # never renamed by position: the data names its own classes
            f"--labels {','.join(config.label_names)} does not match the class names in {train_set.source}: "
            f"{train_set.label_names}; omit --labels to use them")
    label_names = config.label_names or train_set.label_names
    if len(label_names) != len(train_set.label_names):
        raise BuildInputError(f"--labels names {len(label_names)} classes, the data has {len(train_set.label_names)}")
    fit_set, calib_set = hold_out(train_set, config.calibration_samples or profile.calibration_samples, config.seed)
    n_train = config.train_samples or profile.train_samples
    if n_train is not None and n_train < len(fit_set):
        fit_set = fit_set.subset(np.random.default_rng(config.seed + 1).permutation(len(fit_set))[:n_train])
    input_shape: tuple[int, int, int] = tuple(train_set.images.shape[1:])  # type: ignore[assignment]
    print(f"data: {len(fit_set)} train, {len(calib_set)} calibration (held out of train), {len(test_set)} test "
          f"({test_set.source}); {len(label_names)} classes, images {list(input_shape)}")

    points = image_split_points(config.split_points)
    scaled = fit_set.images.astype(np.float32) / PIXEL_MAX
    model = EarlyExitCNN(input_shape, points, len(label_names), profile.width,
                         pixel_mean=float(scaled.mean()), pixel_std=float(scaled.std()) or 1.0)
    settings = TrainSettings(epochs=config.epochs or profile.epochs, batch_size=profile.batch_size,
                             learning_rate=profile.learning_rate, head_learning_rate=profile.learning_rate,
                             freeze_encoder=config.freeze_encoder, seed=config.seed,
                             distillation_weight=config.distillation_weight or 0.0)
    training = train_loop(model, _epoch(fit_set, settings.batch_size), len(fit_set), settings)
    sample = test_set.images[np.random.default_rng(config.seed).permutation(len(test_set))[:CHAIN_CHECK_IMAGES]]

    def export(folder: Path) -> tuple[list[SliceSpec], float, dict[str, Any]]:
        specs = export_cnn_slices(model, folder)
        return specs, check_cnn_chain(model, folder, sample), {"family": "image", "input_shape": list(input_shape)}

    return TrainedModel(
        label_names=label_names, split_points=points, hidden_size=model.forwarded_channels(),
        backbone=f"tierserve-cnn: {points[-1]} separable blocks, width {profile.width}",
        data_source=train_set.source, test_source=test_set.source,
        calib_logits=predict_image_logits(model, calib_set.images), calib_labels=calib_set.labels,
        test_logits=predict_image_logits(model, test_set.images), test_labels=test_set.labels,
        train_samples=len(fit_set), training=training, export=export)


def _epoch(data: ImageDataset, batch_size: int) -> Callable[[np.random.Generator], Iterator[Batch]]:
    """train_loop's epoch: shuffled batches of pixels (0..255 floats) and labels."""

    def batches(rng: np.random.Generator) -> Iterator[Batch]:
        order = rng.permutation(len(data))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            pixels = torch.from_numpy(data.images[index].astype(np.float32))
            yield (pixels,), torch.from_numpy(data.labels[index])

    return batches
