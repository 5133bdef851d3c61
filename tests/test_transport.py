"""Calls on one long-lived stream (ContinueStream between tiers, ClassifyStream from the clients:
the default) and as unary calls (Continue, Classify).

All against real servers on 127.0.0.1: tier processes, or an in-process gRPC server standing in
for an older tier that has no streaming method.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from shared import LOW_LATENCY_EXPERIMENTS
from shared.client import TierClient
from shared.contract.manifest import load_manifest
from shared.serving.next_tier import ContinuationClient, NextTierError
from shared.serving.streaming import ReadPause, start_eagerly
from shared.tools.processes import TierCluster, TierProcess, free_port, running_tiers, start_tier, wait_until_serving
from shared.wire.codec import encode_tensors
from shared.wire.rpc import pb2, pb2_grpc
from tests.tiny_model import sentence

TO_THE_CLOUD = {"mobile": 1.01, "edge": 1.01}
_rng = np.random.default_rng(11)
TEXTS = [sentence(_rng, i % 2, 3) for i in range(24)]
UNARY = {"forward_transport": "unary"}


def _hidden(artifacts: Path, tokens: int = 5) -> dict[str, pb2.Tensor]:
    """A valid input of the cloud slice, encoded: one sample's hidden state and its mask."""
    size = load_manifest(artifacts).hidden_size
    return encode_tensors({"hidden": np.random.default_rng(0).normal(size=(1, tokens, size)).astype(np.float32),
                           "attention_mask": np.ones((1, tokens), dtype=np.int64)})


@pytest.fixture(scope="module")
def slow_cloud(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TierProcess]:
    """A cloud tier that takes 300 ms per call."""
    cloud = start_tier("cloud", tiny_artifacts, tmp_path_factory.mktemp("slow_cloud"),
                       flags={"inject_delay_ms": 300})
    try:
        wait_until_serving([cloud], timeout=60)
        yield cloud
    finally:
        cloud.stop()


def test_stream_and_unary_forwarding_give_the_same_answers(
        cluster: TierCluster, client: TierClient, tiny_artifacts: Path) -> None:
    streamed = client.classify(TEXTS, TO_THE_CLOUD)
    with (running_tiers(tiny_artifacts, flags={"mobile": UNARY, "edge": UNARY}) as unary_cluster,
          TierClient(unary_cluster.entry_address) as unary_client):
        unary = unary_client.classify(TEXTS, TO_THE_CLOUD)
    assert [a.tier for a in streamed] == ["cloud"] * len(TEXTS)
    assert [(a.label, a.tier, a.degraded) for a in streamed] == [(a.label, a.tier, a.degraded) for a in unary]
    assert np.allclose([list(a.probabilities) for a in streamed], [list(a.probabilities) for a in unary])


def test_concurrent_calls_share_one_stream_and_a_cancelled_caller_leaves_the_others_alone(
        slow_cloud: TierProcess, tiny_artifacts: Path) -> None:
    tensors = _hidden(tiny_artifacts)

    async def scenario() -> tuple[list[list[str]], list[str]]:
        next_tier = ContinuationClient(slow_cloud.address)
        try:
            calls = [asyncio.create_task(next_tier.continue_batch(tensors, [f"call{i}/0"], {}, 10.0))
                     for i in range(6)]
            await asyncio.sleep(0.1)
            calls[0].cancel()
            answered = [[a.request_id for a in await call] for call in calls[1:]]
            after = await next_tier.continue_batch(tensors, ["after/0"], {}, 10.0)
            return answered, [a.request_id for a in after]
        finally:
            await next_tier.close()

    answered, after = asyncio.run(scenario())
    assert answered == [[f"call{i}/0"] for i in range(1, 6)]
    assert after == ["after/0"]


def test_a_call_past_its_deadline_fails_alone(slow_cloud: TierProcess, tiny_artifacts: Path) -> None:
    tensors = _hidden(tiny_artifacts)

    async def scenario() -> tuple[BaseException | list[pb2.Answer], ...]:
        next_tier = ContinuationClient(slow_cloud.address)
        try:
            return tuple(await asyncio.gather(next_tier.continue_batch(tensors, ["short/0"], {}, 0.05),
                                              next_tier.continue_batch(tensors, ["long/0"], {}, 10.0),
                                              return_exceptions=True))
        finally:
            await next_tier.close()

    short, long = asyncio.run(scenario())
    assert isinstance(short, NextTierError) and short.code == "DEADLINE_EXCEEDED", short
    assert isinstance(long, list) and [a.request_id for a in long] == ["long/0"]


class OnlyUnaryContinue(pb2_grpc.ContinuationServicer):
    """A next tier from before ContinueStream: the generated base answers it UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.calls = 0

    async def Continue(self, request: pb2.ContinueRequest, context: grpc.aio.ServicerContext) -> pb2.ContinueResponse:
        self.calls += 1
        return pb2.ContinueResponse(answers=[pb2.Answer(request_id=i, tier="cloud") for i in request.request_ids])


def test_a_next_tier_without_streams_is_called_with_continue(tiny_artifacts: Path) -> None:
    tensors = _hidden(tiny_artifacts)

    async def scenario() -> tuple[list[str], list[str], int]:
        servicer = OnlyUnaryContinue()
        server = grpc.aio.server()
        pb2_grpc.add_ContinuationServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        next_tier = ContinuationClient(f"127.0.0.1:{port}")
        try:
            first = await next_tier.continue_batch(tensors, ["a/0"], {}, 10.0)
            second = await next_tier.continue_batch(tensors, ["b/0"], {}, 10.0)
            return [a.request_id for a in first], [a.request_id for a in second], servicer.calls
        finally:
            await next_tier.close()
            await server.stop(0)

    first, second, calls = asyncio.run(scenario())
    assert (first, second, calls) == (["a/0"], ["b/0"], 2)


def test_an_undecodable_message_on_the_stream_is_invalid_argument(cluster: TierCluster) -> None:
    with grpc.insecure_channel(cluster.tiers["edge"].address) as channel:
        stream = channel.stream_stream("/tierserve.v1.Continuation/ContinueStream")
        responses = stream(iter([b"\x12\x02\xff\xfe"]), timeout=10)  # request_ids[0]: invalid UTF-8
        with pytest.raises(grpc.RpcError) as caught:
            list(responses)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid tierserve.v1.ContinueRequest" in caught.value.details()


def test_a_stopping_tier_ends_its_streams_without_waiting_out_the_grace(
        tiny_artifacts: Path, tmp_path: Path) -> None:
    """An open stream from the mobile tier must not hold the edge's shutdown for its whole grace
    period; requests sent meanwhile are answered (degraded, by the mobile exit), none lost."""
    flags = {"edge": {"grace_seconds": 60}}
    with (running_tiers(tiny_artifacts, flags=flags, log_dir=tmp_path) as started,
          TierClient(started.entry_address) as tier_client):
        assert tier_client.classify(TEXTS[:4], TO_THE_CLOUD)[0].tier == "cloud"  # the stream is open
        # stop() sends SIGKILL (exit status -9) if the tier has not exited 30 s after SIGTERM
        assert started.tiers["edge"].stop(timeout=30) == 0, "the edge waited on the open stream"
        answers = tier_client.classify(TEXTS[:4], TO_THE_CLOUD)
    assert [a.tier for a in answers] == ["mobile"] * 4 and all(a.degraded for a in answers)


def test_the_client_gives_the_same_answers_and_errors_on_a_stream_and_unary(
        cluster: TierCluster, client: TierClient) -> None:
    with TierClient(cluster.entry_address, transport="unary") as unary:
        for thresholds in (TO_THE_CLOUD, {"mobile": 0.0}, None):
            streamed, called = client.classify(TEXTS, thresholds), unary.classify(TEXTS, thresholds)
            assert [(a.label, a.tier, a.index) for a in streamed] == [(a.label, a.tier, a.index) for a in called]
        errors = []
        for tier_client in (client, unary):
            with pytest.raises(grpc.RpcError) as caught:
                tier_client.classify(["fine", "  "])
            errors.append((caught.value.code(), caught.value.details()))
    assert errors[0] == errors[1] == (grpc.StatusCode.INVALID_ARGUMENT, "text 1 is empty")


def test_threads_share_one_client(cluster: TierCluster, client: TierClient) -> None:
    def classify(i: int) -> list[str]:
        return [a.request_id for a in client.classify(TEXTS[i % 5:i % 5 + 3], TO_THE_CLOUD, request_id=f"t{i}")]

    with futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(classify, range(32)))
    assert ids == [[f"t{i}/0", f"t{i}/1", f"t{i}/2"] for i in range(32)]


class OnlyUnaryClassify(pb2_grpc.ClassifierServicer):
    """An entry tier from before ClassifyStream (blocking server): the generated base answers it UNIMPLEMENTED."""

    def Classify(self, request: pb2.ClassifyRequest, context: grpc.ServicerContext) -> pb2.ClassifyResponse:
        return pb2.ClassifyResponse(answers=[pb2.Answer(request_id=f"{request.request_id}/{i}", label="old")
                                             for i in range(len(request.texts))])


def test_a_client_of_an_entry_tier_without_streams_calls_classify() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb2_grpc.add_ClassifierServicer_to_server(OnlyUnaryClassify(), server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    try:
        with TierClient(f"127.0.0.1:{port}", timeout=10) as old_tier_client:
            first = old_tier_client.classify(["a", "b"], request_id="r1")
            second = old_tier_client.classify(["c"], request_id="r2")
    finally:
        server.stop(0)
    assert [(a.request_id, a.label) for a in first + second] == [("r1/0", "old"), ("r1/1", "old"), ("r2/0", "old")]


def test_start_eagerly_runs_the_first_step_at_once_then_behaves_as_a_task() -> None:
    steps: list[str] = []

    async def work(value: int, fail: bool = False) -> int:
        steps.append(f"first {value}")
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.01)  # a future
        if fail:
            raise ValueError(value)
        return value * 2

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            steps.append("cancelled inside")
            raise

    async def immediate() -> str:
        return "at once"

    async def scenario() -> tuple[int, str]:
        doubled = start_eagerly(work(21))
        steps.append("caller")
        failing = start_eagerly(work(1, fail=True))
        with pytest.raises(ValueError):
            await failing
        waiting = start_eagerly(forever())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return await doubled, await start_eagerly(immediate())

    assert asyncio.run(scenario()) == (42, "at once")
    assert steps == ["first 21", "caller", "first 1", "cancelled inside"]


def test_deadlines_hold_with_the_lean_server_and_channel_options() -> None:
    """server_options drops the deadline filter, channel_options the client's: a handler still
    sees the caller's deadline, and a call to a slow handler still fails at its deadline."""
    from shared.wire.rpc import channel_options, server_options

    async def remaining(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return str(context.time_remaining()).encode()

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(30)
        return b"late"

    async def scenario() -> tuple[float, grpc.StatusCode, float]:
        server = grpc.aio.server(options=server_options())
        handlers = {"Remaining": grpc.unary_unary_rpc_method_handler(remaining),
                    "Slow": grpc.unary_unary_rpc_method_handler(slow)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
                seen = float(await channel.unary_unary("/t.T/Remaining")(b"", timeout=5))
                started = time.perf_counter()
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await channel.unary_unary("/t.T/Slow")(b"", timeout=0.2)
                return seen, failed.value.code(), time.perf_counter() - started
        finally:
            await server.stop(0)

    seen, code, waited = asyncio.run(scenario())
    # the deadline arrives in grpc-timeout units, rounded up: a little over 5 s may remain
    assert 0 < seen < 6 and code == grpc.StatusCode.DEADLINE_EXCEEDED and waited < 10  # not the handler's 30 s


def test_a_read_pause_ends_after_its_delay_or_when_opened() -> None:
    async def scenario() -> tuple[float, float]:
        pause = ReadPause()
        pause.open()  # nobody waits: nothing happens
        loop = asyncio.get_running_loop()
        started = loop.time()
        await pause.wait(0.05)
        waited = loop.time() - started
        started = loop.time()
        loop.call_later(0.01, pause.open)
        await pause.wait(30)
        return waited, loop.time() - started

    waited, opened = asyncio.run(scenario())
    assert waited >= 0.05 and opened < 5


# prints GRPC_EXPERIMENTS as it is when the grpc package is imported (by shared.client, here)
_EXPERIMENTS_AT_GRPC_IMPORT = textwrap.dedent("""
    import os, sys

    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name == "grpc":
                print(repr(os.environ.get("GRPC_EXPERIMENTS")))
                sys.meta_path.remove(self)

    sys.meta_path.insert(0, Watch())
    import shared.client
""")


@pytest.mark.parametrize(("preset", "expected"), [(None, LOW_LATENCY_EXPERIMENTS), ("", "")])
def test_grpc_experiments_are_set_before_grpc_is_imported(preset: str | None, expected: str) -> None:
    """gRPC reads GRPC_EXPERIMENTS once, at import: tierserve sets it before that, unless the process
    set it itself (an empty value keeps gRPC's defaults)."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if preset is not None:
        env["GRPC_EXPERIMENTS"] = preset
    probe = subprocess.run([sys.executable, "-c", _EXPERIMENTS_AT_GRPC_IMPORT], env=env, capture_output=True,
                           text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert probe.stdout.strip() == repr(expected)
