"""The tier loop, written once for every tier, its gRPC servicers, and the error -> status mapping.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import grpc
import numpy as np

from shared.contract.calibration import softmax_rows
from shared.contract.images import ImageInput
from shared.contract.manifest import TIERS, Manifest, Tier
from shared.contract.text import TextEncoder
from shared.errors import ArtifactError, DeadlineExceeded, InvalidInput, NotReady, TierServeError, Undecodable
from shared.serving.batching import Batcher
from shared.serving.metrics import FLUSH_AFTER_FORWARD, OK_OUTCOME, TierMetrics
from shared.serving.next_tier import NextTierError
from shared.serving.resilience import InflightLimit
from shared.serving.runner import ATTENTION_MASK, SliceRunner
from shared.serving.streaming import NEXT_READ_DELAY, ReadPause
from shared.wire.codec import decode_tensors, encode_tensors, from_tensor, is_unpadded_mask, wire_bytes
from shared.wire.rpc import pb2, pb2_grpc

LOGITS = "logits"
DEFAULT_MAX_INFLIGHT = 64
log = logging.getLogger("tierserve.tier")
T = TypeVar("T")
# a request or response of a stream of calls (ContinueStream, ClassifyStream): it has call_id, etc.
Streamed = Any


class NextTier(Protocol):
    """Where a tier sends what it cannot answer (shared.client.ContinuationClient over gRPC), the
    tensors encoded already (shared.wire.codec.encode_tensors)."""

    async def continue_batch(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None
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
    """One id per sample of a request, `<request id>/<index>` (a random request id when none is given)."""
    prefix = request_id or uuid.uuid4().hex[:16]
    return [f"{prefix}/{i}" for i in range(count)]


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
    mask = picked.get(ATTENTION_MASK)
    if mask is not None and mask.size and not is_unpadded_mask(mask) and not mask[:, -1].any():
        width = int(np.flatnonzero(mask.any(axis=0))[-1]) + 1
        picked = {name: a[:, :width] if a.ndim >= 2 and a.shape[1] == mask.shape[1] else a
                  for name, a in picked.items()}
    return picked


@dataclass
class TierLoop:
    """One tier's share of a request: its slice, its exit, and the hand-off to the next tier."""

    manifest: Manifest
    tier: Tier
    runner: SliceRunner
    metrics: TierMetrics
    next_tier: NextTier | None = None  # None: the last tier, which answers everything
    threshold_override: float | None = None  # the node's config, over the manifest's
    hop_timeout: float = 10.0
    deadline_margin: float = 0.010  # seconds kept back from the caller's deadline for our own answer
    min_forward_seconds: float = 0.002  # less time than this left for the next tier: answer degraded
    batcher: Batcher | None = None  # dynamic batching of concurrent requests (shared.serving.batching)
    forward_encoding: str = "fp32"  # how forwarded float tensors travel (shared.wire.codec.FLOAT_ENCODINGS)

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

    def threshold(self, request_thresholds: Mapping[str, float]) -> float:
        if self.tier in request_thresholds:
            return request_thresholds[self.tier]
        if self.threshold_override is not None:
            return self.threshold_override
        return self.exit.threshold

    async def process(self, inputs: Mapping[str, np.ndarray], request_ids: Sequence[str],
                      thresholds: Mapping[str, float], time_left: float | None = None
                      ) -> list[pb2.Answer]:
        """Answers for every sample of `inputs`, in order, each with this tier's timing first.

        thresholds: the request's overrides (validated), passed on to the next tier unchanged.
        time_left: seconds until the caller's deadline, if it set one.
        """
        started = time.perf_counter()
        batch = self.runner.check_inputs(inputs)
        if batch == 0:
            raise InvalidInput("the batch is empty")
        if len(request_ids) != batch:
            raise InvalidInput(f"{len(request_ids)} request ids for a batch of {batch} samples")
        metrics = self.metrics
        metrics.defer(metrics.series.samples.inc, batch)
        if self.batcher is not None:  # it records batch size and compute time per merged run
            result = await self.batcher.run(inputs)
        else:
            result = await self.runner.run(inputs)
            metrics.defer(_record_run, metrics, batch, result.compute_seconds)
        # Python lists from here: a numpy call costs ~30 µs with the caches a waking tier finds
        probs = softmax_rows(result.outputs[LOGITS].tolist(), self.exit.temperature)
        confidence = [max(p) for p in probs]
        if self.next_tier is None:
            rows = []
        else:
            threshold = self.threshold(thresholds)
            rows = [i for i, c in enumerate(confidence) if not c >= threshold]  # NaN: forwarded
        forwarded = set(rows)
        answers: list[pb2.Answer | None] = [
            None if i in forwarded else self._answer(probs[i], request_ids[i]) for i in range(batch)]
        waited = 0.0
        metrics.defer(_record_exit, metrics, confidence, batch - len(rows))
        if len(rows):
            assert self.next_tier is not None
            tensors = encode_tensors(forwarded_tensors(inputs, result.outputs, self.forwards, rows),
                                     self.forward_encoding)
            metrics.defer(_record_forward, metrics, len(rows), tensors)
            metrics.flush_soon(FLUSH_AFTER_FORWARD)
            wait_started = time.perf_counter()
            downstream = await self._forward(tensors, [request_ids[i] for i in rows], thresholds,
                                             time_left, wait_started - started)
            waited = time.perf_counter() - wait_started
            metrics.defer(metrics.series.downstream_wait.observe, waited)
            if isinstance(downstream, NextTierError):  # no request is lost: answer with our own exit
                metrics.defer(metrics.degraded.labels(self.tier, downstream.kind).inc, len(rows))
                log.debug("answering %d samples degraded: %s", len(rows), downstream)
                for row in rows:
                    answers[row] = self._answer(probs[row], request_ids[row], degraded_reason=str(downstream))
            else:
                for row, answer in zip(rows, downstream, strict=True):
                    answers[row] = answer

        total = time.perf_counter() - started
        metrics.defer(metrics.series.own_duration.observe, total - waited)
        metrics.flush_soon()
        timing = pb2.TierTiming(tier=self.tier, server_seconds=total, own_seconds=total - waited,
                                compute_seconds=result.compute_seconds)
        done = cast(list[pb2.Answer], answers)  # every row has its answer now
        for index, answer in enumerate(done):
            answer.index = index
            answer.timings.insert(0, timing)
        return done

    async def _forward(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                       thresholds: Mapping[str, float], time_left: float | None, spent: float
                       ) -> list[pb2.Answer] | NextTierError:
        """The next tier's answers, or why there are none (then the caller answers degraded).

        The next tier gets what is left of the caller's deadline after our own work (`spent`) and
        the margin our own answer needs, so that a slow next tier still leaves us time to answer.
        """
        assert self.next_tier is not None
        timeout = self.hop_timeout
        if time_left is not None:
            timeout = min(timeout, time_left - spent - self.deadline_margin)
            if timeout < self.min_forward_seconds:
                return NextTierError(
                    f"{self.next_name} skipped: the deadline ({time_left * 1000:.0f} ms left on arrival) "
                    f"leaves no time to forward", "DEADLINE_EXCEEDED", kind="deadline")
        try:
            return await self.next_tier.continue_batch(tensors, request_ids, thresholds, timeout)
        except NextTierError as exc:
            return exc

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


def _record_forward(metrics: TierMetrics, samples: int, tensors: Mapping[str, pb2.Tensor]) -> None:
    assert metrics.series.forwarded_samples is not None and metrics.series.forwarded_bytes is not None
    metrics.series.forwarded_samples.inc(samples)
    metrics.series.forwarded_bytes.inc(wire_bytes(tensors))


@dataclass(frozen=True)
class Failure:
    """How a call failed, as the gRPC status it answers with."""

    code: grpc.StatusCode
    message: str


async def run_call(metrics: TierMetrics, tier: str, handle: Callable[[], Awaitable[T]],
                   admission: InflightLimit | None = None) -> T | Failure:
    """Run one call's handler; the one place where failures become gRPC statuses.

    TierServeError subclasses carry their status code; anything unexpected is INTERNAL, logged,
    and the server keeps serving. admission: the tier's in-flight limit (RESOURCE_EXHAUSTED beyond it;
    the inflight gauge reads its count). Metrics are recorded once the answer is on its way.
    """
    started = time.perf_counter()
    outcome = OK_OUTCOME
    try:
        if admission is None:
            return await handle()
        admission.enter()
        try:
            return await handle()
        finally:
            admission.leave()
    except TierServeError as exc:
        outcome = exc.code.lower()
        failure = Failure(grpc.StatusCode[exc.code], str(exc))
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except Exception as exc:
        log.exception("unexpected failure at the %s tier", tier)
        outcome = "internal"
        failure = Failure(grpc.StatusCode.INTERNAL, f"internal error at the {tier} tier: {type(exc).__name__}: {exc}")
    finally:
        metrics.defer(metrics.record_call, outcome, time.perf_counter() - started)
        metrics.flush_soon()
    metrics.defer(metrics.errors.labels(tier, failure.code.name).inc)
    return failure


async def answer_rpc(context: grpc.aio.ServicerContext, metrics: TierMetrics, tier: str,
                     handle: Callable[[], Awaitable[T]], admission: InflightLimit | None = None) -> T:
    """run_call for a unary RPC: a failure ends the RPC with its status."""
    result = await run_call(metrics, tier, handle, admission)
    if isinstance(result, Failure):
        await context.abort(result.code, result.message)
        raise AssertionError("unreachable: context.abort raises")
    return result


class _Servicer:
    """Holds the tier loop once it is loaded; until then requests get UNAVAILABLE."""

    def __init__(self, tier: Tier, metrics: TierMetrics, max_batch: int) -> None:
        self.tier = tier
        self.metrics = metrics
        self.max_batch = max_batch
        self.loop: TierLoop | None = None
        self.admission = InflightLimit(DEFAULT_MAX_INFLIGHT, tier)  # the server sets its configured limit
        metrics.series.inflight.set_function(lambda: self.admission.current)
        self.inject_delay = 0.0  # test hook (settings.inject_delay_ms): seconds to sleep before Continue
        self._streams: set[_CallStream] = set()
        self._draining = False

    def ready_loop(self) -> TierLoop:
        if self.loop is None:
            raise NotReady(f"the {self.tier} tier is still loading its model")
        return self.loop

    async def _serve_stream(self, context: grpc.aio.ServicerContext,
                            call: Callable[[Streamed, float | None], Awaitable[Streamed]],
                            failed: Callable[[], Streamed]) -> None:
        """A stream of calls (ContinueStream, ClassifyStream): `call(request, time_left)` answers
        each as it completes, until the caller stops or this tier drains; `failed()` makes the
        empty response a failure's status is put in."""

        async def answer(request: Streamed) -> Streamed:
            time_left = request.timeout_seconds if request.timeout_seconds > 0 else None

            async def handle() -> Streamed:
                try:
                    async with asyncio.timeout(time_left):
                        return await call(request, time_left)
                except TimeoutError:
                    raise DeadlineExceeded(f"the {self.tier} tier did not answer within the call's "
                                           f"{(time_left or 0) * 1000:.0f} ms") from None

            result = await run_call(self.metrics, self.tier, handle, self.admission)
            if isinstance(result, Failure):
                failure, result = result, failed()
                result.status_code, result.status_message = failure.code.value[0], failure.message
            result.call_id = request.call_id
            return result

        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the {self.tier} tier is shutting down")
        stream = _CallStream(context, answer, alone=lambda: self.admission.current == 0)
        self._streams.add(stream)
        try:
            await stream.answer_all()
        finally:
            self._streams.discard(stream)
        if stream.undecodable:
            self.metrics.errors.labels(self.tier, "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, stream.undecodable)

    def drain_streams(self) -> None:
        """Stop reading new calls on every open stream; each ends once its read calls are answered."""
        self._draining = True
        for stream in self._streams:
            stream.stop_reading()


class ContinuationServicer(_Servicer, pb2_grpc.ContinuationServicer):
    """Continue and ContinueStream at the edge and cloud tiers."""

    async def _continue(self, request: pb2.ContinueRequest, time_left: float | None) -> pb2.ContinueResponse:
        loop = self.ready_loop()
        if self.inject_delay:
            await asyncio.sleep(self.inject_delay)
        if len(request.request_ids) > self.max_batch:
            raise InvalidInput(
                f"too many samples: {len(request.request_ids)}, at most {self.max_batch}")
        thresholds = check_thresholds(request.thresholds)
        inputs = decode_tensors(request.tensors)
        answers = await loop.process(inputs, list(request.request_ids), thresholds, time_left)
        return pb2.ContinueResponse(answers=answers)

    async def Continue(self, request: pb2.ContinueRequest,
                       context: grpc.aio.ServicerContext) -> pb2.ContinueResponse:
        return await answer_rpc(context, self.metrics, self.tier,
                                lambda: self._continue(request, context.time_remaining()), self.admission)

    async def ContinueStream(self, request_iterator: AsyncIterator[pb2.ContinueRequest],
                             context: grpc.aio.ServicerContext) -> None:
        await self._serve_stream(context, self._continue, pb2.ContinueResponse)


class _CallStream:
    """The calls of one stream. Each task reads one message, starts the task that reads the next,
    then answers its own: a call starts at once, not one event-loop turn later."""

    def __init__(self, context: grpc.aio.ServicerContext, answer: Callable[[Streamed], Awaitable[Streamed]],
                 alone: Callable[[], bool] = lambda: False) -> None:
        self.context = context
        self.answer = answer
        self.alone = alone  # no call in flight at the tier
        self.tasks: set[asyncio.Task[None]] = set()
        self.reading: asyncio.Task[None] | None = None  # the task waiting for the next message
        self.writing = asyncio.Lock()  # one write at a time on a stream
        self.read_pause = ReadPause()
        self.answered_at = -math.inf  # loop time of the last answer's send
        self.undecodable = ""  # why a message did not parse (then the stream ends)

    async def answer_all(self) -> None:
        """Until the caller's EOF (or stop_reading()), and every call read is answered."""
        self._read_next()
        try:
            while self.tasks:
                await asyncio.wait(list(self.tasks))
        finally:
            for task in self.tasks:
                task.cancel()

    def stop_reading(self) -> None:
        if self.reading is not None:
            self.reading.cancel()

    def _read_next(self, after: float = 0.0) -> None:
        task = asyncio.create_task(self._read_and_answer(after))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.reading = task

    async def _read_and_answer(self, after: float) -> None:
        try:
            if after:
                await self.read_pause.wait(after)
            request = await self.context.read()
        except Exception as exc:  # the stream broke under the read: the call's end says why
            log.debug("reading a stream of calls failed: %r", exc)
            return
        if request is grpc.aio.EOF:
            return
        if isinstance(request, Undecodable):  # no call_id to answer it under: end the stream
            self.undecodable = request.explain()
            return
        loop = asyncio.get_running_loop()
        quick_caller = loop.time() - self.answered_at < 1.5 * NEXT_READ_DELAY  # came soon after our last answer
        # Alone, the next read is held back (ReadPause) a moment after this call's forward or answer
        # has left, or, for a caller whose next call came sooner than that, until this call has
        # answered; under load it starts at once, so that calls overlap.
        self._read_next(NEXT_READ_DELAY if self.alone() else 0.0)
        response = await self.answer(request)
        async with self.writing:
            try:
                await self.context.write(response)
            except Exception as exc:  # the caller has gone: nobody is left to answer
                log.debug("answering call %d on a stream failed: %r", request.call_id, exc)
        self.answered_at = loop.time()
        if quick_caller:
            self.read_pause.open()


class ClassifierServicer(_Servicer, pb2_grpc.ClassifierServicer):
    """Classify at the entry tier: check and tokenise the texts (or check the images), then the tier loop."""

    def __init__(self, tier: Tier, metrics: TierMetrics, max_batch: int,
                 max_text_chars: int) -> None:
        super().__init__(tier, metrics, max_batch)
        self.max_text_chars = max_text_chars
        self.encoder: TextEncoder | None = None

    def check_texts(self, texts: Sequence[str]) -> None:
        if not texts:
            raise InvalidInput("no texts: send at least one")
        if len(texts) > self.max_batch:
            raise InvalidInput(
                f"too many texts: {len(texts)}, at most {self.max_batch} per request")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidInput(f"text {i} is empty")
            if len(text) > self.max_text_chars:
                raise InvalidInput(
                    f"text {i} has {len(text)} characters, at most {self.max_text_chars}")

    async def classify_texts(self, texts: Sequence[str], thresholds: Mapping[str, float],
                             request_id: str, time_left: float | None) -> list[pb2.Answer]:
        """Check, tokenise, run the tier loop: what Classify and the Open Inference Protocol share."""
        loop = self.ready_loop()
        if self.encoder is None:
            raise InvalidInput(f"this model ({loop.manifest.family}) does not take texts"
                               + ("; send images (ClassifyRequest.images)" if loop.manifest.family == "image" else ""))
        self.check_texts(texts)
        checked = check_thresholds(thresholds)
        encoded = self.encoder.encode(texts)
        answers = await loop.process(encoded.tensors, sample_ids(request_id, len(texts)), checked, time_left)
        for answer, truncated in zip(answers, encoded.truncated, strict=True):
            answer.truncated = bool(truncated)
        return answers

    async def classify_images(self, images: np.ndarray, thresholds: Mapping[str, float],
                              request_id: str, time_left: float | None) -> list[pb2.Answer]:
        """Check the images against the model's input shape (shared.data.images), run the tier loop."""
        loop = self.ready_loop()
        manifest = loop.manifest
        if manifest.family != "image" or manifest.input_shape is None:
            raise InvalidInput(f"this model ({manifest.family}) does not take images; send texts")
        c, h, w = manifest.input_shape
        tensors = ImageInput((c, h, w)).tensors(images)
        if len(images) > self.max_batch:
            raise InvalidInput(f"too many images: {len(images)}, at most {self.max_batch} per request")
        checked = check_thresholds(thresholds)
        return await loop.process(tensors, sample_ids(request_id, len(images)), checked, time_left)

    async def _classify(self, request: pb2.ClassifyRequest, time_left: float | None) -> pb2.ClassifyResponse:
        if request.HasField("images"):
            if request.texts:
                raise InvalidInput("the request holds both texts and images: send one kind")
            answers = await self.classify_images(from_tensor(request.images, "images"), request.thresholds,
                                                 request.request_id, time_left)
        else:
            answers = await self.classify_texts(list(request.texts), request.thresholds, request.request_id, time_left)
        return pb2.ClassifyResponse(answers=answers)

    async def Classify(self, request: pb2.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> pb2.ClassifyResponse:
        return await answer_rpc(context, self.metrics, self.tier,
                                lambda: self._classify(request, context.time_remaining()), self.admission)

    async def ClassifyStream(self, request_iterator: AsyncIterator[pb2.ClassifyRequest],
                             context: grpc.aio.ServicerContext) -> None:
        await self._serve_stream(context, self._classify, pb2.ClassifyResponse)
