"""Forwards that leave a tier in the same event-loop iteration go to the next tier as one call.

The requests of one merged slice run (shared.serving.batching) reach their forward together, and
each would otherwise be a Continue call of its own: under load the calls' gRPC work costs both
tiers more CPU than the tensors they carry. ForwardCoalescer gathers the forwards submitted within
one loop iteration (no added wait: the flush is the loop's next callback), merges those with the
same threshold overrides and tensor shapes into calls of at most `max_samples` samples (sequences
right-padded with attention mask 0, as the batcher merges them) and gives each caller its own
answers, in its own order.

Deadlines: only forwards whose deadlines lie within DEADLINE_TOLERANCE of each other share a call,
which carries the earliest, so the next tier still plans its own forward and its degraded answer
for the most hurried caller; each caller also waits no longer than its own deadline. A caller
that goes (its RPC cancelled) leaves the others' call running; the call is cancelled downstream
when every caller has gone. A failed call fails each of its callers (each answers degraded, as
without coalescing). With `int8_tensor` (one scale per tensor) forwards are never merged: one
request's large values would crush its neighbours' precision.

A merged call is admitted or refused whole by the next tier (shared.serving.admission) and counts
as one call for the circuit breaker and the retries (shared.serving.next_tier), as a request of
that many samples would.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shared.serving.batching import merge
from shared.serving.next_tier import NextTierError
from shared.wire.codec import ATTENTION_MASK, encode_tensors
from shared.wire.rpc import pb2

# a call carries its earliest caller's deadline; callers whose deadlines are later by more than this
# (a share of the earliest, or seconds) go in a call of their own, so that none loses much of its time
DEADLINE_TOLERANCE = 0.1
DEADLINE_TOLERANCE_S = 0.010


@dataclass
class _Forward:
    arrays: Mapping[str, np.ndarray]
    request_ids: list[str]
    thresholds: dict[str, float]
    timeout: float | None
    future: asyncio.Future[list[pb2.Answer]]

    @property
    def size(self) -> int:
        return len(self.request_ids)


# continue_batch(tensors, request_ids, thresholds, timeout): shared.serving.tier.NextTier's
NextTierCall = Callable[[Mapping[str, pb2.Tensor], Sequence[str], Mapping[str, float], float | None],
                        Awaitable[list[pb2.Answer]]]


class ForwardCoalescer:
    """`await coalescer.forward(arrays, ids, thresholds, timeout)`: the next tier's answers to `arrays`
    (not encoded yet), sent in one call with the other forwards of this loop iteration."""

    def __init__(self, call: NextTierCall, name: str, encoding: str = "fp32", max_samples: int = 32,
                 record: Callable[[int, Mapping[str, pb2.Tensor]], None] = lambda samples, tensors: None) -> None:
        self.call = call
        self.name = name  # the next tier, for messages
        self.encoding = encoding  # shared.wire.codec.FLOAT_ENCODINGS
        self.max_samples = max_samples
        self.record = record  # (samples, encoded tensors) of each call sent
        self._pending: list[_Forward] = []
        self._flush_scheduled = False
        self._calls: set[asyncio.Task[None]] = set()

    async def forward(self, arrays: Mapping[str, np.ndarray], request_ids: Sequence[str],
                      thresholds: Mapping[str, float], timeout: float | None) -> list[pb2.Answer]:
        """Raises NextTierError (what the call raised, or DEADLINE_EXCEEDED when `timeout` passes first)."""
        loop = asyncio.get_running_loop()
        item = _Forward(arrays, list(request_ids), dict(thresholds), timeout, loop.create_future())
        self._pending.append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout)
        except TimeoutError:
            budget = "" if timeout is None else f" within {timeout * 1000:.0f} ms"
            raise NextTierError(f"{self.name} too slow: no answer{budget}", "DEADLINE_EXCEEDED") from None
        finally:
            item.future.cancel()  # no-op once answered; else the call learns this caller has gone

    def _flush(self) -> None:
        self._flush_scheduled = False
        groups: dict[tuple, list[_Forward]] = {}
        for item in self._pending:
            if not item.future.done():  # its caller went before the flush
                groups.setdefault(_merge_key(item), []).append(item)
        self._pending = []
        # int8_tensor's one scale per tensor would let one request's large values crush its neighbours'
        for group in groups.values():
            for members in _chunks(group, self.max_samples, merging=self.encoding != "int8_tensor"):
                task = asyncio.get_running_loop().create_task(self._send(members))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
                gone = functools.partial(_cancel_if_all_gone, members, task)
                for item in members:  # the call is cancelled once every caller has gone
                    item.future.add_done_callback(gone)

    async def _send(self, members: list[_Forward]) -> None:
        members = [m for m in members if not m.future.done()]  # callers gone since the flush send nothing
        try:
            if not members:
                return
            arrays = members[0].arrays if len(members) == 1 else merge(
                [m.arrays for m in members], _padded(members[0].arrays))
            tensors = encode_tensors(arrays, self.encoding)
            ids = [request_id for m in members for request_id in m.request_ids]
            self.record(len(ids), tensors)
            # the earliest deadline of the call (they are within DEADLINE_TOLERANCE: _chunks), so that
            # the next tier plans its own forward and its degraded answer for its most hurried caller
            answers = await self.call(tensors, ids, members[0].thresholds, members[0].timeout)
        except asyncio.CancelledError:  # every caller gone, or close()
            for m in members:
                m.future.cancel()
            raise
        except Exception as exc:  # NextTierError, or anything else: each caller raises it, none is left waiting
            for m in members:
                if not m.future.done():
                    m.future.set_exception(exc)
            return
        start = 0
        for m in members:
            if not m.future.done():
                m.future.set_result(answers[start:start + m.size])
            start += m.size

    async def close(self) -> None:
        """Cancel the calls in flight (their callers get CancelledError)."""
        for task in list(self._calls):
            task.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)


def _padded(arrays: Mapping[str, np.ndarray]) -> set[str]:
    """The tensors with a sequence axis (text: every one of rank >= 2 beside an attention mask)."""
    return {name for name, a in arrays.items() if a.ndim >= 2} if ATTENTION_MASK in arrays else set()


def _merge_key(item: _Forward) -> tuple:
    padded = _padded(item.arrays)
    shapes = tuple((name, a.dtype.str, a.shape[2:] if name in padded else a.shape[1:])
                   for name, a in sorted(item.arrays.items()))
    return tuple(sorted(item.thresholds.items())), shapes


def _chunks(group: list[_Forward], max_samples: int, merging: bool = True) -> list[list[_Forward]]:
    """Calls of at most max_samples samples (a larger forward goes alone) whose callers' deadlines lie
    within DEADLINE_TOLERANCE of the earliest; each forward alone when not `merging`."""
    chunks: list[list[_Forward]] = []
    size = 0
    for item in sorted(group, key=lambda m: (m.timeout is None, m.timeout or 0.0)):
        first = chunks[-1][0].timeout if chunks else None
        close = item.timeout is None if first is None else (
            item.timeout is not None and item.timeout - first <= max(DEADLINE_TOLERANCE_S, DEADLINE_TOLERANCE * first))
        if merging and chunks and size + item.size <= max_samples and close:
            chunks[-1].append(item)
            size += item.size
        else:
            chunks.append([item])
            size = item.size
    return chunks


def _cancel_if_all_gone(members: list[_Forward], task: asyncio.Task[None], _: object) -> None:
    if all(m.future.cancelled() for m in members):
        task.cancel()
