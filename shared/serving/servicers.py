"""The tiers' gRPC servicers: Classify at the entry tier, Continue at the others. Thin: check the
request, then the tier loop (shared.serving.tier). Failures raise TierServeError; the status
interceptor (shared.serving.status) turns them into gRPC statuses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np

from shared.contract.images import ImageInput
from shared.contract.manifest import Tier
from shared.contract.text import TextEncoder
from shared.errors import InvalidInput, NotFound, NotReady, Overloaded
from shared.serving.admission import WorkLimit
from shared.serving.audit import is_audit
from shared.serving.labels import AnswerMemory
from shared.serving.metrics import TierMetrics
from shared.serving.tier import TierLoop, check_sample_ids, check_thresholds, sample_ids
from shared.wire.codec import decode_tensors, from_tensor
from shared.wire.rpc import pb2, pb2_grpc


class TierServicer:
    """Holds the tier loop once it is loaded; until then requests get UNAVAILABLE."""

    def __init__(self, tier: Tier, metrics: TierMetrics, max_batch: int, admission: WorkLimit,
                 inject_delay: float = 0.0) -> None:
        self.tier = tier
        self.metrics = metrics
        self.max_batch = max_batch
        self.admission = admission
        self.inject_delay = inject_delay  # test hook (settings.inject_delay_ms): seconds before Continue
        self.loop: TierLoop | None = None
        metrics.series.inflight.set_function(lambda: self.admission.calls)

    def ready(self, loop: TierLoop, encoder: TextEncoder | None = None) -> None:
        """The model is loaded: serve it (encoder: the entry tier's tokeniser, for a text model)."""
        self.loop = loop

    def ready_loop(self) -> TierLoop:
        if self.loop is None:
            raise NotReady(f"the {self.tier} tier is still loading its model")
        return self.loop


@dataclass
class RequestStats:
    """What the entry tier answered, for the Open Inference Protocol's ModelStatistics: requests
    (Classify and ModelInfer) that succeeded or failed once admitted, their samples and times."""

    successes: int = 0
    success_ns: int = 0
    failures: int = 0
    failure_ns: int = 0
    samples: int = 0
    last_ms: int = 0  # the last answer, milliseconds since the epoch

    @contextmanager
    def timed(self, samples: int) -> Iterator[None]:
        started = time.perf_counter_ns()
        try:
            yield
        except BaseException:
            self.failures += 1
            self.failure_ns += time.perf_counter_ns() - started
            raise
        self.successes += 1
        self.success_ns += time.perf_counter_ns() - started
        self.samples += samples
        self.last_ms = time.time_ns() // 1_000_000


class ContinuationServicer(TierServicer, pb2_grpc.ContinuationServicer):
    """Continue at the edge and cloud tiers."""

    async def Continue(self, request: pb2.ContinueRequest,
                       context: grpc.aio.ServicerContext) -> pb2.ContinueResponse:
        loop = self.ready_loop()
        if len(request.request_ids) > self.max_batch:
            raise InvalidInput(f"too many samples: {len(request.request_ids)}, at most {self.max_batch}")
        check_sample_ids(request.request_ids)
        audit = is_audit(context.invocation_metadata())
        if audit and self.admission.current > self.admission.limit / 2:
            raise Overloaded(f"the {self.tier} tier drops audits first: more than half of its samples budget "
                             "is in use")
        with self.admission.admit(len(request.request_ids)):
            if self.inject_delay:
                await asyncio.sleep(self.inject_delay)
            thresholds = check_thresholds(request.thresholds)
            inputs = decode_tensors(request.tensors)
            answers = await loop.process(inputs, list(request.request_ids), thresholds, context.time_remaining(),
                                         audit)
            return pb2.ContinueResponse(answers=answers)


class ClassifierServicer(TierServicer, pb2_grpc.ClassifierServicer):
    """Classify at the entry tier: check and tokenise the texts (or check the images), then the tier loop."""

    def __init__(self, tier: Tier, metrics: TierMetrics, max_batch: int, admission: WorkLimit,
                 max_text_chars: int) -> None:
        super().__init__(tier, metrics, max_batch, admission)
        self.max_text_chars = max_text_chars
        self.encoder: TextEncoder | None = None
        self.memory: AnswerMemory | None = None
        self.stats = RequestStats()

    def ready(self, loop: TierLoop, encoder: TextEncoder | None = None, label_memory: int = 0) -> None:
        self.encoder = encoder
        if label_memory:
            self.memory = AnswerMemory(loop.manifest.labels, self.metrics, label_memory)
        super().ready(loop)

    def check_texts(self, texts: Sequence[str], second_texts: Sequence[str] | None = None) -> None:
        what = "text" if second_texts is None else "pair"
        if second_texts is not None and len(second_texts) != len(texts):
            raise InvalidInput(f"{len(texts)} first texts but {len(second_texts)} second texts: one of each per pair")
        if not texts:
            raise InvalidInput(f"no {what}s: send at least one")
        if len(texts) > self.max_batch:
            raise InvalidInput(f"too many {what}s: {len(texts)}, at most {self.max_batch} per request")
        named = [(f"text {i}", text) for i, text in enumerate(texts)] if second_texts is None else [
            (f"pair {i}'s {which} text", text)
            for which, values in (("first", texts), ("second", second_texts)) for i, text in enumerate(values)]
        for name, text in named:
            if not text.strip():
                raise InvalidInput(f"{name} is empty")
            if len(text) > self.max_text_chars:
                raise InvalidInput(f"{name} has {len(text)} characters, at most {self.max_text_chars}")

    async def classify_texts(self, texts: Sequence[str], thresholds: Mapping[str, float],
                             request_id: str, time_left: float | None,
                             second_texts: Sequence[str] | None = None) -> list[pb2.Answer]:
        """Check, tokenise, run the tier loop: what Classify and the Open Inference Protocol share.
        `second_texts`: a sentence-pair model's second text of each pair (texts are the first)."""
        loop = self.ready_loop()
        if self.encoder is None:
            raise InvalidInput(f"this model ({loop.manifest.family}) does not take texts"
                               + ("; send images (ClassifyRequest.images)" if loop.manifest.family == "image" else ""))
        if loop.manifest.text_pairs and second_texts is None:
            raise InvalidInput("this model classifies sentence pairs: send pairs (ClassifyRequest.pairs, "
                               "or the inputs texts and second_texts), not single texts")
        if not loop.manifest.text_pairs and second_texts is not None:
            raise InvalidInput("this model classifies single texts: send texts, not sentence pairs")
        self.check_texts(texts, second_texts)
        checked = check_thresholds(thresholds)
        ids = sample_ids(request_id, len(texts))
        with self.admission.admit(len(texts)), self.stats.timed(len(texts)):
            began = time.perf_counter()
            encoded = self.encoder.encode(texts, second_texts)
            if time_left is not None:  # the tokeniser's time is the caller's too
                time_left -= time.perf_counter() - began
            answers = await loop.process(encoded.tensors, ids, checked, time_left)
        for answer, truncated in zip(answers, encoded.truncated, strict=True):
            answer.truncated = bool(truncated)
        return answers

    async def classify_images(self, images: np.ndarray, thresholds: Mapping[str, float],
                              request_id: str, time_left: float | None) -> list[pb2.Answer]:
        """Check the images against the model's input shape (shared.data.images), run the tier loop."""
        loop = self.ready_loop()
        manifest = loop.manifest
        if manifest.family != "image" or manifest.input_shape is None:
            raise InvalidInput(f"this model ({manifest.family}) does not take images; send "
                               + ("sentence pairs" if manifest.text_pairs else "texts"))
        c, h, w = manifest.input_shape
        tensors = ImageInput((c, h, w)).tensors(images)
        if len(images) > self.max_batch:
            raise InvalidInput(f"too many images: {len(images)}, at most {self.max_batch} per request")
        checked = check_thresholds(thresholds)
        ids = sample_ids(request_id, len(images))
        with self.admission.admit(len(images)), self.stats.timed(len(images)):
            return await loop.process(tensors, ids, checked, time_left)

    async def Classify(self, request: pb2.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> pb2.ClassifyResponse:
        time_left = context.time_remaining()
        kinds = [kind for kind, given in (("texts", request.texts), ("pairs", request.pairs),
                                          ("images", request.HasField("images"))) if given]
        if len(kinds) > 1:
            raise InvalidInput(f"the request holds {'both ' if len(kinds) == 2 else ''}{' and '.join(kinds)}: "
                               "send one kind")
        if request.pairs:
            if len(request.pairs) > self.max_batch:
                raise InvalidInput(f"too many pairs: {len(request.pairs)}, at most {self.max_batch} per request")
            answers = await self.classify_texts([p.first for p in request.pairs], request.thresholds,
                                                request.request_id, time_left, [p.second for p in request.pairs])
        elif request.HasField("images"):
            images = request.images
            if images.encoding != pb2.TENSOR_ENCODING_RAW:
                raise InvalidInput("images travel raw (TensorEncoding RAW, uint8 or float32)")
            if images.shape and images.shape[0] > self.max_batch:  # before decoding or converting them
                raise InvalidInput(f"too many images: {images.shape[0]}, at most {self.max_batch} per request")
            answers = await self.classify_images(from_tensor(images, "images"), request.thresholds,
                                                 request.request_id, time_left)
        else:
            if len(request.texts) > self.max_batch:  # before copying them out of the message
                raise InvalidInput(f"too many texts: {len(request.texts)}, at most {self.max_batch} per request")
            answers = await self.classify_texts(list(request.texts), request.thresholds, request.request_id,
                                                time_left)
        if self.memory is not None:
            self.memory.remember(answers)
        return pb2.ClassifyResponse(answers=answers)

    async def ReportLabels(self, request: pb2.LabelReport,
                           context: grpc.aio.ServicerContext) -> pb2.LabelReportResponse:
        self.ready_loop()
        if self.memory is None:
            raise NotFound("this tier keeps no answers for label reports (label_memory is 0)")
        return pb2.LabelReportResponse(accepted=self.memory.report(request.labels))
