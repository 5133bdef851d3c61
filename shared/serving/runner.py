"""One ONNX slice in onnxruntime (CPU): input checks against its signature, runs off the event loop.

Slices are addressed by the manifest's tensor names. ONNX graphs cannot reuse a name for an input
and an output (an edge slice maps "hidden" to "hidden"), so an exporter may rename graph inputs
(e.g. "hidden.1"); the manifest's names are therefore matched to the graph's by position.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from shared.contract.manifest import SliceSpec
from shared.errors import ArtifactError, InvalidInput
from shared.wire.codec import ATTENTION_MASK, is_all_ones

__all__ = ["ATTENTION_MASK", "MAX_ABS_INPUT", "SliceResult", "SliceRunner", "TensorSignature"]
# Float inputs of a slice (hidden states after LayerNorm, pixels 0..255) stay far below this; values
# near float32's limits pass the NaN/inf check but overflow inside the slice.
MAX_ABS_INPUT = 1e4
_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class TensorSignature:
    name: str  # the manifest's name
    graph_name: str  # the ONNX graph's name
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # int: fixed; str: a named dynamic dim; None: free


@dataclass(frozen=True)
class SliceResult:
    outputs: dict[str, np.ndarray]
    compute_seconds: float


def _signatures(names: list[str], args: list, tier: str, kind: str) -> list[TensorSignature]:
    if len(names) != len(args):
        raise ArtifactError(
            f"the {tier} slice has {len(args)} {kind} ({[a.name for a in args]}), "
            f"the manifest lists {len(names)} ({names})")
    signatures = []
    for name, arg in zip(names, args, strict=True):
        if arg.type not in _ORT_DTYPES:
            raise ArtifactError(f"the {tier} slice's {kind[:-1]} {arg.name} has type {arg.type}")
        shape = tuple(d if isinstance(d, int) or d is None else str(d) for d in arg.shape)
        signatures.append(TensorSignature(name, arg.name, np.dtype(_ORT_DTYPES[arg.type]), shape))
    return signatures


class SliceRunner:
    """An InferenceSession for one slice; `run` executes on a private thread pool.

    Inputs are bounded by what the model takes: sequences of at most `max_sequence` tokens (the
    manifest's max_length), float values within +-`max_abs_input` (MAX_ABS_INPUT)."""

    def __init__(self, path: str | Path, spec: SliceSpec, intra_op_threads: int = 1,
                 workers: int = 1, spinning: bool = False, max_sequence: int | None = None,
                 max_abs_input: float = MAX_ABS_INPUT) -> None:
        self.max_sequence = max_sequence
        self.max_abs_input = max_abs_input
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # onnxruntime's default: idle pool threads spin, taking cores the other tiers need
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {path}: {exc}") from exc
        self.tier = spec.tier
        self.inputs = _signatures(spec.inputs, self.session.get_inputs(), spec.tier, "inputs")
        self.outputs = _signatures(spec.outputs, self.session.get_outputs(), spec.tier, "outputs")
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"{spec.tier}-slice")
        self._checked: dict[tuple, int] = {}  # (name, dtype, shape) per array -> batch size

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def check_inputs(self, arrays: Mapping[str, np.ndarray]) -> int:
        """Raise InvalidInput unless `arrays` fit this slice; return the batch size. The names,
        dtypes and shapes of a set that passed are remembered (a few hundred sets at most): a
        request of a known structure has only its attention mask's values checked again."""
        key = tuple((name, array.dtype, array.shape) for name, array in arrays.items())
        batch = self._checked.get(key)
        if batch is None:
            batch = self._check_structure(arrays)
            if len(self._checked) >= 512:
                self._checked.clear()
            self._checked[key] = batch
        if ATTENTION_MASK in arrays:
            _check_mask_values(arrays[ATTENTION_MASK])
        for name, array in arrays.items():
            if array.dtype.kind == "f" and array.size and (
                    array.max() > self.max_abs_input or array.min() < -self.max_abs_input):
                raise InvalidInput(f"tensor '{name}' holds values beyond +-{self.max_abs_input:g}, the bound "
                                   f"of this tier's inputs (largest magnitude {float(np.abs(array).max()):g})")
        return batch

    def _check_structure(self, arrays: Mapping[str, np.ndarray]) -> int:
        missing = [s.name for s in self.inputs if s.name not in arrays]
        unexpected = sorted(set(arrays) - set(self.input_names))
        if missing or unexpected:
            raise InvalidInput(
                f"the {self.tier} slice takes tensors {self.input_names}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"unexpected {unexpected}" if unexpected else ""))
        named_dims: dict[str, tuple[int, str]] = {}
        batch: int | None = None
        for sig in self.inputs:
            array = arrays[sig.name]
            if array.dtype != sig.dtype:
                raise InvalidInput(
                    f"tensor '{sig.name}' has dtype {array.dtype}, the {self.tier} slice "
                    f"expects {sig.dtype}")
            if array.ndim != len(sig.shape):
                raise InvalidInput(
                    f"tensor '{sig.name}' has shape {list(array.shape)} (rank {array.ndim}), "
                    f"the {self.tier} slice expects rank {len(sig.shape)} {_show(sig.shape)}")
            for axis, (size, want) in enumerate(zip(array.shape, sig.shape, strict=True)):
                if isinstance(want, int) and size != want:
                    raise InvalidInput(
                        f"tensor '{sig.name}' has shape {list(array.shape)}, the {self.tier} "
                        f"slice expects {_show(sig.shape)} (dimension {axis} must be {want})")
                if isinstance(want, str):
                    seen = named_dims.setdefault(want, (size, sig.name))
                    if seen[0] != size:
                        raise InvalidInput(
                            f"tensor '{sig.name}' dimension {axis} is {size}, but tensor "
                            f"'{seen[1]}' has {seen[0]} for the same dimension '{want}'")
            if batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise InvalidInput(
                    f"tensor '{sig.name}' has batch size {array.shape[0]}, "
                    f"other inputs have {batch}")
        if ATTENTION_MASK in arrays:
            _check_mask_shape(arrays)
            length = arrays[ATTENTION_MASK].shape[1]
            if self.max_sequence is not None and length > self.max_sequence:
                raise InvalidInput(f"sequences of {length} tokens: this model takes at most {self.max_sequence} "
                                   "(its max_length)")
        return batch or 0

    def run_sync(self, arrays: Mapping[str, np.ndarray]) -> SliceResult:
        feed = {s.graph_name: arrays[s.name] for s in self.inputs}
        started = time.perf_counter()
        values = self.session.run([s.graph_name for s in self.outputs], feed)
        seconds = time.perf_counter() - started
        return SliceResult(dict(zip(self.output_names, values, strict=True)), seconds)

    async def run(self, arrays: Mapping[str, np.ndarray]) -> SliceResult:
        """Run the slice on the runner's thread pool (onnxruntime releases the GIL)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_sync, arrays)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _show(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_mask_shape(arrays: Mapping[str, np.ndarray]) -> None:
    mask = arrays[ATTENTION_MASK]
    if mask.ndim != 2:
        raise InvalidInput(f"tensor '{ATTENTION_MASK}' must be [batch, sequence], got "
                           f"{list(mask.shape)}")
    for name, array in arrays.items():
        if name != ATTENTION_MASK and array.ndim >= 2 and array.shape[:2] != mask.shape:
            raise InvalidInput(
                f"tensor '{name}' has shape {list(array.shape)}, its first two dimensions must "
                f"match '{ATTENTION_MASK}' {list(mask.shape)}")


def _check_mask_values(mask: np.ndarray) -> None:
    if mask.size and is_all_ones(mask):  # no padding (always so for one sample): valid
        return
    if mask.size and (mask.min() < 0 or mask.max() > 1):
        raise InvalidInput(f"tensor '{ATTENTION_MASK}' may only hold 0 and 1")
    if len(mask) and not (mask.shape[1] and mask.any(axis=1).all()):
        empty = int(np.flatnonzero(~mask.any(axis=1))[0]) if mask.shape[1] else 0
        raise InvalidInput(f"tensor '{ATTENTION_MASK}' row {empty} has no tokens")
