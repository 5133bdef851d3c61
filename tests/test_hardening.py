"""Hostile and overloaded traffic, and what operators see: one regression test per finding of the
attack run against three tiers on 127.0.0.1 (each names the old behaviour it would have caught).
CANCELLED and DEADLINE_EXCEEDED in tierserve_errors_total are asserted in tests/test_transport.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bench.common import scrape
from shared.client import TierClient
from shared.contract.manifest import Manifest, artifact_path, load_manifest, save_manifest
from shared.errors import ArtifactError, SliceFailure
from shared.serving.tier import MAX_REQUEST_ID_CHARS, check_outputs
from shared.tools.processes import TierCluster, running_tiers, start_tier, wait_until_serving
from shared.wire.codec import to_tensor
from shared.wire.rpc import pb2, pb2_grpc
from tests.tiny_model import sentence

TO_THE_CLOUD = {"mobile": 1.01, "edge": 1.01}
_rng = np.random.default_rng(5)
TEXTS = [sentence(_rng, i % 2, 3) for i in range(300)]


@pytest.fixture(scope="module")
def manifest(tiny_artifacts: Path) -> Manifest:
    return load_manifest(tiny_artifacts)


@pytest.fixture(scope="module")
def cluster(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TierCluster]:
    flags = {"mobile": {"log_format": "json"}}
    with running_tiers(tiny_artifacts, flags=flags, log_dir=tmp_path_factory.mktemp("logs")) as started:
        yield started


@pytest.fixture(scope="module")
def client(cluster: TierCluster) -> Iterator[TierClient]:
    with TierClient(cluster.entry_address, timeout=60) as started:
        yield started


def _continue(cluster: TierCluster, request: pb2.ContinueRequest, tier: str = "edge") -> grpc.RpcError | None:
    with grpc.insecure_channel(cluster.tiers[tier].address) as channel:
        try:
            pb2_grpc.ContinuationStub(channel).Continue(request, timeout=30)
        except grpc.RpcError as exc:
            return exc
    return None


def _hidden(batch: int, tokens: int, size: int, value: float = 0.0) -> dict[str, pb2.Tensor]:
    return {"hidden": to_tensor(np.full((batch, tokens, size), value, np.float32)),
            "attention_mask": to_tensor(np.ones((batch, tokens), np.int64))}


def test_1_sequences_beyond_the_models_max_length_are_refused_before_the_slice_runs(
        cluster: TierCluster, client: TierClient, manifest: Manifest) -> None:
    """Was: a Continue of 2 x 4,096 tokens ran the edge's slice for 21.6 s and took 3.77 GB."""
    assert manifest.max_length is not None
    started = time.monotonic()
    error = _continue(cluster, pb2.ContinueRequest(tensors=_hidden(2, 4096, manifest.hidden_size),
                                                   request_ids=["a/0", "a/1"]))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"sequences of 4096 tokens: this model takes at most {manifest.max_length}" in error.details()
    assert time.monotonic() - started < 5
    assert client.classify(TEXTS[:2], TO_THE_CLOUD)[0].tier == "cloud"


def test_2_long_request_ids_are_refused_at_classify_and_at_continue(
        cluster: TierCluster, client: TierClient, manifest: Manifest) -> None:
    """Was: a 1 MB request id was copied into each of 256 answers (a 256 MB answer, then
    RESOURCE_EXHAUSTED after all the work); 200 KB ids were accepted at Continue."""
    with pytest.raises(grpc.RpcError) as caught:
        client.classify(TEXTS[:256], request_id="x" * 1_000_000)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_REQUEST_ID_CHARS}" in caught.value.details()
    error = _continue(cluster, pb2.ContinueRequest(tensors=_hidden(2, 3, manifest.hidden_size),
                                                   request_ids=["y" * 200_000 + "/0", "z/1"]))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request id 0 has 200002 characters" in error.details()
    answers = client.classify(TEXTS[:2], request_id="r" * MAX_REQUEST_ID_CHARS)
    assert answers[1].request_id == "r" * MAX_REQUEST_ID_CHARS + "/1"


def test_3_a_request_larger_than_a_slice_run_goes_in_chunks_and_keeps_its_order(
        cluster: TierCluster, client: TierClient) -> None:
    """Was: one large request ran as one slice run, holding the slice while others waited."""
    before = scrape(cluster.tiers["mobile"].metrics_port)
    answers = client.classify(TEXTS[:70], TO_THE_CLOUD, request_id="big")
    after = scrape(cluster.tiers["mobile"].metrics_port)
    assert [a.index for a in answers] == list(range(70))
    assert [a.request_id for a in answers] == [f"big/{i}" for i in range(70)]
    assert all(a.tier == "cloud" and not a.degraded for a in answers)

    def runs(samples: dict, le: str) -> float:
        return samples[("tierserve_batch_size_bucket", (("le", le), ("tier", "mobile")))]

    total = runs(after, "+Inf") - runs(before, "+Inf")
    assert total >= 3, "70 samples in slice runs of at most 32"
    assert runs(after, "32.0") - runs(before, "32.0") == total, "no slice run of more than 32 samples"


def test_4_huge_finite_values_are_refused_and_a_slices_non_finite_output_is_never_an_answer(
        cluster: TierCluster, manifest: Manifest) -> None:
    """Was: hidden values of 3e38 passed the NaN/inf check and came back as OK answers with NaN
    confidence; an edge whose slice made NaN forwarded it."""
    error = _continue(cluster, pb2.ContinueRequest(tensors=_hidden(1, 3, manifest.hidden_size, 3e38),
                                                   request_ids=["h/0"]))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "beyond +-10000" in error.details()
    with pytest.raises(SliceFailure, match="the edge slice produced non-finite values in 'hidden'") as caught:
        check_outputs("edge", {"logits": np.zeros((1, 2), np.float32),
                               "hidden": np.array([[[1.0, math.nan]]], np.float32)})
    assert caught.value.code == "INTERNAL"
    check_outputs("edge", {"logits": np.full((1, 2), 3e38, np.float32)})  # large but finite: fine


def test_6_manifest_paths_stay_inside_the_model_folder(tiny_artifacts: Path, tmp_path: Path) -> None:
    """Was: a manifest naming ../../../etc/passwd had it opened and hashed; a slice outside the
    folder loaded and served."""
    for name in ("../../../../etc/passwd", "/etc/passwd", "sub/../../x.onnx"):
        with pytest.raises(ArtifactError, match="outside the model folder"):
            artifact_path(tiny_artifacts, name, "cloud slice")
    assert artifact_path(tiny_artifacts, "./sub/../cloud.onnx", "cloud slice") == tiny_artifacts / "cloud.onnx"
    folder = tmp_path / "model"
    shutil.copytree(tiny_artifacts, folder)
    manifest = load_manifest(folder)
    manifest.slices[2].file = "../../../../../etc/passwd"
    save_manifest(manifest, folder)
    cloud = start_tier("cloud", folder, tmp_path)
    assert cloud.process.wait(60) == 2
    assert "lies outside the model folder" in cloud.log_tail()


def _reflected_services(address: str, method: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        [reply] = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    return {s.name for s in reply.list_services_response.service}


def test_7_reflection_lists_what_a_tier_serves_as_v1_and_v1alpha_and_can_be_off(
        cluster: TierCluster, tiny_artifacts: Path, tmp_path: Path) -> None:
    """Was: only v1alpha, always on, and edge and cloud listed the Classifier they do not serve."""
    reflection = {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
    for version in ("v1alpha", "v1"):
        method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
        assert _reflected_services(cluster.tiers["edge"].address, method) == {
            "tierserve.v1.Continuation", "grpc.health.v1.Health", *reflection}
        assert _reflected_services(cluster.entry_address, method) == {
            "tierserve.v1.Classifier", "inference.GRPCInferenceService", "grpc.health.v1.Health", *reflection}
    quiet = start_tier("cloud", tiny_artifacts, tmp_path, flags={"reflection": "false"})
    try:
        wait_until_serving([quiet])
        with grpc.insecure_channel(quiet.address) as channel, pytest.raises(grpc.RpcError) as caught:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=5))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        quiet.stop()


def test_8_a_frozen_next_tier_is_given_up_on_within_about_a_second(tiny_artifacts: Path, tmp_path: Path) -> None:
    """Was: a partitioned edge (SIGSTOP) held callers without a deadline of their own for the
    fixed 10 s hop timeout."""
    with running_tiers(tiny_artifacts, log_dir=tmp_path) as started, \
            TierClient(started.entry_address, timeout=30) as tier_client:
        for text in TEXTS[:30]:  # the hops' times, measured
            assert tier_client.classify([text], TO_THE_CLOUD)[0].tier == "cloud"
        cloud = started.tiers["cloud"].process
        os.kill(cloud.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            answers = tier_client.classify(TEXTS[:2], TO_THE_CLOUD)
            waited = time.monotonic() - began
        finally:
            os.kill(cloud.pid, signal.SIGCONT)
    assert all(a.tier == "edge" and a.degraded and "too slow" in a.degraded_reason for a in answers)
    assert waited < 3, f"{waited:.1f} s"


def test_9_a_maximum_size_request_forced_to_the_cloud_is_answered_in_full(
        cluster: TierCluster, client: TierClient, manifest: Manifest) -> None:
    """Was: 256 texts x 128 tokens forced to the cloud took 14.4 s and came back all degraded."""
    long_texts = [" ".join([TEXTS[i]] * 8) for i in range(256)]  # past max_length: truncated
    answers = client.classify(long_texts, TO_THE_CLOUD, timeout=60)
    assert len(answers) == 256 and all(a.tier == "cloud" and not a.degraded and a.truncated for a in answers)


def test_10_json_logs_process_metrics_and_404_off_the_metrics_path(cluster: TierCluster) -> None:
    """Was: plain-text logs only, no process metrics, and the metrics server answered 200 on every
    path (a probe at /v2/health/ready there always looked healthy)."""
    mobile = cluster.tiers["mobile"]
    lines = [json.loads(line) for line in mobile.log_tail().splitlines() if line.startswith("{")]
    assert any(entry["message"].startswith("mobile tier serving") for entry in lines), mobile.log_tail()
    assert all({"time", "level", "tier", "logger", "message"} <= set(entry) for entry in lines)
    samples = scrape(mobile.metrics_port)
    assert samples[("process_resident_memory_bytes", ())] > 0 and ("process_open_fds", ()) in samples
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{mobile.metrics_port}/v2/health/ready", timeout=5)
    assert caught.value.code == 404


def test_a_model_file_the_tier_cannot_read_is_named_with_the_fix(tiny_artifacts: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: a build folder of mode 0700 and a tier running as another user ended in a raw
    PermissionError traceback. (As root every file is readable, so the read itself is made to fail.)"""
    folder = tmp_path / "model"
    shutil.copytree(tiny_artifacts, folder)

    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ArtifactError, match=r"cannot read .*manifest.json: Permission denied \(this process runs as "
                                            r"uid \d+; the model folder must be readable by it, e\.g\. chmod -R a\+rX"):
        load_manifest(folder)


def test_opt_in_the_mobile_answers_early_and_says_so_while_the_edge_is_overloaded(
        tiny_artifacts: Path, tmp_path: Path) -> None:
    """overload_threshold: while the edge refuses for load, the mobile exit answers what it would
    have forwarded, each answer flagged; once the edge has room again, samples go to it as before."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    flags = {"mobile": {"threshold": 0.999, "overload_threshold": 0.0},
             "edge": {"inject_delay_ms": 1500, "max_inflight_samples": 2, "max_batch": 2}}
    with running_tiers(tiny_artifacts, flags=flags, log_dir=tmp_path) as started, \
            TierClient(started.entry_address, timeout=30) as tier_client:
        with ThreadPoolExecutor(3) as pool:  # 3 x 2 samples for an edge that takes 2 at once: refusals
            filling = [pool.submit(tier_client.classify, TEXTS[2 * i:2 * i + 2]) for i in range(3)]
            # the first to come back was refused (the others wait on the edge's delay): the mobile has seen
            # the refusal, and the edge is still busy (a fixed sleep raced the refusal on a loaded machine)
            done, _ = wait(filling, timeout=5, return_when=FIRST_COMPLETED)
            assert done and all(a.degraded for f in done for a in f.result())
            began = time.monotonic()
            early = tier_client.classify(TEXTS[10:12])
            early_seconds = time.monotonic() - began
            [f.result() for f in filling]
        time.sleep(1.5)  # the edge idle again, its overload forgotten
        later = tier_client.classify(TEXTS[14:15])
    assert all(a.tier == "mobile" and a.degraded and "the edge tier is overloaded" in a.degraded_reason
               for a in early), [a.degraded_reason for a in early]
    assert early_seconds < 1.0, "answered at the mobile without waiting on the edge"
    assert later[0].tier != "mobile" and not later[0].degraded


def test_review_a_tiny_lengths_mask_cannot_unfold_into_a_huge_one(cluster: TierCluster, manifest: Manifest) -> None:
    """Was: a 26-byte attention mask sent as row lengths of shape [1, 10^7] unfolded (and was cached)
    into 80 MB before any check; as Classify images it reached the decoder too."""
    mask = pb2.Tensor(dtype="int64", shape=[1, 10_000_000], data=np.array([10_000_000], "<i4").tobytes(),
                      encoding=pb2.TENSOR_ENCODING_LENGTHS)
    hidden = to_tensor(np.zeros((1, 3, manifest.hidden_size), np.float32))
    error = _continue(cluster, pb2.ContinueRequest(tensors={"hidden": hidden, "attention_mask": mask},
                                                   request_ids=["m/0"]))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unfolds into 10000000 values" in error.details()
    with grpc.insecure_channel(cluster.entry_address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb2_grpc.ClassifierStub(channel).Classify(pb2.ClassifyRequest(images=mask), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "images travel raw" in caught.value.details()


def test_review_a_long_echoed_value_still_gets_its_own_status(client: TierClient) -> None:
    """Was: an error quoting a 200 KB client value passed gRPC's metadata limit and reached the client
    as RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT."""
    with pytest.raises(grpc.RpcError) as caught:
        client.classify(TEXTS[:1], {"x" * 200_000: 0.5})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(caught.value.details()) <= 2003 and caught.value.details().endswith("...")


def test_review_a_callers_short_deadline_opens_no_breaker() -> None:
    """Was: five calls whose callers' own deadlines were short opened the breaker for everyone."""
    import asyncio

    from shared.serving.next_tier import CircuitBreaker, GuardedNextTier, HopDeadline, NextTierError

    class Slow:
        address = "slow:1"

        async def continue_batch(self, tensors: object, request_ids: list[str], thresholds: object,
                                 timeout: float | None, audit: bool = False) -> list[pb2.Answer]:
            raise NextTierError("too slow", "DEADLINE_EXCEEDED")

        async def close(self) -> None: ...

    guarded = GuardedNextTier(Slow(), "edge", breaker=CircuitBreaker(2), hop_deadline=HopDeadline(ceiling=10.0))

    async def calls(timeout: float | None, count: int) -> None:
        for _ in range(count):
            with pytest.raises(NextTierError):
                await guarded.continue_batch({}, ["a/0"], {}, timeout)

    asyncio.run(calls(0.005, 5))  # the callers' own deadlines: no verdict on the edge
    assert guarded.breaker.state == "closed" and not guarded.overloaded()
    asyncio.run(calls(None, 2))  # the hop's own deadline passed: the edge is too slow
    assert guarded.breaker.state == "open" and guarded.overloaded()
