"""Dynamic batching in front of a tier's slice: concurrent requests run as one slice call.

Requests queue; one consumer task takes them in arrival order, up to `max_batch_size` samples
(a request larger than that runs alone, never split), and runs them as one batch. The first
request waits at most `max_queue_delay` for others while the slice is idle; requests that queue
while a batch runs go out together as soon as it ends, so batches form under load without any
added wait (delay 0 keeps only that). Text tensors are padded only to the longest sequence of the
merged batch (attention_mask 0 on the padding) and every output is cut back to its request's rows
and sequence length, so each sample still exits on its own. Padding costs compute (on a CPU a batch
gains little per sample), so a request joins a batch only while the batch's padded
tokens stay within `max_padding` (0.15: 15%) over the tokens of its requests' own widths; the
oldest request always goes first and the others are tried nearest width first.

A small request (at most `inline_max_samples`; 0, the default here, turns this off) runs at once
on the event loop's thread when the tier is lightly loaded: it is alone (`alone()`: the servicer's
in-flight count), nothing is queued, and the slice has been idle at least as long as its last run
took: the hand-off to the worker thread and back is a noticeable share of a small slice's run
at batch 1. Under load requests take the worker thread, so that they batch and the loop keeps decoding and
answering while the slice runs (the in-flight count alone cannot tell: a blocked loop starts the
next request only after this one).

Which tensors carry a sequence axis is read from the slice: with an attention_mask input, every
input of rank >= 2 shares its first two dimensions (SliceRunner.check_inputs enforces it), and an
output has one when its axis 1 bears the mask's dynamic dimension name. Inputs without a mask
(images) have fixed shapes and are only concatenated.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.serving.metrics import TierMetrics
from shared.serving.runner import SliceResult, SliceRunner
from shared.wire.codec import ATTENTION_MASK

MAX_PADDING = 0.15


@dataclass
class _Waiting:
    arrays: Mapping[str, np.ndarray]
    size: int
    future: asyncio.Future[SliceResult]
    arrived: float
    key: tuple = field(default=())  # requests merge only with equal keys (non-padded dims)
    width: int = 0  # sequence length (padded tensors), else 0


def merge(requests: Sequence[Mapping[str, np.ndarray]], padded: set[str]) -> dict[str, np.ndarray]:
    """One batch from several requests' inputs; `padded` tensors are right-padded on axis 1 with 0."""
    merged = {}
    for name in requests[0]:
        parts = [r[name] for r in requests]
        if name in padded:
            width = max(p.shape[1] for p in parts)
            out = np.zeros((sum(len(p) for p in parts), width, *parts[0].shape[2:]), parts[0].dtype)
            row = 0
            for p in parts:
                out[row:row + len(p), :p.shape[1]] = p
                row += len(p)
            merged[name] = out
        else:
            merged[name] = np.concatenate(parts)
    return merged


def split(outputs: Mapping[str, np.ndarray], sizes: Sequence[int], widths: Sequence[int | None],
          trimmed: set[str]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of `outputs`; `trimmed` outputs cut back to the request's own width."""
    parts, row = [], 0
    for size, width in zip(sizes, widths, strict=True):
        part = {}
        for name, array in outputs.items():
            piece = array[row:row + size]
            if name in trimmed and width is not None:
                piece = piece[:, :width]
            part[name] = np.ascontiguousarray(piece)
        parts.append(part)
        row += size
    return parts


class Batcher:
    """`await batcher.run(inputs)`: the same SliceResult as runner.run, batched with its neighbours."""

    def __init__(self, runner: SliceRunner, max_batch_size: int, max_queue_delay: float,
                 metrics: TierMetrics | None = None, max_padding: float = MAX_PADDING,
                 inline_max_samples: int = 0, alone: Callable[[], bool] = lambda: True,
                 concurrency: int = 1) -> None:
        self.runner = runner
        self.concurrency = concurrency  # batches running at once (the runner needs as many workers)
        self.inline_max_samples = inline_max_samples
        self.alone = alone
        self._idle_since = -math.inf  # loop time the last run ended
        self._last_seconds = 0.0  # how long it took
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_padding = max_padding
        self.metrics = metrics
        names = {s.name: s for s in runner.inputs}
        mask = names.get(ATTENTION_MASK)
        self.padded = {s.name for s in runner.inputs if mask is not None and len(s.shape) >= 2}
        seq_dim = mask.shape[1] if mask is not None and len(mask.shape) == 2 else None
        self.trimmed = {s.name for s in runner.outputs if mask is not None and len(s.shape) >= 2
                        and (s.shape[1] == seq_dim if isinstance(seq_dim, str) else len(s.shape) >= 3)}
        self._waiting: list[_Waiting] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()  # running on the worker threads, or about to
        self._slots: asyncio.Semaphore | None = None

    async def run(self, arrays: Mapping[str, np.ndarray]) -> SliceResult:
        size = len(next(iter(arrays.values())))
        loop = asyncio.get_running_loop()
        if (size <= self.inline_max_samples and not self._batches and not self._waiting
                and loop.time() - self._idle_since >= self._last_seconds and self.alone()):
            return self._run_inline(arrays, size)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._consume(), name=f"{self.runner.tier}-batcher")
        key = tuple((n, a.shape[2:] if n in self.padded else a.shape[1:]) for n, a in sorted(arrays.items()))
        width = arrays[ATTENTION_MASK].shape[1] if self.padded else 0
        waiting = _Waiting(arrays, size, loop.create_future(), loop.time(), key, width)
        self._waiting.append(waiting)
        self._wakeup.set()
        return await waiting.future

    def _queued(self, key: tuple) -> int:
        return sum(w.size for w in self._waiting if w.key == key)

    def _take(self) -> list[_Waiting]:
        """The oldest request, and others of its key (nearest width first) while the batch stays
        within max_batch_size samples and max_padding."""
        first = self._waiting[0]
        taken, total = [first], first.size
        width, own = first.width, first.size * first.width  # padded width, tokens at own widths
        others = sorted((w for w in self._waiting[1:] if w.key == first.key), key=lambda w: abs(w.width - first.width))
        for w in others:
            if total + w.size > self.max_batch_size:
                continue
            wider, more = max(width, w.width), own + w.size * w.width
            if (total + w.size) * wider > (1 + self.max_padding) * more:
                continue
            taken.append(w)
            total, width, own = total + w.size, wider, more
        chosen = {id(w) for w in taken}
        self._waiting = [w for w in self._waiting if id(w) not in chosen]
        return taken

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        self._slots = self._slots or asyncio.Semaphore(self.concurrency)
        while True:
            self._drop_cancelled()
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._waiting[0]
            while self._queued(first.key) < self.max_batch_size:
                left = first.arrived + self.max_queue_delay - loop.time()
                if left <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), left)
            await self._slots.acquire()  # requests arriving meanwhile join the batch taken next
            self._drop_cancelled()  # callers may have gone while it waited for a slot
            if not self._waiting:
                self._slots.release()
                continue
            task = loop.create_task(self._run_batch(self._take()))
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _drop_cancelled(self) -> None:
        self._waiting = [w for w in self._waiting if not w.future.done()]

    def _batch_done(self, task: asyncio.Task) -> None:
        self._batches.discard(task)
        if self._slots is not None:
            self._slots.release()

    def _run_inline(self, arrays: Mapping[str, np.ndarray], size: int) -> SliceResult:
        result = self.runner.run_sync(arrays)
        self._observe(size, result)
        return result

    def _observe(self, size: int, result: SliceResult) -> None:
        self._idle_since, self._last_seconds = asyncio.get_running_loop().time(), result.compute_seconds
        if self.metrics is not None:
            self.metrics.series.batch_size.observe(size)
            self.metrics.series.compute_duration.observe(result.compute_seconds)

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        try:
            merged = batch[0].arrays if len(batch) == 1 else merge([w.arrays for w in batch], self.padded)
            result = await self.runner.run(merged)
            self._observe(sum(w.size for w in batch), result)
            if len(batch) == 1:
                parts = [result.outputs]
            else:
                mask = ATTENTION_MASK if self.padded else None
                widths = [w.arrays[mask].shape[1] if mask else None for w in batch]
                parts = split(result.outputs, [w.size for w in batch], widths, self.trimmed)
        except asyncio.CancelledError:
            for w in batch:
                if not w.future.done():
                    w.future.cancel()
            raise
        except Exception as exc:  # each caller gets the failure of its batch
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
            return
        for w, outputs in zip(batch, parts, strict=True):
            if not w.future.done():
                w.future.set_result(SliceResult(outputs, result.compute_seconds))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._batches):
            task.cancel()
        for w in self._waiting:
            if not w.future.done():
                w.future.cancel()
