"""Shared fixtures: a tiny built model (real builder, real ONNX export), built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.client import TierClient
from shared.tools.processes import TierCluster, running_tiers
from tests.tiny_model import make_checkpoint, make_dataset

TINY_LABELS = ["negative", "positive"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_data: Path) -> Path:
    """A small built model: manifest.json, mobile/edge/cloud.onnx, tokenizer.json, report.json."""
    from shared.builder.build import BuildConfig, build

    config = BuildConfig(backbone=str(tiny_checkpoint), data=str(tiny_data), profile="tiny",
                         split_points=(1, 2, 3), label_names=TINY_LABELS, max_length=32, policy="p_tar",
                         p_tar=(0.8, 0.8))
    return build(config, tmp_path_factory.mktemp("tiny_build") / "model")


@pytest.fixture(scope="session")
def tiny_image_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated 12x12 images of 3 classes as gzipped IDX files (the Fashion-MNIST format)."""
    from tests.tiny_images import make_idx_dataset

    return make_idx_dataset(tmp_path_factory.mktemp("tiny_image_data"))


@pytest.fixture(scope="session")
def tiny_cnn_artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_image_data: Path) -> Path:
    """A small built early-exit CNN (image family): manifest.json, mobile/edge/cloud.onnx, report.json."""
    from shared.builder.build import BuildConfig, build

    config = BuildConfig(family="image", data=str(tiny_image_data), profile="tiny", split_points=(1, 2, 3),
                         policy="p_tar", p_tar=(0.9, 0.9))
    return build(config, tmp_path_factory.mktemp("tiny_cnn_build") / "model")


@pytest.fixture(scope="module")
def cluster(tiny_artifacts: Path) -> Iterator[TierCluster]:
    """The three tiers on the tiny model, one set per test module (modules override it as needed)."""
    with running_tiers(tiny_artifacts) as started:
        yield started


@pytest.fixture(scope="module")
def client(cluster: TierCluster) -> Iterator[TierClient]:
    """A blocking client of the module's cluster."""
    with TierClient(cluster.entry_address, timeout=30) as started:
        yield started
