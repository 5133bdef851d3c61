"""The tier loop, written once for every tier (shared.serving.servicers calls it).

Per request: run the slice, softmax(logits / T) with this exit's temperature, answer the samples
whose confidence >= threshold (the last tier answers all), forward the rest as one smaller batch
to the next tier, merge the answers back in request order. This is the online form of
shared.contract.policy.route, and gives the same decisions.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from shared.contract.calibration import softmax_rows
from shared.contract.manifest import TIERS, Manifest, Tier
from shared.errors import ArtifactError, InvalidInput, SliceFailure
from shared.serving.audit import Auditor, EarlyExit
from shared.serving.batching import Batcher
from shared.serving.coalesce import ForwardCoalescer
from shared.serving.metrics import TierMetrics
from shared.serving.next_tier import NextTierError
from shared.serving.runner import ATTENTION_MASK, SliceResult, SliceRunner
from shared.wire.codec import all_finite, encode_tensors, is_unpadded_mask, wire_bytes
from shared.wire.rpc import pb2

LOGITS = "logits"
MAX_REQUEST_ID_CHARS = 128
MAX_SAMPLE_ID_CHARS = MAX_REQUEST_ID_CHARS + 8  # "<request id>/<index>"
DEADLINE_MARGIN_SHARE = 0.05  # of the caller's time left, kept back for this tier's own answer (at least)
DEGRADED_LOG_INTERVAL = 10.0  # seconds between warnings about degraded answers, at most
log = logging.getLogger("tierserve.tier")


class NextTier(Protocol):
    """Where a tier sends what it cannot answer (shared.serving.next_tier.GuardedNextTier over gRPC), the
    tensors encoded already (shared.wire.codec.encode_tensors)."""

    async def continue_batch(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None, audit: bool = False
                             ) -> list[pb2.Answer]: ...


def check_thresholds(thresholds: Mapping[str, float]) -> dict[str, float]:
    """Per-request threshold overrides, validated: keys mobile/edge, finite values >= 0."""
    early_exits = TIERS[:-1]
    for tier, value in thresholds.items():
        if tier not in early_exits:
            raise InvalidInput(
                f"threshold for unknown or last tier '{tier}': thresholds apply to "
                f"{', '.join(early_exits)} (the {TIERS[-1]} always answers)")
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(f"threshold for {tier} is {value}; it must be a finite number >= 0")
    return dict(thresholds)


def sample_ids(request_id: str, count: int) -> list[str]:
    """One id per sample of a request, `<request id>/<index>` (a random request id when none is given).

    Every answer carries its id: a long one would multiply into every answer of the request."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInput(f"the request id has {len(request_id)} characters, at most {MAX_REQUEST_ID_CHARS}")
    prefix = request_id or uuid.uuid4().hex[:16]
    return [f"{prefix}/{i}" for i in range(count)]


def check_sample_ids(ids: Sequence[str]) -> None:
    """Sample ids from the tier before (sample_ids' form) are at most MAX_SAMPLE_ID_CHARS long."""
    for i, sample_id in enumerate(ids):
        if len(sample_id) > MAX_SAMPLE_ID_CHARS:
            raise InvalidInput(f"request id {i} has {len(sample_id)} characters, at most {MAX_SAMPLE_ID_CHARS}")


def without_padding(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arrays` without the sequence columns that are padding in every row (views)."""
    mask = arrays.get(ATTENTION_MASK)
    if mask is None or not mask.size or is_unpadded_mask(mask) or mask[:, -1].any():
        return dict(arrays)
    width = int(np.flatnonzero(mask.any(axis=0))[-1]) + 1
    return {name: a[:, :width] if a.ndim >= 2 and a.shape[1] == mask.shape[1] else a for name, a in arrays.items()}


def forwarded_tensors(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                      forwards: Mapping[str, str], rows: Sequence[int]) -> dict[str, np.ndarray]:
    """The next slice's inputs for the samples in `rows`.

    forwards: next input name -> the name of this slice's output (or input, passed through, like
    the attention mask) that feeds it. Columns that are padding in every kept row are dropped.
    The arrays may be views: encode_tensors copies them.
    """
    picked = {name: outputs[source] if source in outputs else inputs[source] for name, source in forwards.items()}
    if len(rows) != len(next(iter(picked.values()))):
        picked = {name: a[rows] for name, a in picked.items()}
    return without_padding(picked)


def check_outputs(tier: str, outputs: Mapping[str, np.ndarray]) -> None:
    """A slice's float outputs must be finite: NaN or infinity is this tier's failure, never an answer."""
    for name, array in outputs.items():
        if not all_finite(array):
            log.warning("the %s slice produced non-finite values in '%s'", tier, name)
            raise SliceFailure(f"the {tier} slice produced non-finite values in '{name}' for this input")


@dataclass
class TierLoop:
    """One tier's share of a request: its slice, its exit, and the hand-off to the next tier."""

    manifest: Manifest
    tier: Tier
    runner: SliceRunner
    metrics: TierMetrics
    next_tier: NextTier | None = None  # None: the last tier, which answers everything
    threshold_override: float | None = None  # the node's config, over the manifest's
    deadline_margin: float = 0.010  # seconds kept back from the caller's deadline for our own answer
    min_forward_seconds: float = 0.002  # less time than this left for the next tier: answer degraded
    batcher: Batcher | None = None  # dynamic batching of concurrent requests (shared.serving.batching)
    forward_encoding: str = "fp32"  # how forwarded float tensors travel (shared.wire.codec.FLOAT_ENCODINGS)
    auditor: Auditor | None = None  # audits of this exit's answers (shared.serving.audit)
    load: Callable[[], float] = lambda: 0.0  # the share of the tier's admission limit in use
    overload_threshold: float | None = None  # opt-in: this exit's threshold while the next tier is overloaded
    next_overloaded: Callable[[], bool] = lambda: False  # whether the next tier is overloaded now
    coalesce_forwards: bool = True  # the forwards of one loop iteration as one call (shared.serving.coalesce)
    _degraded_logged_at: float = field(default=-math.inf, init=False)
    _degraded_unlogged: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.exit = self.manifest.exit(self.tier)
        position = TIERS.index(self.tier)
        self.next_name = TIERS[position + 1] if position + 1 < len(TIERS) else None
        next_inputs = self.manifest.slice(self.next_name).inputs if self.next_name else []
        # a manifest without explicit wiring feeds the next slice same-named tensors
        self.forwards = self.manifest.slice(self.tier).forwards or {n: n for n in next_inputs}
        known = set(self.runner.input_names) | set(self.runner.output_names)
        if sorted(self.forwards) != sorted(next_inputs) or not set(self.forwards.values()) <= known:
            raise ArtifactError(
                f"the manifest wires {self.forwards} from the {self.tier} slice "
                f"({sorted(known)}) to the next slice's inputs {next_inputs}")
        self.hop = f"{self.tier}_{self.next_name}"
        self.coalescer: ForwardCoalescer | None = None
        if self.next_tier is not None and self.coalesce_forwards:
            next_tier = self.next_tier
            self.coalescer = ForwardCoalescer(
                lambda tensors, ids, thresholds, timeout: next_tier.continue_batch(tensors, ids, thresholds, timeout),
                f"{self.next_name}", self.forward_encoding,
                self.batcher.max_batch_size if self.batcher is not None else 32, self._record_forward)

    def threshold(self, request_thresholds: Mapping[str, float]) -> float:
        if self.tier in request_thresholds:
            return request_thresholds[self.tier]
        controller = self.auditor.controller if self.auditor is not None else None
        if controller is not None:
            return controller.threshold
        if self.threshold_override is not None:
            return self.threshold_override
        return self.exit.threshold

    async def process(self, inputs: Mapping[str, np.ndarray], request_ids: Sequence[str],
                      thresholds: Mapping[str, float], time_left: float | None = None, audit: bool = False
                      ) -> list[pb2.Answer]:
        """Answers for every sample of `inputs`, in order, each with this tier's timing first.

        thresholds: the request's overrides (validated), passed on to the next tier unchanged.
        time_left: seconds until the caller's deadline, if it set one. audit: the request is an audit
        (shared.serving.audit), passed on as one and never audited again. A request larger than one
        slice run (the batcher's max_batch_size) runs chunk by chunk, so that other requests' runs
        go between its chunks; each chunk's forward overlaps the next chunk's run.
        """
        started = time.perf_counter()
        batch = self.runner.check_inputs(inputs)
        if batch == 0:
            raise InvalidInput("the batch is empty")
        if len(request_ids) != batch:
            raise InvalidInput(f"{len(request_ids)} request ids for a batch of {batch} samples")
        if not audit:  # audits are not traffic: the traffic's counts stay what clients sent
            self.metrics.series.samples.inc(batch)
        size = self.batcher.max_batch_size if self.batcher is not None else batch
        if batch <= size:
            return await (await self._exit(inputs, request_ids, thresholds, time_left, started, audit))
        pending: list[asyncio.Future[list[pb2.Answer]]] = []
        try:
            for start in range(0, batch, size):
                chunk = without_padding({name: a[start:start + size] for name, a in inputs.items()})
                pending.append(asyncio.ensure_future(
                    await self._exit(chunk, request_ids[start:start + size], thresholds, time_left, started, audit)))
            answers = [answer for chunk_answers in pending for answer in await chunk_answers]
        finally:
            for chunk_answers in pending:
                chunk_answers.cancel()
        for index, answer in enumerate(answers):
            answer.index = index
        return answers

    async def _exit(self, inputs: Mapping[str, np.ndarray], request_ids: Sequence[str],
                    thresholds: Mapping[str, float], time_left: float | None, started: float, audit: bool
                    ) -> Coroutine[Any, Any, list[pb2.Answer]]:
        """Run the slice and decide each sample's exit; what is left (the forward and the answers)
        comes back as a coroutine to await."""
        metrics = self.metrics
        batch = len(request_ids)
        if self.batcher is not None:  # it records batch size and compute time per merged run
            result = await self.batcher.run(inputs)
        else:
            result = await self.runner.run(inputs)
            _record_run(metrics, batch, result.compute_seconds)
        check_outputs(self.tier, result.outputs)
        # Python lists from here: for the few rows of a request, numpy's per-call set-up costs more
        probs = softmax_rows(result.outputs[LOGITS].tolist(), self.exit.temperature)
        confidence = [max(p) for p in probs]
        early_reason, usual = "", math.inf
        if self.next_tier is None:
            rows = []
        else:
            threshold = usual = self.threshold(thresholds)
            under_load = self._threshold_under_load(thresholds)
            if under_load is not None and under_load < threshold:
                early_reason = (f"answered early by the {self.tier} exit (threshold {under_load:g} instead of "
                                f"{threshold:g}): the {self.next_name} tier is overloaded")
                threshold = under_load
            rows = [i for i, c in enumerate(confidence) if not c >= threshold]
        forwarded = set(rows)
        answers: list[pb2.Answer | None] = [
            None if i in forwarded else self._answer(
                probs[i], request_ids[i], self._early(confidence[i] < usual, early_reason))
            for i in range(batch)]
        if not audit:
            _record_exit(metrics, confidence, batch - len(rows))
        if self.auditor is not None and not audit:
            self._audit(inputs, result, probs, answers, request_ids)
        return self._answers(inputs, result, probs, answers, rows, request_ids, thresholds, time_left, started,
                             audit)

    def _audit(self, inputs: Mapping[str, np.ndarray], result: SliceResult, probs: list[list[float]],
               answers: list[pb2.Answer | None], request_ids: Sequence[str]) -> None:
        """Start the audits of some of the rows (off the answer's path)."""
        assert self.auditor is not None
        rows = self.auditor.pick(range(len(request_ids)), self.load())
        if rows:
            tensors = encode_tensors(forwarded_tensors(inputs, result.outputs, self.forwards, rows),
                                     self.forward_encoding)
            early = [EarlyExit(probs[i].index(max(probs[i])), max(probs[i]), answers[i] is not None) for i in rows]
            self.auditor.start(tensors, [request_ids[i] for i in rows], early)

    async def _answers(self, inputs: Mapping[str, np.ndarray], result: SliceResult, probs: list[list[float]],
                       answers: list[pb2.Answer | None], rows: list[int], request_ids: Sequence[str],
                       thresholds: Mapping[str, float], time_left: float | None, started: float, audit: bool
                       ) -> list[pb2.Answer]:
        """Forward `rows` to the next tier and fill their answers in (degraded if it fails)."""
        metrics = self.metrics
        waited = 0.0
        if len(rows):
            wait_started = time.perf_counter()
            downstream = await self._forward(forwarded_tensors(inputs, result.outputs, self.forwards, rows),
                                             [request_ids[i] for i in rows], thresholds, time_left,
                                             wait_started - started, audit)
            waited = time.perf_counter() - wait_started
            metrics.series.downstream_wait.observe(waited)
            if isinstance(downstream, NextTierError):  # no request is lost: answer with our own exit
                if not audit:  # (an audit's degraded answer is only not counted by its auditor)
                    metrics.degraded.labels(self.tier, downstream.kind).inc(len(rows))
                    self._warn_degraded(len(rows), downstream)
                for row in rows:
                    answers[row] = self._answer(probs[row], request_ids[row], degraded_reason=str(downstream))
            else:
                for row, answer in zip(rows, downstream, strict=True):
                    answers[row] = answer

        total = time.perf_counter() - started
        metrics.series.own_duration.observe(total - waited)
        timing = pb2.TierTiming(tier=self.tier, server_seconds=total, own_seconds=total - waited,
                                compute_seconds=result.compute_seconds)
        done = cast(list[pb2.Answer], answers)  # every row has its answer now
        for index, answer in enumerate(done):
            answer.index = index
            answer.timings.insert(0, timing)
        return done

    async def _forward(self, arrays: Mapping[str, np.ndarray], request_ids: Sequence[str],
                       thresholds: Mapping[str, float], time_left: float | None, spent: float, audit: bool
                       ) -> list[pb2.Answer] | NextTierError:
        """The next tier's answers, or why there are none (then the caller answers degraded).

        The next tier gets what is left of the caller's deadline after our own work (`spent`) and
        the margin our own answer needs, so that a slow next tier still leaves us time to answer.
        Traffic goes through the coalescer (one call for the forwards of a loop iteration); audits
        go alone, marked as audits.
        """
        assert self.next_tier is not None
        timeout = None  # the next tier's client keeps its own deadline for the hop (HopDeadline)
        if time_left is not None:
            # under load a tier's own answer takes longer: keep back a share of a long deadline too
            timeout = time_left - spent - max(self.deadline_margin, DEADLINE_MARGIN_SHARE * time_left)
            if timeout < self.min_forward_seconds:
                return NextTierError(
                    f"{self.next_name} skipped: the deadline ({time_left * 1000:.0f} ms left on arrival) "
                    f"leaves no time to forward", "DEADLINE_EXCEEDED", kind="deadline")
        try:
            if self.coalescer is not None and not audit:
                return await self.coalescer.forward(arrays, request_ids, thresholds, timeout)
            tensors = encode_tensors(arrays, self.forward_encoding)
            if not audit:
                self._record_forward(len(request_ids), tensors)
            return await self.next_tier.continue_batch(tensors, request_ids, thresholds, timeout, audit=audit)
        except NextTierError as exc:
            return exc

    def _record_forward(self, samples: int, tensors: Mapping[str, pb2.Tensor]) -> None:
        series = self.metrics.series
        assert series.forwarded_samples is not None and series.forwarded_bytes is not None
        series.forwarded_samples.inc(samples)
        series.forwarded_bytes.inc(wire_bytes(tensors))

    def _warn_degraded(self, samples: int, reason: NextTierError) -> None:
        """A WARNING per degraded batch, at most one every DEGRADED_LOG_INTERVAL (counting the rest)."""
        self._degraded_unlogged += samples
        now = time.monotonic()
        if now - self._degraded_logged_at < DEGRADED_LOG_INTERVAL:
            return
        log.warning("%s tier answered %d samples degraded (its own exit) since the last warning: %s",
                    self.tier, self._degraded_unlogged, reason)
        self._degraded_logged_at, self._degraded_unlogged = now, 0

    def _threshold_under_load(self, request_thresholds: Mapping[str, float]) -> float | None:
        """The opt-in threshold for while the next tier is overloaded (not over a request's own)."""
        if self.overload_threshold is None or self.tier in request_thresholds or not self.next_overloaded():
            return None
        return self.overload_threshold

    def _early(self, below_usual: bool, reason: str) -> str:
        """The flag of an answer given only because the next tier is overloaded (below the usual threshold)."""
        if not reason or not below_usual:
            return ""
        self.metrics.degraded.labels(self.tier, "overloaded_early").inc()
        return reason

    def _answer(self, values: list[float], request_id: str, degraded_reason: str = "") -> pb2.Answer:
        label = values.index(max(values))  # the first of equal maxima, as argmax
        return pb2.Answer(
            request_id=request_id, label_index=label, label=self.manifest.labels[label],
            probabilities=values, confidence=values[label], tier=self.tier,
            exit_layer=self.exit.layer, degraded=bool(degraded_reason), degraded_reason=degraded_reason)


def _record_run(metrics: TierMetrics, batch: int, compute_seconds: float) -> None:
    metrics.series.batch_size.observe(batch)
    metrics.series.compute_duration.observe(compute_seconds)


def _record_exit(metrics: TierMetrics, confidence: list[float], exits: int) -> None:
    for value in confidence:
        metrics.series.confidence.observe(value)
    metrics.series.exits.inc(exits)


