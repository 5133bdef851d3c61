"""Tier to tier over standard gRPC: unary calls, deadlines and cancellation that travel downstream,
replicas balanced round_robin, a restarted replica found again at its new address, and a
start-up that tells the truth. All against real tier processes on 127.0.0.x.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.common import scrape
from shared.client import TierClient
from shared.contract.manifest import load_manifest
from shared.serving.next_tier import ContinuationClient, NextTierError
from shared.tools.processes import REPO_ROOT, TierCluster, TierProcess, free_port, start_tier, wait_until_serving
from shared.wire.codec import encode_tensors
from shared.wire.rpc import pb2, pb2_grpc
from shared.wire.targets import AddressError, grpc_target
from tests.dns_stub import DnsStub
from tests.test_serving import reference_probs
from tests.tiny_model import sentence

TO_THE_CLOUD = {"mobile": 1.01, "edge": 1.01}
_rng = np.random.default_rng(11)
TEXTS = [sentence(_rng, i % 2, 3) for i in range(24)]


def _samples(process: TierProcess) -> float:
    return scrape(process.metrics_port)[("tierserve_samples_total", (("tier", process.tier),))]


def _errors(process: TierProcess, code: str) -> float:
    return scrape(process.metrics_port)[("tierserve_errors_total", (("code", code), ("tier", process.tier)))]


@contextlib.contextmanager
def _tiers(*processes: TierProcess) -> Iterator[list[TierProcess]]:
    started = list(processes)
    try:
        wait_until_serving(started, timeout=60)
        yield started
    finally:
        for process in started:
            process.stop()


def _start(tier: str, artifacts: Path, log_dir: Path, next_address: str | None = None,
           **kwargs: object) -> TierProcess:
    """start_tier with a log folder of its own (replicas of one tier each write <tier>.log)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return start_tier(tier, artifacts, log_dir, next_address, **kwargs)  # type: ignore[arg-type]


def _targets(processes: list[TierProcess]) -> str:
    return ",".join(p.address for p in processes)


def test_targets_name_one_address_a_list_of_replicas_or_a_dns_name() -> None:
    assert grpc_target("127.0.0.1:50052") == "dns:///127.0.0.1:50052"
    assert grpc_target("edge.svc:50052") == "dns:///edge.svc:50052"
    assert grpc_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert grpc_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert grpc_target("dns://10.0.0.1:53/edge:1") == "dns://10.0.0.1:53/edge:1"
    for bad, says in [("50199", "has no host"), ("edge:http", "expected a number"), ("edge:0", "1..65535"),
                      ("a:1,b:2", "a list of replicas takes IP addresses"), ("ipv4:", "names no address"),
                      ("::1:5", "in brackets")]:
        with pytest.raises(AddressError, match=says):
            grpc_target(bad)


def test_two_replicas_of_edge_and_cloud_share_the_calls_and_survive_losing_one(
        tiny_artifacts: Path, tmp_path: Path) -> None:
    clouds = [_start("cloud", tiny_artifacts, tmp_path / f"cloud{i}") for i in range(2)]
    edges = [_start("edge", tiny_artifacts, tmp_path / f"edge{i}", _targets(clouds)) for i in range(2)]
    mobile = _start("mobile", tiny_artifacts, tmp_path / "mobile", _targets(edges))
    manifest = load_manifest(tiny_artifacts)
    expected = reference_probs(tiny_artifacts, manifest, TEXTS)[-1]
    with _tiers(*clouds, *edges, mobile), TierClient(mobile.address, timeout=30) as client:
        for i in range(400):
            answer, = client.classify([TEXTS[i % len(TEXTS)]], TO_THE_CLOUD)
            assert answer.tier == "cloud" and not answer.degraded, answer.degraded_reason
        for replicas in (edges, clouds):
            shares = [_samples(p) / 400 for p in replicas]
            assert all(0.3 <= share <= 0.7 for share in shares), shares

        # one edge and one cloud replica die (SIGKILL) a quarter of the way into 400 requests at concurrency 16
        done = threading.Semaphore(0)

        def classify(i: int) -> pb2.Answer:
            try:
                return client.classify([TEXTS[i % len(TEXTS)]], TO_THE_CLOUD, request_id=f"r{i}")[0]
            finally:
                done.release()

        with futures.ThreadPoolExecutor(16) as pool:
            pending = [pool.submit(classify, i) for i in range(400)]
            for _ in range(100):
                done.acquire()
            edges[0].kill()
            clouds[0].kill()
            answers = [future.result() for future in pending]  # raises if any call failed
    assert len(answers) == 400
    for i, answer in enumerate(answers):
        assert answer.request_id == f"r{i}/0"
        assert answer.tier == "cloud" and not answer.degraded, answer.degraded_reason
        np.testing.assert_allclose(answer.probabilities, expected[i % len(TEXTS)], atol=1e-5)


def _until_full_answers(client: TierClient, what: str, timeout: float = 10.0) -> None:
    """Send requests until one is answered in full (a tier that just started may still be
    connecting to the next: its first answers may be degraded)."""
    started = time.monotonic()
    while client.classify(TEXTS[:1], TO_THE_CLOUD)[0].degraded:
        assert time.monotonic() - started < timeout, f"{what} never got calls"
        time.sleep(0.02)


def test_a_replica_restarted_at_a_new_address_gets_calls_within_two_seconds_of_serving(
        tiny_artifacts: Path, tmp_path: Path) -> None:
    """The edge behind a DNS name moves from 127.0.0.2 to 127.0.0.3 (as a pod does); the name
    is served by a DNS server of the test's own, which the mobile tier's target names."""
    port = free_port("127.0.0.2")
    with DnsStub() as dns:
        dns.set("edge.tierserve.test", ["127.0.0.2"])
        cloud = start_tier("cloud", tiny_artifacts, tmp_path)
        edge = start_tier("edge", tiny_artifacts, tmp_path, cloud.address, address=f"127.0.0.2:{port}")
        mobile = start_tier("mobile", tiny_artifacts, tmp_path, f"dns://{dns.authority()}/edge.tierserve.test:{port}")
        with _tiers(cloud, edge, mobile) as started, TierClient(mobile.address, timeout=10) as client:
            _until_full_answers(client, "the edge at 127.0.0.2")
            assert edge.stop() == 0
            assert all(a.degraded for a in client.classify(TEXTS[:2], TO_THE_CLOUD))
            dns.set("edge.tierserve.test", ["127.0.0.3"])
            moved = start_tier("edge", tiny_artifacts, tmp_path, cloud.address, address=f"127.0.0.3:{port}")
            started.append(moved)
            wait_until_serving([moved], timeout=60)
            serving = time.monotonic()
            _until_full_answers(client, "the moved edge")
            resumed = time.monotonic() - serving
            answers = [a for _ in range(20) for a in client.classify(TEXTS[:2], TO_THE_CLOUD)]
    assert resumed < 2.0, f"full answers {resumed:.2f} s after the moved edge was SERVING"
    assert all(a.tier == "cloud" and not a.degraded for a in answers)


def test_a_replica_that_reports_not_serving_gets_no_calls(tiny_artifacts: Path, tmp_path: Path) -> None:
    """Client-side health checking: a replica that reports NOT_SERVING (loading its model, or
    draining) gets no calls; here a stand-in that would fail every call it got."""
    cloud = _start("cloud", tiny_artifacts, tmp_path / "cloud")
    edge = _start("edge", tiny_artifacts, tmp_path / "edge", cloud.address)
    with _tiers(cloud, edge):
        not_serving = _health_server("NOT_SERVING")
        try:
            target = f"{edge.address},127.0.0.1:{not_serving[1]}"
            mobile = _start("mobile", tiny_artifacts, tmp_path / "mobile", target)
            with _tiers(mobile), TierClient(mobile.address, timeout=10) as client:
                answers = [a for _ in range(20) for a in client.classify(TEXTS[:2], TO_THE_CLOUD)]
            edge_samples = _samples(edge)
        finally:
            not_serving[0].stop(0)
    assert all(a.tier == "cloud" and not a.degraded for a in answers)
    assert edge_samples == 40


def _health_server(status: str) -> tuple[grpc.Server, int]:
    """A Continuation server that reports `status` to health checks and fails every call."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    class Failing(pb2_grpc.ContinuationServicer):
        def Continue(self, request: pb2.ContinueRequest, context: grpc.ServicerContext) -> pb2.ContinueResponse:
            context.abort(grpc.StatusCode.INTERNAL, "a NOT_SERVING replica was called")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    pb2_grpc.add_ContinuationServicer_to_server(Failing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    value = health_pb2.HealthCheckResponse.ServingStatus.Value(status)
    checker.set("", value)
    checker.set("tierserve.v1.Continuation", value)
    return server, port


def test_a_cancelled_call_stops_the_work_at_the_next_tiers(tiny_artifacts: Path, tmp_path: Path) -> None:
    flags = {"cloud": {"inject_delay_ms": 20_000}}
    with TierCluster(tiny_artifacts, flags=flags, log_dir=tmp_path) as cluster:
        assert _samples(cluster.tiers["cloud"]) == 0
        with grpc.insecure_channel(cluster.entry_address) as channel:
            call = pb2_grpc.ClassifierStub(channel).Classify.future(
                pb2.ClassifyRequest(texts=TEXTS[:2], thresholds=TO_THE_CLOUD))  # no deadline
            time.sleep(1.0)  # the request is waiting at the cloud
            assert call.cancel()
        stopped_at = {}
        started = time.monotonic()
        while len(stopped_at) < 3 and time.monotonic() - started < 10:
            for tier, process in cluster.tiers.items():
                if tier not in stopped_at and _errors(process, "CANCELLED") >= 1:
                    stopped_at[tier] = time.monotonic() - started
            time.sleep(0.05)
        cloud_samples = _samples(cluster.tiers["cloud"])
    assert set(stopped_at) == {"mobile", "edge", "cloud"}, stopped_at
    assert max(stopped_at.values()) < 5, stopped_at  # not the cloud's 20 s
    assert cloud_samples == 0, "the cloud ran its slice for a cancelled call"


def test_the_deadline_travels_downstream_shorter_at_each_hop(tiny_artifacts: Path, tmp_path: Path) -> None:
    """A slow cloud: the caller's deadline reaches it as a gRPC deadline, less the margins of the
    tiers before it, so the edge still answers degraded in time and the client gets its answer."""
    flags = {"cloud": {"inject_delay_ms": 20_000}}
    with TierCluster(tiny_artifacts, flags=flags, log_dir=tmp_path) as cluster, \
            TierClient(cluster.entry_address) as client:
        started = time.monotonic()
        answers = client.classify(TEXTS[:2], TO_THE_CLOUD, timeout=1.0)
        waited = time.monotonic() - started
        time.sleep(0.2)
        cloud_deadlines = _errors(cluster.tiers["cloud"], "DEADLINE_EXCEEDED")
    assert waited < 1.0 and all(a.tier == "edge" and a.degraded for a in answers)
    assert "too slow" in answers[0].degraded_reason
    assert cloud_deadlines == 1


def test_a_call_to_a_next_tier_past_its_deadline_fails_with_deadline_exceeded(
        tiny_artifacts: Path, tmp_path: Path) -> None:
    size = load_manifest(tiny_artifacts).hidden_size
    tensors = encode_tensors({"hidden": np.zeros((1, 5, size), np.float32),
                              "attention_mask": np.ones((1, 5), np.int64)})
    with _tiers(start_tier("cloud", tiny_artifacts, tmp_path, flags={"inject_delay_ms": 2000})) as (cloud,):

        async def scenario() -> tuple[BaseException | list[pb2.Answer], ...]:
            next_tier = ContinuationClient(cloud.address)
            try:
                return tuple(await asyncio.gather(next_tier.continue_batch(tensors, ["short/0"], {}, 0.2),
                                                  next_tier.continue_batch(tensors, ["long/0"], {}, 10.0),
                                                  return_exceptions=True))
            finally:
                await next_tier.close()

        short, long = asyncio.run(scenario())
    assert isinstance(short, NextTierError) and short.next_status == "DEADLINE_EXCEEDED", short
    assert isinstance(long, list) and [a.request_id for a in long] == ["long/0"]


def _run_tier(tier: str, *flags: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"{tier}_node", *flags], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize(("flags", "says"), [
    (["--listen", "50199"], "'50199' has no host"),
    (["--listen", "127.0.0.1:http"], "expected a number"),
    (["--next", "a.example:1,b.example:2"], "a list of replicas takes IP addresses"),
])
def test_a_malformed_address_is_a_one_line_error(flags: list[str], says: str) -> None:
    result = _run_tier("mobile", *flags, "--metrics-port", "0")
    assert result.returncode == 2
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_grpc_port_in_use_is_an_error_not_a_shared_port(tiny_artifacts: Path, tmp_path: Path) -> None:
    with _tiers(start_tier("cloud", tiny_artifacts, tmp_path)) as (cloud,):
        result = _run_tier("cloud", "--listen", cloud.address, "--metrics-port", "0",
                           "--artifacts", str(tiny_artifacts))
        assert result.returncode == 2
        assert f"cannot listen on {cloud.address}: the port is in use" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_metrics_port_in_use_is_a_one_line_error(tiny_artifacts: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_tier("cloud", "--listen", f"127.0.0.1:{free_port()}", "--metrics-port", str(port),
                           "--artifacts", str(tiny_artifacts))
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_next_tier_is_a_warning_naming_it(tiny_artifacts: Path, tmp_path: Path) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    with _tiers(start_tier("edge", tiny_artifacts, tmp_path, nowhere)) as (edge,):
        started = time.monotonic()
        while "WARNING" not in edge.log_tail() and time.monotonic() - started < 20:
            time.sleep(0.2)
        log = edge.log_tail()
    assert f"no replica of the cloud tier at {nowhere}" in log, log


def test_classify_at_a_tier_that_is_not_the_entry_says_so(
        tiny_artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shared.tools.cli import main

    with _tiers(start_tier("cloud", tiny_artifacts, tmp_path)) as (cloud,):
        status = main(["classify", "--address", cloud.address, "a text"])
    assert status == 1
    assert "it is not an entry tier" in capsys.readouterr().err


def test_threads_share_one_client(cluster: TierCluster, client: TierClient) -> None:
    def classify(i: int) -> list[str]:
        return [a.request_id for a in client.classify(TEXTS[i % 5:i % 5 + 3], TO_THE_CLOUD, request_id=f"t{i}")]

    with futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(classify, range(32)))
    assert ids == [[f"t{i}/0", f"t{i}/1", f"t{i}/2"] for i in range(32)]


def test_an_undecodable_continue_is_invalid_argument(cluster: TierCluster) -> None:
    with grpc.insecure_channel(cluster.tiers["edge"].address) as channel:
        call = channel.unary_unary("/tierserve.v1.Continuation/Continue")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\x12\x02\xff\xfe", timeout=10)  # request_ids[0]: invalid UTF-8
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid tierserve.v1.ContinueRequest" in caught.value.details()


def test_a_stopping_edge_answers_its_calls_and_the_mobile_answers_degraded_meanwhile(
        tiny_artifacts: Path, tmp_path: Path) -> None:
    flags = {"edge": {"grace_seconds": 60}}
    with TierCluster(tiny_artifacts, flags=flags, log_dir=tmp_path) as started, \
            TierClient(started.entry_address) as tier_client:
        assert tier_client.classify(TEXTS[:4], TO_THE_CLOUD)[0].tier == "cloud"
        # stop() sends SIGKILL (exit status -9) if the tier has not exited 30 s after SIGTERM
        assert started.tiers["edge"].stop(timeout=30) == 0, "the edge waited out its grace period"
        answers = tier_client.classify(TEXTS[:4], TO_THE_CLOUD)
    assert [a.tier for a in answers] == ["mobile"] * 4 and all(a.degraded for a in answers)
