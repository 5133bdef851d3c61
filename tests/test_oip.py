"""The Open Inference Protocol at the entry tier, driven through tritonclient's gRPC client.

The three tiers run as real processes on the tiny built model; every answer must equal the
project's own API (TierClient.classify) for the same texts and thresholds.

shared.serving.oip is never imported here: its messages clash with tritonclient's in one process
(see shared.wire.stubs.inference_stubs).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from shared.client import TierClient
from shared.contract.manifest import TIERS
from shared.tools.processes import TierCluster
from shared.wire.rpc import pb2
from tests.tiny_model import sentence

MODEL = "tierserve"
SERVICE = "inference.GRPCInferenceService"
_rng = np.random.default_rng(11)
TEXTS = [sentence(_rng, i % 2, 2) for i in range(12)]


@pytest.fixture(scope="module")
def triton(cluster: TierCluster) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(url=cluster.entry_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tier_client(cluster: TierCluster) -> Iterator[TierClient]:
    with TierClient(cluster.entry_address) as client:
        yield client


def readme_snippet(url: str, texts: list[str]) -> dict[str, np.ndarray]:
    """The README's example, verbatim."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=url)  # the mobile tier's address
    batch = grpcclient.InferInput("texts", [len(texts)], "BYTES")
    batch.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    result = client.infer("tierserve", [batch], parameters={"threshold_mobile": 0.9})
    return {name: result.as_numpy(name)
            for name in ("label_index", "label", "probabilities", "confidence", "exit_tier")}


def texts_input(texts: list[str], shape: list[int] | None = None) -> grpcclient.InferInput:
    data = np.array([t.encode() for t in texts], dtype=np.object_).reshape(shape or [len(texts)])
    tensor = grpcclient.InferInput("texts", list(data.shape), "BYTES")
    return tensor.set_data_from_numpy(data)


def assert_same_answers(outputs: dict[str, np.ndarray], answers: list[pb2.Answer]) -> None:
    assert outputs["label_index"].dtype == np.int64
    np.testing.assert_array_equal(outputs["label_index"], [a.label_index for a in answers])
    assert [x.decode() for x in outputs["label"]] == [a.label for a in answers]
    assert outputs["probabilities"].dtype == np.float32
    assert outputs["probabilities"].shape == (len(answers), len(answers[0].probabilities))
    np.testing.assert_array_equal(outputs["probabilities"],
                                  np.array([list(a.probabilities) for a in answers], np.float32))
    np.testing.assert_array_equal(outputs["confidence"], np.array([a.confidence for a in answers], np.float32))
    assert [x.decode() for x in outputs["exit_tier"]] == [a.tier for a in answers]


def infer_outputs(triton: grpcclient.InferenceServerClient, texts: list[str], **kwargs: object
                  ) -> dict[str, np.ndarray]:
    result = triton.infer(MODEL, [texts_input(texts)], **kwargs)
    return {output.name: result.as_numpy(output.name) for output in result.get_response().outputs}


def test_health_and_metadata(triton: grpcclient.InferenceServerClient, cluster: TierCluster) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "1")
    assert not triton.is_model_ready("another") and not triton.is_model_ready(MODEL, "2")
    server = triton.get_server_metadata(as_json=True)
    assert server["name"] == "tierserve" and server["version"]

    meta = triton.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("texts", "BYTES", ["-1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("label_index", "INT64", ["-1"]), ("label", "BYTES", ["-1"]),
        ("probabilities", "FP32", ["-1", "2"]), ("confidence", "FP32", ["-1"]),
        ("exit_tier", "BYTES", ["-1"])]

    with grpc.insecure_channel(cluster.entry_address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        replies = list(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                                     reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)])))
        assert SERVICE in {s.name for s in replies[0].list_services_response.service}
        assert replies[1].file_descriptor_response.file_descriptor_proto, replies[1].error_response


def test_readme_snippet_answers_like_classify(cluster: TierCluster, tier_client: TierClient) -> None:
    outputs = readme_snippet(cluster.entry_address, TEXTS)
    assert_same_answers(outputs, tier_client.classify(TEXTS, thresholds={"mobile": 0.9}))


@pytest.mark.parametrize("parameters, thresholds", [
    ({}, {}),
    ({"threshold_mobile": 0.0}, {"mobile": 0.0}),
    ({"threshold_mobile": 2, "threshold_edge": "2.0"}, {"mobile": 2.0, "edge": 2.0}),
    ({"threshold_mobile": 0.9, "threshold_edge": "0.7", "unrelated": True}, {"mobile": 0.9, "edge": 0.7}),
])
def test_infer_equals_classify_with_per_request_thresholds(
        triton: grpcclient.InferenceServerClient, tier_client: TierClient,
        parameters: dict[str, object], thresholds: dict[str, float]) -> None:
    outputs = infer_outputs(triton, TEXTS, parameters=parameters, request_id="req-7")
    answers = tier_client.classify(TEXTS, thresholds=thresholds)
    assert_same_answers(outputs, answers)
    if thresholds == {"mobile": 0.0}:
        assert set(outputs["exit_tier"]) == {b"mobile"}
    if thresholds.get("mobile") == thresholds.get("edge") == 2.0:
        assert set(outputs["exit_tier"]) == {TIERS[-1].encode()}


def test_infer_splits_a_batch_over_the_tiers_like_classify(
        triton: grpcclient.InferenceServerClient, tier_client: TierClient) -> None:
    from tests.test_serving import threshold_between

    # thresholds between the real confidences, so that each tier answers part of the batch
    mobile = np.array([a.confidence for a in tier_client.classify(TEXTS, thresholds={"mobile": 0.0})])
    tau_mobile = threshold_between(mobile)
    reaching = [t for t, c in zip(TEXTS, mobile, strict=True) if c < tau_mobile]
    edge = np.array([a.confidence for a in tier_client.classify(reaching, thresholds={"mobile": 2.0, "edge": 0.0})])
    thresholds = {"mobile": tau_mobile, "edge": threshold_between(edge)}
    outputs = infer_outputs(triton, TEXTS, parameters={"threshold_mobile": thresholds["mobile"],
                                                       "threshold_edge": str(thresholds["edge"])})
    assert_same_answers(outputs, tier_client.classify(TEXTS, thresholds=thresholds))
    assert set(outputs["exit_tier"]) == {tier.encode() for tier in TIERS}


def test_shape_n_by_1_requested_outputs_and_request_id(triton: grpcclient.InferenceServerClient,
                                                       tier_client: TierClient) -> None:
    wanted = [grpcclient.InferRequestedOutput("exit_tier"), grpcclient.InferRequestedOutput("label_index")]
    result = triton.infer(MODEL, [texts_input(TEXTS[:3], [3, 1])], outputs=wanted, request_id="abc")
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["exit_tier", "label_index"] and response.id == "abc"
    answers = tier_client.classify(TEXTS[:3])
    np.testing.assert_array_equal(result.as_numpy("label_index"), [a.label_index for a in answers])


def _raw_request(texts_raw: bytes, shape: list[int], **fields: object) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[texts_raw], **fields)
    request.inputs.add(name="texts", datatype="BYTES", shape=shape)
    return request


def test_bytes_contents_and_malformed_raw_contents(cluster: TierCluster, tier_client: TierClient) -> None:
    with grpc.insecure_channel(cluster.entry_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="texts", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
            [t.encode() for t in TEXTS[:2]])
        response = stub.ModelInfer(request, timeout=30)
        labels = np.frombuffer(response.raw_output_contents[0], "<i8")
        np.testing.assert_array_equal(labels, [a.label_index for a in tier_client.classify(TEXTS[:2])])

        one_text = len(b"abc").to_bytes(4, "little") + b"abc"
        for bad, message in [(_raw_request(one_text, [2]), "1 elements"),
                             (_raw_request(one_text * 2, [1]), "more than the 1 elements"),
                             (_raw_request(one_text[:-1], [1]), "runs past"),
                             (_raw_request(one_text[:2], [1]), "inside an element"),
                             (_raw_request(b"\x02\x00\x00\x00\xff\xfe", [1]), "UTF-8")]:
            with pytest.raises(grpc.RpcError) as failure:
                stub.ModelInfer(bad, timeout=30)
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in failure.value.details()


def _int_input() -> grpcclient.InferInput:
    return grpcclient.InferInput("texts", [2], "INT64").set_data_from_numpy(np.array([1, 2], np.int64))


@pytest.mark.parametrize("model, inputs, parameters, code, message", [
    (MODEL, lambda: [grpcclient.InferInput("text", [1], "BYTES").set_data_from_numpy(
        np.array([b"good"], np.object_))], {}, "INVALID_ARGUMENT", "one input 'texts'"),
    (MODEL, lambda: [_int_input()], {}, "INVALID_ARGUMENT", "must be BYTES"),
    (MODEL, lambda: [texts_input(["a", "b", "c", "d"], [2, 2])], {}, "INVALID_ARGUMENT", "shape [N] or [N, 1]"),
    (MODEL, lambda: [texts_input(["good", "   "])], {}, "INVALID_ARGUMENT", "text 1 is empty"),
    (MODEL, lambda: [texts_input(["good"]), _int_input()], {}, "INVALID_ARGUMENT", "one input 'texts'"),
    (MODEL, lambda: [texts_input(["good"])], {"threshold_cloud": 0.5}, "INVALID_ARGUMENT", "cloud"),
    (MODEL, lambda: [texts_input(["good"])], {"threshold_mobile": "high"}, "INVALID_ARGUMENT", "a number"),
    (MODEL, lambda: [texts_input(["good"])], {"threshold_edge": -1.0}, "INVALID_ARGUMENT", ">= 0"),
    ("another", lambda: [texts_input(["good"])], {}, "NOT_FOUND", "unknown model 'another'"),
])
def test_bad_requests_get_a_status_and_the_tier_keeps_serving(
        triton: grpcclient.InferenceServerClient, model: str, inputs: object,
        parameters: dict[str, object], code: str, message: str) -> None:
    with pytest.raises(InferenceServerException) as failure:
        triton.infer(model, inputs(), parameters=parameters)  # type: ignore[operator]
    assert failure.value.status() == f"StatusCode.{code}"
    assert message in failure.value.message()
    assert triton.infer(MODEL, [texts_input(["good film"])]).as_numpy("label_index").shape == (1,)


def test_model_config_and_statistics_as_tritons_clients_read_them(
        triton: grpcclient.InferenceServerClient, tier_client: TierClient) -> None:
    config = triton.get_model_config(MODEL, as_json=True)["config"]
    assert config["name"] == MODEL and config.get("max_batch_size", 0) == 0  # the texts' count is dims[0]
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("texts", "TYPE_STRING", ["-1"])]
    outputs = {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]}
    assert outputs == {"label_index": ("TYPE_INT64", ["-1"]), "label": ("TYPE_STRING", ["-1"]),
                       "probabilities": ("TYPE_FP32", ["-1", "2"]), "confidence": ("TYPE_FP32", ["-1"]),
                       "exit_tier": ("TYPE_STRING", ["-1"])}
    assert config["dynamic_batching"]["preferred_batch_size"] == [32]
    before = triton.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    tier_client.classify(["a good film", "a dull plot", "fine"])
    infer_outputs(triton, ["a good film"])
    after = triton.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 4
    assert int(after["execution_count"]) - int(before.get("execution_count", 0)) == 2
    success = after["inference_stats"]["success"]
    assert int(success["count"]) == int(after["execution_count"]) and int(success["ns"]) > 0
    with pytest.raises(InferenceServerException) as failure:
        triton.get_model_config("another")
    assert failure.value.status() == "StatusCode.NOT_FOUND"


def test_triton_only_rpcs_are_unimplemented(triton: grpcclient.InferenceServerClient) -> None:
    for call in (triton.get_model_repository_index, triton.get_system_shared_memory_status,
                 triton.get_log_settings):
        with pytest.raises(InferenceServerException) as failure:
            call()
        assert failure.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as failure:
        triton.get_model_metadata("another")
    assert failure.value.status() == "StatusCode.NOT_FOUND"
    assert triton.is_server_ready()


def _messages(file: descriptor_pb2.FileDescriptorProto) -> dict[str, list[tuple[object, ...]]]:
    found: dict[str, list[tuple[object, ...]]] = {}

    def walk(message: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        found[prefix + message.name] = [(f.number, f.name, f.type, f.label, f.type_name) for f in message.field]
        for nested in message.nested_type:
            walk(nested, f"{prefix}{message.name}.")

    for message in file.message_type:
        walk(message, "")
    return found


def test_our_proto_has_the_field_numbers_tritonclient_uses() -> None:
    """Our generated descriptors (in a subprocess: they cannot share a process) against tritonclient's."""
    dump = ("import sys; from shared.wire.stubs import inference_stubs; from google.protobuf import descriptor_pb2; "
            "f = descriptor_pb2.FileDescriptorProto(); inference_stubs()[0].DESCRIPTOR.CopyToProto(f); "
            "sys.stdout.buffer.write(f.SerializeToString())")
    ours = descriptor_pb2.FileDescriptorProto.FromString(
        subprocess.run([sys.executable, "-c", dump], check=True, capture_output=True,
                       cwd=Path(__file__).resolve().parent.parent).stdout)
    theirs, their_config = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    model_config_pb2.DESCRIPTOR.CopyToProto(their_config)
    assert ours.package == theirs.package == their_config.package == "inference"
    our_messages, their_messages = _messages(ours), {**_messages(their_config), **_messages(theirs)}
    for name, fields in our_messages.items():  # Triton's config messages: ours hold a subset of the fields
        assert set(fields) <= set(their_messages[name]), name
    our_types = {v.name: v.number for v in ours.enum_type[0].value}
    assert ours.enum_type[0].name == "DataType" and our_types == {
        v.name: v.number for v in their_config.enum_type[0].value} | our_types
    their_methods = {m.name: m for m in theirs.service[0].method}
    assert [m.name for m in ours.service[0].method] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelConfig", "ModelStatistics"]
    for method in ours.service[0].method:
        assert (method.input_type, method.output_type) == (
            their_methods[method.name].input_type, their_methods[method.name].output_type)
