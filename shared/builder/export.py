"""Export the three slices to single-file ONNX and check the chain against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from shared.builder.model import EarlyExitBert, LastSlice, MiddleSlice, MobileSlice, PairMobileSlice, model_inputs
from shared.contract.manifest import TIERS, SliceSpec, sha256_file
from shared.contract.text import TOKEN_TYPE_IDS, Tokens

MAX_LOGIT_DIFF = 1e-4
SLICE_IO = {
    "mobile": (["input_ids", "attention_mask"], ["logits", "hidden_out"]),
    "edge": (["hidden", "attention_mask"], ["logits", "hidden_out"]),
    "cloud": (["hidden", "attention_mask"], ["logits"]),
}
# ONNX forbids an input and an output of one name, so the hidden state leaves as `hidden_out`
# and enters the next slice as `hidden`; the manifest records the wiring.
FORWARDS = {"hidden": "hidden_out", "attention_mask": "attention_mask"}


class ExportMismatch(RuntimeError):
    pass


def export_slices(model: EarlyExitBert, folder: Path, pairs: bool = False, opset: int = 17) -> list[SliceSpec]:
    """Write mobile.onnx, edge.onnx, cloud.onnx with dynamic batch and sequence axes; a sentence-pair
    model's mobile slice takes token_type_ids as a third input."""
    model.eval()
    attn = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # plain matmul attention exports on every opset
    try:
        hidden_size = model.config.hidden_size
        ids = torch.ones(2, 7, dtype=torch.int64)
        mask = torch.ones(2, 7, dtype=torch.int64)
        hidden = torch.zeros(2, 7, hidden_size)
        # wrappers in eval mode: the exporter restores each wrapper's mode afterwards, recursively
        mobile = PairMobileSlice(model) if pairs else MobileSlice(model)
        modules = {"mobile": mobile.eval(), "edge": MiddleSlice(model, 1).eval(), "cloud": LastSlice(model, 2).eval()}
        types = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 2, dtype=torch.int64)
        examples = {"mobile": (ids, mask, types) if pairs else (ids, mask), "edge": (hidden, mask),
                    "cloud": (hidden, mask)}
        specs, first = [], 1
        for index, tier in enumerate(TIERS):
            inputs, outputs = SLICE_IO[tier]
            if pairs and tier == "mobile":
                inputs = [*inputs, TOKEN_TYPE_IDS]
            path = folder / f"{tier}.onnx"
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                    TOKEN_TYPE_IDS: {0: "batch", 1: "sequence"},
                    "hidden": {0: "batch", 1: "sequence"}, "hidden_out": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch"}}
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    modules[tier], examples[tier], str(path), input_names=inputs, output_names=outputs,
                    dynamic_axes={k: v for k, v in axes.items() if k in inputs + outputs},
                    opset_version=opset, dynamo=False,
                )
            last = model.split_points[index]
            specs.append(SliceSpec(tier=tier, file=path.name, sha256=sha256_file(path), inputs=inputs,
                                   outputs=outputs, forwards=FORWARDS if tier != "cloud" else {},
                                   first_layer=first, last_layer=last))
            first = last + 1
        return specs
    finally:
        model.config._attn_implementation = attn


def run_chain(sessions: list[ort.InferenceSession], tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Logits of every exit from the chained onnxruntime slices (every sample through every slice);
    `tensors`: the mobile slice's inputs (Tokens.padded)."""
    logits, hidden = sessions[0].run(None, tensors)
    all_logits = [logits]
    for session in sessions[1:]:
        out = session.run(None, {"hidden": hidden, "attention_mask": tensors["attention_mask"]})
        all_logits.append(out[0])
        hidden = out[1] if len(out) > 1 else hidden
    return all_logits


def check_chain(model: EarlyExitBert, folder: Path, tokens: Tokens, batch_size: int = 16) -> float:
    """Max |logit difference| between the ONNX chain and PyTorch over real mixed-length batches.

    Raises ExportMismatch above MAX_LOGIT_DIFF.
    """
    sessions = [ort.InferenceSession(str(folder / f"{t}.onnx"), providers=["CPUExecutionProvider"]) for t in TIERS]
    worst = 0.0
    for start in range(0, len(tokens), batch_size):
        tensors = tokens.take(range(start, min(start + batch_size, len(tokens)))).padded()
        with torch.no_grad():
            expected = [x.numpy() for x in model(*model_inputs(tensors))]
        got = run_chain(sessions, tensors)
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True)))
    if not worst <= MAX_LOGIT_DIFF:
        raise ExportMismatch(
            f"ONNX slices disagree with PyTorch: max |logit difference| {worst:.2e} > {MAX_LOGIT_DIFF:.0e}"
        )
    return worst

