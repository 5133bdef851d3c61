"""What a model family (text, image) hands to the shared part of a build.

A family loads its data, builds and trains its early-exit model and computes the raw logits of
every exit on the calibration and test splits. build() then does what all families share:
calibration, thresholds, manifest, report and the atomic folder replace, calling `export` to write
the slices (and any preprocessing files) into the staging folder and check the ONNX chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.contract.manifest import SliceSpec

# export(staging folder) -> (slice specs, max |logit difference| of the chain check,
#                            the manifest's family-specific fields: family, max_length, input_shape, ...)
Exporter = Callable[[Path], tuple[list[SliceSpec], float, dict[str, Any]]]


@dataclass
class TrainedModel:
    label_names: list[str]
    split_points: tuple[int, int, int]
    hidden_size: int  # text: hidden size; image: channels of the tensor the mobile slice forwards
    backbone: str  # provenance: the checkpoint, or a description of the CNN
    data_source: str
    test_source: str
    calib_logits: list[np.ndarray]  # raw logits per exit, [N, K] each
    calib_labels: np.ndarray
    test_logits: list[np.ndarray]
    test_labels: np.ndarray
    train_samples: int
    training: dict[str, float]
    export: Exporter
    # how the splits were made, for the report and the summary (e.g. "news.csv (90% of its 6000 rows, seeded)")
    train_description: str = ""
    test_description: str = ""
    data_labels: list[str] | None = None  # the labels as the data spells them, in class order (--labels 1=World)
    # --holdout-samples: rows of train neither trained nor calibrated on (texts..., label name) and their logits
    holdout_rows: list[list[str]] | None = None
    holdout_logits: list[np.ndarray] | None = None
    holdout_labels: np.ndarray | None = None
