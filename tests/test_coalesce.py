"""Coalesced forwards (shared.serving.coalesce): the forwards of one loop iteration go as one call,
each caller gets exactly its own answers and keeps its own deadline, a caller that goes leaves the
others' call alone, and through real tiers the answers are those of a call per request."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest

from bench.common import scrape
from shared.client import TierClient
from shared.serving.coalesce import ForwardCoalescer
from shared.serving.next_tier import NextTierError
from shared.tools.processes import running_tiers
from shared.wire.codec import decode_tensors
from shared.wire.rpc import pb2
from tests.tiny_model import sentence

HIDDEN = 4


class RecordingNextTier:
    """Stands in for the next tier's client: records each call and answers after `delay` seconds."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.calls: list[tuple[dict[str, np.ndarray], list[str], dict[str, float], float | None]] = []
        self.cancelled = 0

    async def __call__(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                      thresholds: Mapping[str, float], timeout: float | None) -> list[pb2.Answer]:
        self.calls.append((decode_tensors(tensors), list(request_ids), dict(thresholds), timeout))
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        return [pb2.Answer(request_id=r, tier="edge") for r in request_ids]


def forward_arrays(widths: list[int], seed: int) -> dict[str, np.ndarray]:
    """A forwarded text batch: hidden states [n, width, HIDDEN] and an unpadded-prefix mask."""
    rng = np.random.default_rng(seed)
    width = max(widths)
    mask = np.zeros((len(widths), width), np.int64)
    for row, n in enumerate(widths):
        mask[row, :n] = 1
    hidden = rng.standard_normal((len(widths), width, HIDDEN)).astype(np.float32) * mask[..., None]
    return {"hidden": hidden, "attention_mask": mask}


def ids(request: int, count: int) -> list[str]:
    return [f"r{request}/{i}" for i in range(count)]


async def _forward_all(coalescer: ForwardCoalescer, requests: list[dict[str, np.ndarray]],
                       thresholds: list[dict[str, float]] | None = None,
                       timeouts: list[float | None] | None = None) -> list[list[pb2.Answer] | BaseException]:
    return await asyncio.gather(*(
        coalescer.forward(r, ids(i, len(r["hidden"])), (thresholds or [{}] * len(requests))[i],
                          (timeouts or [None] * len(requests))[i])
        for i, r in enumerate(requests)), return_exceptions=True)


def test_forwards_of_one_iteration_go_as_one_call_and_each_gets_its_own_answers() -> None:
    requests = [forward_arrays([3, 2], 0), forward_arrays([5], 1), forward_arrays([1, 4, 2], 2)]
    next_tier = RecordingNextTier()
    got = asyncio.run(_forward_all(ForwardCoalescer(next_tier, "edge"), requests))

    assert len(next_tier.calls) == 1
    arrays, sent_ids, _, _ = next_tier.calls[0]
    assert sent_ids == ids(0, 2) + ids(1, 1) + ids(2, 3)
    for i, answers in enumerate(got):
        assert [a.request_id for a in answers] == ids(i, len(requests[i]["hidden"]))  # type: ignore[union-attr]
    # each request's rows, right-padded to the widest with mask 0 (the next slice masks the padding)
    row = 0
    for r in requests:
        n, width = r["attention_mask"].shape
        np.testing.assert_array_equal(arrays["attention_mask"][row:row + n, :width], r["attention_mask"])
        assert not arrays["attention_mask"][row:row + n, width:].any()
        np.testing.assert_array_equal(arrays["hidden"][row:row + n, :width], r["hidden"])
        row += n


def test_other_thresholds_or_too_many_samples_make_separate_calls() -> None:
    requests = [forward_arrays([2] * 3, i) for i in range(4)]
    next_tier = RecordingNextTier()
    thresholds = [{}, {"edge": 0.5}, {}, {}]
    asyncio.run(_forward_all(ForwardCoalescer(next_tier, "edge", max_samples=6), requests, thresholds))

    sent = sorted((tuple(call[2].items()), call[1]) for call in next_tier.calls)
    assert sent == sorted([((), ids(0, 3) + ids(2, 3)), ((), ids(3, 3)), ((("edge", 0.5),), ids(1, 3))])


def test_callers_with_close_deadlines_share_a_call_that_carries_the_earliest() -> None:
    next_tier = RecordingNextTier()
    requests = [forward_arrays([2], 0), forward_arrays([3], 1), forward_arrays([1], 2), forward_arrays([2], 3)]
    asyncio.run(_forward_all(ForwardCoalescer(next_tier, "edge"), requests, timeouts=[1.05, 1.0, None, None]))

    calls = sorted((call[1], call[3]) for call in next_tier.calls)
    assert calls == [(ids(1, 1) + ids(0, 1), 1.0), (ids(2, 1) + ids(3, 1), None)]


def test_a_caller_with_a_much_earlier_deadline_goes_alone_and_times_out_alone() -> None:
    next_tier = RecordingNextTier(delay=0.3)
    requests = [forward_arrays([2], 0), forward_arrays([3], 1)]

    async def scenario() -> list[list[pb2.Answer] | BaseException]:
        got = await asyncio.wait_for(_forward_all(ForwardCoalescer(next_tier, "edge"), requests,
                                                  timeouts=[0.05, 2.0]), 5)
        await asyncio.sleep(0.01)
        return got

    got = asyncio.run(scenario())
    assert isinstance(got[0], NextTierError) and got[0].next_status == "DEADLINE_EXCEEDED"
    assert got[0].kind == "deadline" and "within 50 ms" in str(got[0])
    assert [a.request_id for a in got[1]] == ids(1, 1)  # type: ignore[union-attr]
    assert sorted(call[3] for call in next_tier.calls) == [0.05, 2.0]  # type: ignore[type-var]
    assert next_tier.cancelled == 1  # the call of the caller that went is cancelled downstream


def test_the_call_is_cancelled_only_when_every_caller_has_gone() -> None:
    async def scenario(cancel: list[int]) -> tuple[int, list[object]]:
        next_tier = RecordingNextTier(delay=0.3)
        coalescer = ForwardCoalescer(next_tier, "edge")
        tasks = [asyncio.create_task(coalescer.forward(forward_arrays([2], i), ids(i, 1), {}, None)) for i in range(3)]
        await asyncio.sleep(0.05)  # the call is out
        for i in cancel:
            tasks[i].cancel()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await asyncio.sleep(0.01)  # the call's own cancellation runs
        return next_tier.cancelled, done

    cancelled, done = asyncio.run(scenario([0, 2]))
    assert cancelled == 0
    assert isinstance(done[0], asyncio.CancelledError) and isinstance(done[2], asyncio.CancelledError)
    assert [a.request_id for a in done[1]] == ids(1, 1)  # type: ignore[attr-defined]

    cancelled, done = asyncio.run(scenario([0, 1, 2]))
    assert cancelled == 1  # cancelling the task cancels the gRPC call downstream
    assert all(isinstance(d, asyncio.CancelledError) for d in done)


@pytest.mark.parametrize("failure", [NextTierError("edge unavailable", "UNAVAILABLE"), RuntimeError("a bug")])
def test_a_failed_call_fails_each_of_its_callers(failure: Exception) -> None:
    async def scenario() -> list[list[pb2.Answer] | BaseException]:
        coalescer = ForwardCoalescer(RecordingNextTier(fail=failure), "edge")
        return await asyncio.wait_for(_forward_all(coalescer, [forward_arrays([2], 0), forward_arrays([3, 1], 1)]), 5)

    assert asyncio.run(scenario()) == [failure, failure]


def test_close_cancels_the_calls_in_flight_and_their_callers() -> None:
    async def scenario() -> tuple[int, list[object]]:
        next_tier = RecordingNextTier(delay=5)
        coalescer = ForwardCoalescer(next_tier, "edge")
        tasks = [asyncio.create_task(coalescer.forward(forward_arrays([2], i), ids(i, 1), {}, None)) for i in range(2)]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(coalescer.close(), 5)
        return next_tier.cancelled, await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)

    cancelled, done = asyncio.run(scenario())
    assert cancelled == 1 and all(isinstance(d, asyncio.CancelledError) for d in done)


def test_int8_tensor_forwards_are_never_merged() -> None:
    """One scale per tensor: a neighbour's large values would crush a request's precision."""
    next_tier = RecordingNextTier()
    requests = [forward_arrays([2], 0), forward_arrays([3], 1)]
    requests[1]["hidden"] *= 1000
    asyncio.run(_forward_all(ForwardCoalescer(next_tier, "edge", encoding="int8_tensor"), requests))
    assert sorted(call[1] for call in next_tier.calls) == [ids(0, 1), ids(1, 1)]
    np.testing.assert_allclose(next_tier.calls[0][0]["hidden"], requests[0]["hidden"], atol=0.02)


def test_through_real_tiers_coalesced_forwards_answer_as_a_call_per_request(tiny_artifacts: Path) -> None:
    """Concurrent requests that the mobile tier batches (it waits up to 300 ms for them) reach the edge
    in fewer calls than requests with coalescing, in one call per request without, with the same answers."""
    rng = np.random.default_rng(5)
    texts = [sentence(rng, i % 2, 3) for i in range(16)]
    # every sample goes on to the cloud, so that each request forwards at both hops
    mobile = {"threshold": 2.0, "max_queue_delay_ms": 300}
    results = {}
    for coalesce in (True, False):
        flags = {"mobile": {**mobile, "coalesce_forwards": coalesce},
                 "edge": {"threshold": 2.0, "coalesce_forwards": coalesce}}
        with running_tiers(tiny_artifacts, flags=flags) as cluster, \
                TierClient(cluster.entry_address, timeout=30) as client, futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda text: client.classify([text])[0], texts))
            edge = cluster.tiers["edge"]
            calls = sum(v for (name, labels), v in scrape(edge.metrics_port).items()
                        if name == "tierserve_request_duration_seconds_count" and ("tier", "edge") in labels)
        results[coalesce] = ([(a.label, a.tier, round(a.confidence, 5)) for a in answers], calls)

    assert results[True][0] == results[False][0]
    assert all(tier == "cloud" for _, tier, _ in results[True][0])
    assert results[False][1] == len(texts)
    assert results[True][1] < len(texts)
