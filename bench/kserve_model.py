"""The whole model served by KServe's Python ModelServer: bench.peers' standard-server peer.

Runs in KServe's own virtualenv (bench.peers makes it; kserve, onnxruntime, tokenizers, numpy), so
nothing here imports tierserve. It is KServe's documented custom-model pattern: a `kserve.Model`
whose synchronous `predict` tokenises the texts of one Open Inference Protocol request (padded to
the longest, truncated to the manifest's max_length, as the entry tier does), runs the whole-model
ONNX graph (bench.whole_model) with onnxruntime and answers the entry tier's five outputs, with
the final exit's temperature applied. Everything else is KServe's defaults (no dynamic batching,
one worker, its request logging).

Triton's perf_analyzer calls ModelConfig, which KServe does not serve; --model-config adds that one
method (the serialized ModelConfigResponse bench.peers wrote) beside KServe's servicer, untouched
on the inference path.

    <kserve-venv>/bin/python bench/kserve_model.py --artifacts artifacts/default-whole \
        --model_name whole --grpc_port 8081 --http_port 8080
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from tokenizers import Tokenizer

SERVICE = "inference.GRPCInferenceService"


class WholeModel(Model):
    def __init__(self, name: str, artifacts: Path, onnx_threads: int) -> None:
        super().__init__(name)
        manifest = json.loads((artifacts / "manifest.json").read_text())
        self.labels = [str(label) for label in manifest["labels"]]
        self.temperature = float(manifest["exits"][0]["temperature"])  # the whole model's exit: the final one
        self.tokenizer = Tokenizer.from_file(str(artifacts / manifest["tokenizer_file"]))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(manifest["max_length"]))
        options = onnxruntime.SessionOptions()
        if onnx_threads > 0:  # 0: onnxruntime's default, one intra-op thread per core
            options.intra_op_num_threads = onnx_threads
        self.session = onnxruntime.InferenceSession(
            str(artifacts / manifest["slices"][0]["file"]), options, providers=["CPUExecutionProvider"])
        self.ready = True

    def get_input_types(self) -> list[dict[str, Any]]:  # ModelMetadata: perf_analyzer shapes its input from it
        return [{"name": "texts", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        classes = len(self.labels)
        return [{"name": name, "datatype": datatype, "shape": shape} for name, datatype, shape in (
            ("label_index", "INT64", [-1]), ("label", "BYTES", [-1]), ("probabilities", "FP32", [-1, classes]),
            ("confidence", "FP32", [-1]), ("exit_tier", "BYTES", [-1]))]

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> InferResponse:
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in payload.inputs[0].as_numpy().reshape(-1)]
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        width = max(len(x) for x in ids)
        input_ids = np.zeros((len(ids), width), dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        [logits] = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})
        z = logits.astype(np.float64) / self.temperature
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
        index = probs.argmax(axis=1).astype(np.int64)
        outputs = {"label_index": index,
                   "label": np.array([self.labels[i].encode() for i in index], dtype=np.object_),
                   "probabilities": probs, "confidence": probs.max(axis=1),
                   "exit_tier": np.array([b"cloud"] * len(index), dtype=np.object_)}
        infer_outputs = []
        for name, array in outputs.items():
            output = InferOutput(name, list(array.shape), "BYTES" if array.dtype == np.object_ else
                                 {np.int64: "INT64", np.float32: "FP32"}[array.dtype.type])
            output.set_data_from_numpy(array, binary_data=True)
            infer_outputs.append(output)
        return InferResponse(payload.id or "", self.name, infer_outputs, use_binary_outputs=True)


def add_model_config(config: bytes) -> None:
    """Serve ModelConfig (raw bytes of a ModelConfigResponse) beside KServe's own servicer."""
    original = grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server

    async def model_config(request: bytes, context: Any) -> bytes:
        return config

    def add_both(servicer: Any, server: Any) -> None:
        original(servicer, server)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {"ModelConfig": grpc.unary_unary_rpc_method_handler(model_config)}),))

    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server = add_both


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="a whole-model folder (bench.whole_model)")
    parser.add_argument("--model-config", type=Path, help="a serialized ModelConfigResponse to serve")
    parser.add_argument("--onnx-threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--quiet", action="store_true", help="no log line per request (KServe logs each gRPC "
                        "call at INFO; with --enable_latency_logging false no latency line either)")
    args, _ = parser.parse_known_args()
    if args.model_config:
        add_model_config(args.model_config.read_bytes())
    server = ModelServer()  # configures KServe's logging
    if args.quiet:
        logging.getLogger("kserve").setLevel(logging.WARNING)
    server.start([WholeModel(args.model_name, args.artifacts, args.onnx_threads)])


if __name__ == "__main__":
    main()
