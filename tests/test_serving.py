"""The three tiers as real processes on free 127.0.0.1 ports, on the tiny built model.

Every answer is checked against the in-process chained onnxruntime result of its sample and the
offline tier rule (shared.contract.policy.route).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared.client import TierClient, health_status
from shared.contract.calibration import softmax
from shared.contract.manifest import TIERS, Manifest, load_manifest
from shared.contract.policy import route
from shared.contract.text import TextEncoder
from shared.tools.processes import TierCluster, start_tier, wait_until_serving
from shared.wire.codec import encode_tensors, to_tensor
from shared.wire.rpc import pb2, pb2_grpc
from tests.tiny_model import sentence

PROB_TOLERANCE = 1e-5
# 16 generated sentences of mixed length, one that is cut to max_length, one with unknown words
_rng = np.random.default_rng(7)
TEXTS = [sentence(_rng, i % 2, 2) for i in range(16)] + [
    " ".join(["good film"] * 40), "completely unknown words here"]


def reference_probs(folder: Path, manifest: Manifest, texts: list[str]) -> list[np.ndarray]:
    """Calibrated probabilities per exit ([N, C] each): every sample alone through all slices."""
    sessions = [ort.InferenceSession(str(folder / s.file), providers=["CPUExecutionProvider"])
                for s in manifest.slices]
    encoder = TextEncoder.for_manifest(manifest, folder)
    per_exit: list[list[np.ndarray]] = [[] for _ in TIERS]
    for text in texts:
        feed = encoder.encode([text]).tensors
        for i, (spec, session) in enumerate(zip(manifest.slices, sessions, strict=True)):
            outputs = dict(zip(spec.outputs, session.run(spec.outputs, feed), strict=True))
            per_exit[i].append(softmax(outputs["logits"], manifest.exits[i].temperature)[0])
            feed = {name: outputs.get(source, feed.get(source))
                    for name, source in spec.forwards.items()}
    return [np.stack(p) for p in per_exit]


def threshold_between(confidence: np.ndarray) -> float:
    """A threshold splitting `confidence` near its median, far from every value (no float ties)."""
    values = np.unique(confidence)
    gaps = np.diff(values)
    middle = len(values) // 2
    candidates = [i for i in np.argsort(np.abs(np.arange(len(gaps)) - middle + 0.5))
                  if gaps[i] > 1e-4]
    assert candidates, "confidences too close to split"
    i = candidates[0]
    return float((values[i] + values[i + 1]) / 2)


@pytest.fixture(scope="module")
def manifest(tiny_artifacts: Path) -> Manifest:
    return load_manifest(tiny_artifacts)


@pytest.fixture(scope="module")
def reference(tiny_artifacts: Path, manifest: Manifest) -> list[np.ndarray]:
    return reference_probs(tiny_artifacts, manifest, TEXTS)


@pytest.fixture(scope="module")
def edge_stub(cluster: TierCluster) -> Iterator[pb2_grpc.ContinuationStub]:
    with grpc.insecure_channel(cluster.tiers["edge"].address) as channel:
        yield pb2_grpc.ContinuationStub(channel)


def check_against_reference(answers: list[pb2.Answer], reference: list[np.ndarray],
                            thresholds: list[float], manifest: Manifest) -> np.ndarray:
    """Assert each answer is the reference's for its sample; return the exit index per sample."""
    expected = route(reference, thresholds)
    assert len(answers) == len(reference[0])
    for i, answer in enumerate(answers):
        exit_index = int(expected.exit_index[i])
        assert answer.index == i and answer.request_id.endswith(f"/{i}")
        assert answer.tier == TIERS[exit_index], f"sample {i}"
        assert answer.exit_layer == manifest.exits[exit_index].layer
        assert answer.label_index == expected.prediction[i]
        assert answer.label == manifest.labels[answer.label_index]
        np.testing.assert_allclose(answer.probabilities, reference[exit_index][i],
                                   atol=PROB_TOLERANCE)
        assert answer.confidence == pytest.approx(expected.confidence[i], abs=PROB_TOLERANCE)
        assert [t.tier for t in answer.timings] == list(TIERS[: exit_index + 1])
        for timing in answer.timings:
            assert timing.server_seconds >= timing.own_seconds >= timing.compute_seconds > 0
        assert not answer.degraded
    return expected.exit_index


def test_a_mixed_batch_is_split_per_sample_and_merged_in_order(
        client: TierClient, reference: list[np.ndarray], manifest: Manifest) -> None:
    tau_mobile = threshold_between(reference[0].max(-1))
    reaching_edge = reference[0].max(-1) < tau_mobile
    tau_edge = threshold_between(reference[1][reaching_edge].max(-1))
    answers = client.classify(TEXTS, thresholds={"mobile": tau_mobile, "edge": tau_edge})
    exit_index = check_against_reference(answers, reference, [tau_mobile, tau_edge], manifest)
    assert set(exit_index.tolist()) == {0, 1, 2}, "every tier answers part of the batch"
    assert exit_index.tolist() != sorted(exit_index.tolist()), "answers interleave across tiers"


def test_threshold_zero_sends_nothing_past_mobile(
        client: TierClient, cluster: TierCluster, reference: list[np.ndarray],
        manifest: Manifest) -> None:
    before = _metric(cluster, "edge", 'tierserve_samples_total{tier="edge"}')
    answers = client.classify(TEXTS, thresholds={"mobile": 0.0, "edge": 0.0})
    assert {a.tier for a in answers} == {"mobile"}
    check_against_reference(answers, reference, [0.0, 0.0], manifest)
    assert _metric(cluster, "edge", 'tierserve_samples_total{tier="edge"}') == before


def test_thresholds_above_one_send_everything_to_the_cloud(
        client: TierClient, reference: list[np.ndarray], manifest: Manifest) -> None:
    answers = client.classify(TEXTS, thresholds={"mobile": 1.01, "edge": 1.01})
    assert {a.tier for a in answers} == {"cloud"}
    check_against_reference(answers, reference, [1.01, 1.01], manifest)


def test_manifest_thresholds_apply_without_overrides(
        client: TierClient, reference: list[np.ndarray], manifest: Manifest) -> None:
    answers = client.classify(TEXTS)
    check_against_reference(answers, reference, [e.threshold for e in manifest.exits[:-1]],
                            manifest)


def test_single_texts_and_the_truncation_flag(client: TierClient, manifest: Manifest) -> None:
    long_text, short_text = TEXTS[-2], "a good film"
    assert [a.truncated for a in client.classify([short_text, long_text])] == [False, True]
    [answer] = client.classify([long_text], request_id="trace-1")
    assert answer.truncated and answer.request_id == "trace-1/0"


def _rpc_error(call, *args) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    return caught.value


@pytest.mark.parametrize(("texts", "thresholds", "message"), [
    ([], {}, "no texts"),
    (["fine", ""], {}, "text 1 is empty"),
    (["   "], {}, "text 0 is empty"),
    (["good"] * 257, {}, "too many texts: 257"),
    (["a" * 10_001], {}, "text 0 has 10001 characters"),
    (["good"], {"cloud": 0.5}, "threshold for unknown or last tier 'cloud'"),
    (["good"], {"mobile": -0.1}, "threshold for mobile is -0.1"),
    (["good"], {"edge": float("nan")}, "threshold for edge is nan"),
])
def test_bad_classify_requests_are_invalid_argument(
        client: TierClient, cluster: TierCluster, texts: list[str], thresholds: dict,
        message: str) -> None:
    error = _rpc_error(client.classify, texts, thresholds)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert health_status(cluster.entry_address) == "SERVING"
    assert len(client.classify(["good film"])) == 1


def _continue_request(manifest: Manifest, batch: int = 2, seq: int = 5, **changes: object
                      ) -> pb2.ContinueRequest:
    arrays = {"hidden": np.zeros((batch, seq, manifest.hidden_size), np.float32),
              "attention_mask": np.ones((batch, seq), np.int64)}
    tensors = encode_tensors(arrays)
    ids = [f"r/{i}" for i in range(batch)]
    for name, value in changes.items():
        if name == "request_ids":
            ids = value  # type: ignore[assignment]
        elif value is None:
            del tensors[name]
        else:
            tensors[name] = value if isinstance(value, pb2.Tensor) else to_tensor(value)
    return pb2.ContinueRequest(tensors=tensors, request_ids=ids)


BAD_CONTINUE = {  # case -> (changes to a good request given the hidden size H, expected message)
    "hidden of the wrong width": (
        lambda h: {"hidden": np.zeros((2, 5, h + 1), np.float32)}, "tensor 'hidden' has shape"),
    "hidden of rank 2": (lambda h: {"hidden": np.zeros((2, 5), np.float32)}, "rank 2"),
    "hidden as float64": (
        lambda h: {"hidden": np.zeros((2, 5, h), np.float64)}, "tensor 'hidden' has dtype float64"),
    "hidden with NaN": (
        lambda h: {"hidden": np.full((2, 5, h), np.nan, np.float32)}, "tensor 'hidden' holds NaN"),
    "hidden of another batch size": (
        lambda h: {"hidden": np.zeros((3, 5, h), np.float32)}, "dimension 0 is"),
    "mask shorter than hidden": (
        lambda h: {"attention_mask": np.ones((2, 4), np.int64)}, "dimension 1 is"),
    "mask of int32": (lambda h: {"attention_mask": np.ones((2, 5), np.int32)}, "dtype int32"),
    "mask values not 0/1": (
        lambda h: {"attention_mask": np.full((2, 5), 3, np.int64)}, "only hold 0 and 1"),
    "a row without tokens": (
        lambda h: {"attention_mask": np.zeros((2, 5), np.int64)}, "row 0 has no tokens"),
    "missing mask": (lambda h: {"attention_mask": None}, "missing ['attention_mask']"),
    "unexpected tensor": (
        lambda h: {"pixels": np.zeros((2, 3), np.float32)}, "unexpected ['pixels']"),
    "too few ids": (lambda h: {"request_ids": ["r/0"]}, "1 request ids for a batch of 2"),
    "unknown encoding": (
        lambda h: {"hidden": pb2.Tensor(dtype="float32", shape=[2, 5, h], data=b"", encoding=99)},
        "unsupported encoding 99"),
    "int8 without its scales": (
        lambda h: {"hidden": pb2.Tensor(dtype="float32", shape=[2, 5, h], data=b"\0" * (10 * h),
                                        encoding=pb2.TENSOR_ENCODING_INT8_TOKEN)}, "and 0 of scales"),
    "int4 without its scales": (
        lambda h: {"hidden": pb2.Tensor(dtype="float32", shape=[2, 5, h], data=b"\x88" * (5 * h),
                                        encoding=pb2.TENSOR_ENCODING_INT4_GROUP)}, "and 0 of scales"),
    "byte count mismatch": (
        lambda h: {"hidden": pb2.Tensor(dtype="float32", shape=[2, 5, h], data=b"\0" * 12)},
        "12 bytes"),
    "empty batch": (
        lambda h: {"request_ids": [], "hidden": np.zeros((0, 5, h), np.float32),
                   "attention_mask": np.ones((0, 5), np.int64)}, "the batch is empty"),
    "unknown dtype": (
        lambda h: {"hidden": pb2.Tensor(dtype="float8", shape=[2, 5, h], data=b"")},
        "unknown dtype 'float8'"),
    "bad threshold key": (lambda h: {"thresholds": {"edgy": 0.5}}, "unknown or last tier 'edgy'"),
}


@pytest.mark.parametrize("case", list(BAD_CONTINUE))
def test_bad_continue_requests_are_invalid_argument(
        edge_stub: pb2_grpc.ContinuationStub, cluster: TierCluster, manifest: Manifest,
        case: str) -> None:
    make_changes, message = BAD_CONTINUE[case]
    changes = make_changes(manifest.hidden_size)
    thresholds = changes.pop("thresholds", {})
    request = _continue_request(manifest, **changes)
    request.thresholds.update(thresholds)
    error = _rpc_error(edge_stub.Continue, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert message in error.details()
    assert health_status(cluster.tiers["edge"].address) == "SERVING"
    ok = edge_stub.Continue(_continue_request(manifest))
    assert [a.request_id for a in ok.answers] == ["r/0", "r/1"]


def test_health_reflection_and_metrics(cluster: TierCluster) -> None:
    services = {"mobile": "tierserve.v1.Classifier", "edge": "tierserve.v1.Continuation",
                "cloud": "tierserve.v1.Continuation"}
    for tier, proc in cluster.tiers.items():
        with grpc.insecure_channel(proc.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=services[tier]), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = {s.name for reply in replies for s in reply.list_services_response.service}
            assert {services[tier], "grpc.health.v1.Health"} <= names
        assert _metric(cluster, tier, f'tierserve_inflight_requests{{tier="{tier}"}}') is not None


def test_sigterm_stops_a_tier_cleanly(tiny_artifacts: Path, tmp_path: Path) -> None:
    cloud = start_tier("cloud", tiny_artifacts, tmp_path)
    try:
        wait_until_serving([cloud], timeout=30)
    finally:
        status = cloud.stop(timeout=10)
    assert status == 0, cloud.log_tail()
    assert "cloud tier stopped" in cloud.log_tail()


def _metric(cluster: TierCluster, tier: str, series: str) -> float | None:
    url = f"http://127.0.0.1:{cluster.tiers[tier].metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    return None


def test_classify_command_reads_args_files_and_stdin(
        cluster: TierCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.tools.cli import main

    listing = tmp_path / "texts.txt"
    listing.write_text("a good film\n\nbad dull plot\n")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("the story\n"))
    status = main(["classify", "--address", cluster.entry_address, "--threshold", "mobile=0",
                   "great", "-", "-f", str(listing)])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert [line.split()[-1] for line in lines] == ["great", "story", "film", "plot"]
    assert all(line.split()[2] == "mobile" for line in lines)
    assert main(["classify", "--address", cluster.entry_address, ""]) == 1
    assert "text 0 is empty" in capsys.readouterr().err


def test_classify_command_input_that_cannot_be_read_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any call (the address answers nothing): a file missing, a folder, bytes that are not UTF-8
    in a file, an argument or stdin, and --pair-file's line numbers count blank lines."""
    from shared.tools.cli import main

    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    (tmp_path / "pairs.tsv").write_text("a\tb\n\n\nno tab here\n")
    nowhere = "127.0.0.1:1"
    cases = {("-f", str(tmp_path / "missing.txt")): "missing.txt: No such file or directory",
             ("-f", str(tmp_path)): "Is a directory",
             ("-f", str(tmp_path / "latin1.txt")): "latin1.txt: not UTF-8 text (byte 0xe9)",
             ("caf\udce9",): "an argument is not UTF-8 text",
             ("--pair-file", str(tmp_path / "pairs.tsv")): "pairs.tsv: line 4 has no tab"}
    for args, message in cases.items():
        assert main(["classify", "--address", nowhere, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("fine\nbad \udcff\n"))
    assert main(["classify", "--address", nowhere, "-"]) == 2
    assert "stdin: line 2 is not UTF-8 text" in capsys.readouterr().err


def test_free_ports_avoid_the_ephemeral_range_and_never_repeat() -> None:
    """Outgoing connections take their source ports from the ephemeral range: a tier's port picked
    there could be taken before the tier binds it (seen in CI as 'Failed to bind')."""
    from shared.tools.processes import _ephemeral_low, free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < _ephemeral_low() for port in ports)
