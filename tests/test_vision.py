"""The image family: IDX/.npz data, a tiny early-exit CNN built by the real builder, and the three tiers
serving it. Every answer is checked against the in-process chained onnxruntime result of its image
and the offline tier rule (shared.contract.policy.route)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from shared.client import TierClient, health_status
from shared.contract.calibration import softmax
from shared.contract.images import PIXELS
from shared.contract.manifest import TIERS, Manifest, load_manifest
from shared.data.images import ImageDataset, load_image_splits, read_idx
from shared.errors import BuildInputError
from shared.tools.processes import TierCluster, running_tiers
from shared.wire.codec import to_tensor
from shared.wire.rpc import pb2, pb2_grpc
from tests.test_serving import check_against_reference, threshold_between
from tests.tiny_images import make_npz_dataset, write_idx

N_IMAGES = 24


def reference_probs(folder: Path, manifest: Manifest, images: np.ndarray) -> list[np.ndarray]:
    """Calibrated probabilities per exit ([N, K] each): every image alone through all three slices."""
    sessions = [ort.InferenceSession(str(folder / s.file), providers=["CPUExecutionProvider"])
                for s in manifest.slices]
    per_exit: list[list[np.ndarray]] = [[] for _ in TIERS]
    for image in images:
        feed = {PIXELS: image[None].astype(np.float32)}
        for i, (spec, session) in enumerate(zip(manifest.slices, sessions, strict=True)):
            outputs = dict(zip(spec.outputs, session.run(spec.outputs, feed), strict=True))
            per_exit[i].append(softmax(outputs["logits"], manifest.exits[i].temperature)[0])
            feed = {name: outputs[source] for name, source in spec.forwards.items()}
    return [np.stack(p) for p in per_exit]


@pytest.fixture(scope="module")
def manifest(tiny_cnn_artifacts: Path) -> Manifest:
    return load_manifest(tiny_cnn_artifacts)


@pytest.fixture(scope="module")
def test_images(tiny_image_data: Path) -> ImageDataset:
    return load_image_splits(tiny_image_data)[1].subset(np.arange(N_IMAGES))


@pytest.fixture(scope="module")
def reference(tiny_cnn_artifacts: Path, manifest: Manifest, test_images: ImageDataset) -> list[np.ndarray]:
    return reference_probs(tiny_cnn_artifacts, manifest, test_images.images)


@pytest.fixture(scope="module")
def cluster(tiny_cnn_artifacts: Path) -> Iterator[TierCluster]:
    with running_tiers(tiny_cnn_artifacts) as started:
        yield started


@pytest.fixture(scope="module")
def mobile_stub(cluster: TierCluster) -> Iterator[pb2_grpc.ClassifierStub]:
    with grpc.insecure_channel(cluster.entry_address) as channel:
        yield pb2_grpc.ClassifierStub(channel)


# --- data ---------------------------------------------------------------------------------------

def test_idx_files_round_trip_plain_and_gzipped(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    gz = write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    np.testing.assert_array_equal(read_idx(gz), images)
    plain = tmp_path / "x-idx3-ubyte"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    np.testing.assert_array_equal(read_idx(plain), images)


@pytest.mark.parametrize(("content", "message"), [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "bad magic number"),
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x05\x05\x05\x05", "element type 0x0d is not supported"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x02", "header of rank 2 is truncated"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x03\x05", "needs 3 bytes of data, the file holds 1"),
])
def test_bad_idx_files_are_named_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(BuildInputError, match=message):
        read_idx(path)


def test_npz_folders_load_with_channels_and_label_names(tmp_path: Path) -> None:
    train, test = load_image_splits(make_npz_dataset(tmp_path / "npz", channels=3))
    assert train.images.shape[1:] == (3, 12, 12) and train.images.dtype == np.uint8
    assert train.label_names == test.label_names == ["class0", "class1", "class2"]
    with pytest.raises(BuildInputError, match="does not exist"):
        load_image_splits(tmp_path / "missing")
    np.savez(tmp_path / "npz" / "test.npz", images=np.zeros((2, 12, 12), np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(BuildInputError, match="one integer label per image"):
        load_image_splits(tmp_path / "npz")


# --- build ----------------------------------------------------------------------------------------

def test_the_tiny_cnn_build_writes_an_image_manifest_and_report(
        tiny_cnn_artifacts: Path, manifest: Manifest) -> None:
    assert manifest.family == "image" and manifest.input_shape == [1, 12, 12]
    assert manifest.tokenizer_file is None and manifest.split_points() == (1, 2, 3)
    assert [(s.inputs, s.outputs, s.forwards) for s in manifest.slices] == [
        ([PIXELS], ["logits", "hidden_out"], {"hidden": "hidden_out"}),
        (["hidden"], ["logits", "hidden_out"], {"hidden": "hidden_out"}),
        (["hidden"], ["logits"], {}),
    ]
    report = json.loads((tiny_cnn_artifacts / "report.json").read_text())
    assert report["max_logit_difference"] <= 1e-4  # the chain check passed
    assert [e["tier"] for e in report["exits"]] == list(TIERS)
    for e in report["exits"]:
        assert {"accuracy", "ece_before", "ece_after", "temperature", "threshold", "exit_fraction"} <= set(e)
    assert report["exits"][-1]["accuracy"] > 0.6  # 3 classes: far above chance
    assert sum(e["exit_fraction"] for e in report["exits"]) == pytest.approx(1.0)
    assert 0 < report["relative_cost"] < 1.5
    written = {p.name for p in tiny_cnn_artifacts.iterdir()}
    assert {"reliability.png", "tradeoff.png", "calibration_logits.npz"} <= written


def test_a_three_channel_npz_dataset_builds(tmp_path: Path) -> None:
    from shared.builder.build import BuildConfig, build

    data = make_npz_dataset(tmp_path / "npz", channels=3)
    out = build(BuildConfig(family="image", data=str(data), profile="tiny", split_points=(1, 2, 4)),
                tmp_path / "model")
    manifest = load_manifest(out)
    assert manifest.input_shape == [3, 12, 12] and manifest.labels == ["class0", "class1", "class2"]
    assert manifest.num_layers == 4


# --- serving --------------------------------------------------------------------------------------

def test_a_mixed_image_batch_is_split_per_sample_and_merged_in_order(
        client: TierClient, test_images: ImageDataset, reference: list[np.ndarray], manifest: Manifest) -> None:
    tau_mobile = threshold_between(reference[0].max(-1))
    reaching_edge = reference[0].max(-1) < tau_mobile
    tau_edge = threshold_between(reference[1][reaching_edge].max(-1))
    thresholds = {"mobile": tau_mobile, "edge": tau_edge}
    answers = client.classify_images(test_images.images, thresholds)
    exit_index = check_against_reference(answers, reference, [tau_mobile, tau_edge], manifest)
    assert set(exit_index.tolist()) == {0, 1, 2}, "every tier answers part of the batch"
    # [N, H, W] float32 pixels are the same request
    again = client.classify_images(test_images.images[:, 0].astype(np.float32), thresholds)
    check_against_reference(again, reference, [tau_mobile, tau_edge], manifest)


@pytest.mark.parametrize(("tau", "tier"), [(0.0, "mobile"), (1.01, "cloud")])
def test_thresholds_zero_and_above_one(client: TierClient, test_images: ImageDataset, reference: list[np.ndarray],
                                       manifest: Manifest, tau: float, tier: str) -> None:
    answers = client.classify_images(test_images.images, {"mobile": tau, "edge": tau})
    assert {a.tier for a in answers} == {tier}
    check_against_reference(answers, reference, [tau, tau], manifest)


def test_manifest_thresholds_apply_without_overrides(
        client: TierClient, test_images: ImageDataset, reference: list[np.ndarray], manifest: Manifest) -> None:
    answers = client.classify_images(test_images.images)
    check_against_reference(answers, reference, [e.threshold for e in manifest.exits[:-1]], manifest)


def _wrong_size() -> pb2.Tensor:
    tensor = to_tensor(np.zeros((2, 1, 12, 12), np.uint8))
    tensor.data = tensor.data[:-1]
    return tensor


BAD_IMAGES = {  # case -> (request, expected message)
    "float64": (pb2.ClassifyRequest(images=to_tensor(np.zeros((2, 1, 12, 12)))), "dtype float64"),
    "int64": (pb2.ClassifyRequest(images=to_tensor(np.zeros((2, 1, 12, 12), np.int64))), "dtype int64"),
    "wrong height": (pb2.ClassifyRequest(images=to_tensor(np.zeros((2, 1, 11, 12), np.uint8))),
                     "shape [2, 1, 11, 12]; this model takes [N, 1, 12, 12] or [N, 12, 12]"),
    "three channels": (pb2.ClassifyRequest(images=to_tensor(np.zeros((2, 3, 12, 12), np.uint8))), "shape [2, 3, 12"),
    "one image, no batch axis": (pb2.ClassifyRequest(images=to_tensor(np.zeros((12, 12), np.uint8))), "shape [12, 12]"),
    "data size": (pb2.ClassifyRequest(images=_wrong_size()), "has 287 bytes of data"),
    "NaN": (pb2.ClassifyRequest(images=to_tensor(np.full((1, 1, 12, 12), np.nan, np.float32))), "NaN"),
    "above 255": (pb2.ClassifyRequest(images=to_tensor(np.full((1, 1, 12, 12), 256, np.float32))), "0..255"),
    "empty": (pb2.ClassifyRequest(images=to_tensor(np.zeros((0, 1, 12, 12), np.uint8))), "no images"),
    "too many": (pb2.ClassifyRequest(images=to_tensor(np.zeros((257, 1, 12, 12), np.uint8))), "too many images: 257"),
    "texts": (pb2.ClassifyRequest(texts=["a shirt"]), "does not take texts; send images"),
    "nothing": (pb2.ClassifyRequest(), "does not take texts; send images"),
    "texts and images": (pb2.ClassifyRequest(texts=["a"], images=to_tensor(np.zeros((1, 12, 12), np.uint8))),
                         "both texts and images"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_requests_are_invalid_argument(cluster: TierCluster, client: TierClient,
                                                  mobile_stub: pb2_grpc.ClassifierStub, case: str) -> None:
    request, message = BAD_IMAGES[case]
    with pytest.raises(grpc.RpcError) as caught:
        mobile_stub.Classify(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert health_status(cluster.entry_address) == "SERVING"
    assert len(client.classify_images(np.zeros((1, 12, 12), np.uint8))) == 1


def test_images_sent_to_a_text_model_are_invalid_input(manifest: Manifest) -> None:
    from types import SimpleNamespace

    from shared.errors import InvalidInput
    from shared.serving.admission import WorkLimit
    from shared.serving.metrics import TierMetrics
    from shared.serving.servicers import ClassifierServicer

    text_manifest = manifest.model_copy(update={"family": "text", "input_shape": None, "max_length": 32,
                                                "tokenizer_file": "tokenizer.json"})
    servicer = ClassifierServicer("mobile", TierMetrics("mobile"), max_batch=8,
                                  admission=WorkLimit(8, "mobile"), max_text_chars=100)
    servicer.ready(SimpleNamespace(manifest=text_manifest))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"this model \(text\) does not take images; send texts"):
        asyncio.run(servicer.classify_images(np.zeros((1, 12, 12), np.uint8), {}, "", None))


def test_the_demo_serves_the_test_split_as_the_builder_report_says(
        tiny_cnn_artifacts: Path, tiny_image_data: Path, tmp_path: Path) -> None:
    from shared.tools.cli import main

    out = tmp_path / "demo.json"
    status = main(["demo", "--artifacts", str(tiny_cnn_artifacts), "--data", str(tiny_image_data),
                   "--latency-samples", "20", "--out", str(out)])
    assert status == 0
    results = json.loads(out.read_text())
    report = json.loads((tiny_cnn_artifacts / "report.json").read_text())
    assert results["samples"] == report["provenance"]["test_samples"] and results["builder_report"]["comparable"]
    assert results["accuracy"] == pytest.approx(report["system_accuracy"], abs=1e-12)
    assert results["relative_cost"] == pytest.approx(report["relative_cost"], abs=1e-12)
    for tier, e in zip(TIERS, report["exits"], strict=True):
        assert results["exits"][tier]["fraction"] == pytest.approx(e["exit_fraction"], abs=1e-12)
    assert results["single_pass_agrees"]
