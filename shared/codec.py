"""numpy arrays <-> Tensor messages: raw little-endian bytes with dtype and shape.

Every check a tensor from the wire needs lives here; a bad tensor raises InvalidInput with a
message naming the tensor and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from shared.errors import InvalidInput
from shared.rpc import pb2

# Wire dtype names (numpy's) that tensors may carry.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
}
MAX_RANK = 8


def to_tensor(array: np.ndarray) -> pb2.Tensor:
    array = np.asarray(array)
    name = array.dtype.name
    if name not in DTYPES:
        raise ValueError(
            f"dtype {name} cannot be sent as a tensor (supported: {', '.join(DTYPES)})")
    data = np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes()
    return pb2.Tensor(dtype=name, shape=array.shape, data=data,
                      encoding=pb2.TENSOR_ENCODING_RAW)


def from_tensor(tensor: pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """The array a Tensor message holds (read-only, sharing the message's bytes)."""
    if tensor.encoding != pb2.TENSOR_ENCODING_RAW:
        raise InvalidInput(f"tensor '{name}' has unsupported encoding {tensor.encoding}")
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidInput(
            f"tensor '{name}' has unknown dtype '{tensor.dtype}' (supported: {', '.join(DTYPES)})")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"tensor '{name}' has rank {len(shape)}, at most {MAX_RANK} allowed")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"tensor '{name}' has a negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"tensor '{name}' has {len(tensor.data)} bytes of data; shape {list(shape)} "
            f"of {tensor.dtype} needs {expected}")
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
        raise InvalidInput(
            f"tensor '{name}' holds NaN or infinite values (first at flat index {bad})")
    return array


def encode_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, pb2.Tensor]:
    return {name: to_tensor(array) for name, array in arrays.items()}


def decode_tensors(tensors: Mapping[str, pb2.Tensor]) -> dict[str, np.ndarray]:
    return {name: from_tensor(tensor, name) for name, tensor in tensors.items()}


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in arrays.values())
