"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) at the entry tier.

Transport only: the texts come out of the request's BYTES input (two for a sentence-pair model) and go
down the same path as Classify (ClassifierServicer.classify_texts: checks, tokeniser, tier loop); the answers go back as
raw output contents, which is all tritonclient reads. Failures become statuses in
shared.serving.status, as Classify's do. The specification's six RPCs have handlers, and two of
Triton's extensions that perf_analyzer calls (ModelConfig, ModelStatistics); Triton's others
(repository, shared memory, trace, log settings) answer UNIMPLEMENTED.

Model "tierserve" (MobileSettings.model_name), version "1":
  input   texts          BYTES  [-1] (or [-1, 1])   UTF-8 texts (a pair model: the first text of each pair)
          second_texts   BYTES  [-1] (or [-1, 1])   a sentence-pair model only: the second text of each pair
  outputs label_index    INT64  [-1]
          label          BYTES  [-1]                the label's name
          probabilities  FP32   [-1, classes]       calibrated, of the exit that answered
          confidence     FP32   [-1]                max(probabilities)
          exit_tier      BYTES  [-1]                mobile, edge or cloud
Request parameters `threshold_mobile` / `threshold_edge` (a number, or a string holding one)
override that tier's exit threshold for this request; other parameters are ignored.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2

import shared
from shared.errors import InvalidInput, NotFound
from shared.serving.servicers import ClassifierServicer
from shared.wire.rpc import pb2
from shared.wire.stubs import inference_stubs

oip_pb2, oip_pb2_grpc = inference_stubs()
SERVICE_NAME: str = oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MODEL_VERSION = "1"
PLATFORM = "tierserve"
INPUT = "texts"
SECOND_INPUT = "second_texts"
CONFIG_TYPES = {"BYTES": oip_pb2.TYPE_STRING, "INT64": oip_pb2.TYPE_INT64, "FP32": oip_pb2.TYPE_FP32}
BYTES = "BYTES"
THRESHOLD_PARAMETER = "threshold_"  # + tier name
_LENGTH = struct.Struct("<I")


def join_bytes_tensor(values: Sequence[str]) -> bytes:
    """A raw BYTES tensor of UTF-8 texts (the inverse of split_bytes_tensor)."""
    return b"".join(_LENGTH.pack(len(v)) + v for v in (s.encode() for s in values))


class Output(NamedTuple):
    datatype: str
    shape: Callable[[int, int], list[int]]  # (batch, classes) -> shape
    contents: Callable[[Sequence[pb2.Answer]], bytes]  # the answers -> raw output contents


OUTPUTS: dict[str, Output] = {
    "label_index": Output("INT64", lambda n, c: [n],
                          lambda answers: np.array([a.label_index for a in answers], "<i8").tobytes()),
    "label": Output(BYTES, lambda n, c: [n], lambda answers: join_bytes_tensor([a.label for a in answers])),
    "probabilities": Output("FP32", lambda n, c: [n, c],
                            lambda answers: np.array([list(a.probabilities) for a in answers], "<f4").tobytes()),
    "confidence": Output("FP32", lambda n, c: [n],
                         lambda answers: np.array([a.confidence for a in answers], "<f4").tobytes()),
    "exit_tier": Output(BYTES, lambda n, c: [n], lambda answers: join_bytes_tensor([a.tier for a in answers])),
}


def input_names(pairs: bool) -> list[str]:
    """The model's inputs: texts, and second_texts for a sentence-pair model."""
    return [INPUT, SECOND_INPUT] if pairs else [INPUT]


def split_bytes_tensor(raw: bytes, count: int, name: str = INPUT) -> list[bytes]:
    """The elements of a raw BYTES tensor, at most `count`: each a 4-byte little-endian length, then the bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(elements) == count:
            raise InvalidInput(f"input '{name}': raw contents hold more than the {count} elements of its shape")
        if offset + _LENGTH.size > len(raw):
            raise InvalidInput(f"input '{name}': raw contents end inside an element's length")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidInput(f"input '{name}': an element's length {length} runs past the raw contents")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def request_texts(request: Any, max_texts: int, names: Sequence[str] = (INPUT,)) -> list[list[str]]:
    """The texts of a ModelInferRequest, one list per input of `names` (in that order): BYTES inputs of
    shape [N] or [N, 1], the same N <= max_texts (checked before any element is read)."""
    given = [tensor.name for tensor in request.inputs]
    if sorted(given) != sorted(names):
        wanted = " and ".join(f"'{n}'" for n in names)
        raise InvalidInput(f"the model takes {'one input' if len(names) == 1 else 'the inputs'} {wanted} (BYTES, "
                           f"shape [N] or [N, 1]); got {given}")
    if request.raw_input_contents and len(request.raw_input_contents) != len(given):
        raise InvalidInput(f"raw_input_contents holds {len(request.raw_input_contents)} entries for {len(given)} "
                           "inputs: give each input's data once, in raw_input_contents or in contents")
    texts: dict[str, list[str]] = {}
    for position, tensor in enumerate(request.inputs):
        name = tensor.name
        if tensor.datatype != BYTES:
            raise InvalidInput(f"input '{name}' must be {BYTES} (UTF-8 texts), not {tensor.datatype}")
        shape = list(tensor.shape)
        if len(shape) not in (1, 2) or shape[0] < 0 or shape[1:] not in ([], [1]):
            raise InvalidInput(f"input '{name}' must have shape [N] or [N, 1], not {shape}")
        if shape[0] > max_texts:
            raise InvalidInput(f"too many texts: {shape[0]}, at most {max_texts} per request")
        if request.raw_input_contents:
            if tensor.HasField("contents"):
                raise InvalidInput("give the input's data once: in raw_input_contents or in contents")
            elements = split_bytes_tensor(request.raw_input_contents[position], shape[0], name)
        else:
            elements = list(tensor.contents.bytes_contents)
        if len(elements) != shape[0]:
            raise InvalidInput(f"input '{name}' has shape {shape} but {len(elements)} elements")
        try:
            texts[name] = [element.decode() for element in elements]
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input '{name}': texts must be UTF-8 ({exc})") from exc
    counts = {name: len(values) for name, values in texts.items()}
    if len(set(counts.values())) > 1:
        raise InvalidInput(f"the inputs hold different numbers of texts {counts}: one of each per pair")
    return [texts[name] for name in names]


def request_thresholds(parameters: Mapping[str, Any]) -> dict[str, float]:
    """Per-request exit thresholds from `threshold_<tier>` parameters (validated by the tier loop)."""
    thresholds = {}
    for key, parameter in parameters.items():
        if not key.startswith(THRESHOLD_PARAMETER):
            continue
        kind = parameter.WhichOneof("parameter_choice")
        value = getattr(parameter, kind) if kind else None
        try:
            if kind == "bool_param" or value is None:
                raise ValueError
            thresholds[key.removeprefix(THRESHOLD_PARAMETER)] = float(value)
        except ValueError:
            raise InvalidInput(f"parameter '{key}' must be a number, not {value!r}") from None
    return thresholds


def requested_outputs(request: Any) -> list[str]:
    """The outputs asked for, in their order; all of them when none is named."""
    names = [output.name for output in request.outputs] or list(OUTPUTS)
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise InvalidInput(f"unknown outputs {unknown}; the model has {list(OUTPUTS)}")
    return names


def infer_response(request: Any, names: Sequence[str], answers: Sequence[pb2.Answer],
                   classes: int) -> Any:
    response = oip_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=MODEL_VERSION, id=request.id)
    for name in names:
        output = OUTPUTS[name]
        response.outputs.add(name=name, datatype=output.datatype, shape=output.shape(len(answers), classes))
        response.raw_output_contents.append(output.contents(answers))
    return response


class InferenceServicer(oip_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[name-defined]  # loaded on demand
    """The protocol over the entry tier's ClassifierServicer (one model, one version)."""

    def __init__(self, classifier: ClassifierServicer, model_name: str,
                 health_servicer: health.aio.HealthServicer) -> None:
        self.classifier = classifier
        self.model_name = model_name
        self.health = health_servicer

    async def _ready(self, context: grpc.aio.ServicerContext) -> bool:
        if self.classifier.loop is None or self.classifier.encoder is None:
            return False
        status = await self.health.Check(health_pb2.HealthCheckRequest(service=""), context)
        return status.status == health_pb2.HealthCheckResponse.SERVING

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise NotFound(f"unknown model '{name}': this server serves '{self.model_name}'")
        if version not in ("", MODEL_VERSION):
            raise NotFound(f"model '{name}' has no version '{version}', only '{MODEL_VERSION}'")

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return oip_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return oip_pb2.ServerReadyResponse(ready=await self._ready(context))

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        served = request.name == self.model_name and request.version in ("", MODEL_VERSION)
        return oip_pb2.ModelReadyResponse(ready=served and await self._ready(context))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return oip_pb2.ServerMetadataResponse(name="tierserve", version=shared.__version__)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_model(request.name, request.version)
        manifest = self.classifier.ready_loop().manifest
        classes = len(manifest.labels)
        tensor = oip_pb2.ModelMetadataResponse.TensorMetadata
        return oip_pb2.ModelMetadataResponse(
            name=self.model_name, versions=[MODEL_VERSION], platform=PLATFORM,
            inputs=[tensor(name=name, datatype=BYTES, shape=[-1]) for name in input_names(manifest.text_pairs)],
            outputs=[tensor(name=name, datatype=output.datatype, shape=output.shape(-1, classes))
                     for name, output in OUTPUTS.items()])

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_model(request.model_name, request.model_version)
        manifest = self.classifier.ready_loop().manifest
        texts = request_texts(request, self.classifier.max_batch, input_names(manifest.text_pairs))
        thresholds = request_thresholds(request.parameters)
        names = requested_outputs(request)
        answers = await self.classifier.classify_texts(  # admission and checks as Classify's
            texts[0], thresholds, request.id, context.time_remaining(), texts[1] if len(texts) > 1 else None)
        classes = len(manifest.labels)
        return infer_response(request, names, answers, classes)


    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's ModelConfig, as perf_analyzer reads it, saying what ModelMetadata says: one BYTES
        input of N texts (two for a pair model) and the outputs for N samples, the count the first dimension
        (max_batch_size 0: Triton's batching does not apply; the tier batches dynamically itself)."""
        self._check_model(request.name, request.version)
        loop = self.classifier.ready_loop()
        classes = len(loop.manifest.labels)
        config = oip_pb2.ModelConfig(
            name=self.model_name, platform=PLATFORM, backend=PLATFORM, max_batch_size=0,
            input=[oip_pb2.ModelInput(name=name, data_type=oip_pb2.TYPE_STRING, dims=[-1])
                   for name in input_names(loop.manifest.text_pairs)],
            output=[oip_pb2.ModelOutput(name=name, data_type=CONFIG_TYPES[output.datatype],
                                        dims=output.shape(-1, classes)) for name, output in OUTPUTS.items()])
        if loop.batcher is not None:
            config.dynamic_batching.preferred_batch_size.append(loop.batcher.max_batch_size)
            config.dynamic_batching.max_queue_delay_microseconds = int(loop.batcher.max_queue_delay * 1e6)
        return oip_pb2.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Counts and times of the requests this tier answered (Classify and ModelInfer alike)."""
        if request.name:
            self._check_model(request.name, request.version)
        stats = self.classifier.stats
        duration = oip_pb2.StatisticDuration
        return oip_pb2.ModelStatisticsResponse(model_stats=[oip_pb2.ModelStatistics(
            name=self.model_name, version=MODEL_VERSION, last_inference=stats.last_ms,
            inference_count=stats.samples, execution_count=stats.successes,
            inference_stats=oip_pb2.InferStatistics(
                success=duration(count=stats.successes, ns=stats.success_ns),
                fail=duration(count=stats.failures, ns=stats.failure_ns)))])


def add_inference_service(server: grpc.aio.Server, classifier: ClassifierServicer, model_name: str,
                          health_servicer: health.aio.HealthServicer) -> str:
    """Serve the protocol on `server` beside Classify; the service's name (for health, reflection)."""
    oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(classifier, model_name, health_servicer), server)
    return SERVICE_NAME
