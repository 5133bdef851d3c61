"""numpy arrays <-> Tensor messages: raw little-endian bytes with dtype and shape.

Every check a tensor from the wire needs lives here; a bad tensor raises InvalidInput with a
message naming the tensor and the problem.

Forwarded tensors may travel compactly (proto TensorEncoding), chosen by a tier's
`forward_encoding` setting: float tensors as fp32 (raw, the default), fp16, int8 with one scale
per token (per row of the last axis), int8 with one scale per tensor, or 4 bits with one scale per
group of 32 values of the last axis (for slow links: half of int8's bytes, more rounding; a tensor
of one axis, or whose last axis is not a multiple of 32, or with values beyond what float16 scales
reach, goes as int8 instead). An attention mask always
travels losslessly as row lengths (right-padded 0/1 masks) or as uint8. `dtype` and `shape` name
the decoded array, so the receiving tier gets back what its slice takes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import cast

import numpy as np

from shared.errors import InvalidInput
from shared.wire.rpc import pb2

ATTENTION_MASK = "attention_mask"
# forward_encoding setting -> the encoding of float tensors
FLOAT_ENCODINGS: dict[str, int] = {
    "fp32": pb2.TENSOR_ENCODING_RAW, "fp16": pb2.TENSOR_ENCODING_FP16,
    "int8": pb2.TENSOR_ENCODING_INT8_TOKEN, "int8_tensor": pb2.TENSOR_ENCODING_INT8_TENSOR,
    "int4": pb2.TENSOR_ENCODING_INT4_GROUP,
}
INT4_GROUP = 32  # values per scale of the int4 encoding, along the last axis
FP16_MAX = float(np.finfo(np.float16).max)

# Wire dtype names (numpy's) that tensors may carry.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
}
_NATIVE: dict[str, np.dtype] = {name: np.dtype(name) for name in DTYPES}  # what a tensor decodes to
# the wire name by native-order dtype: dtype.name is slow to compute (microseconds), every call
_WIRE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in _NATIVE.items()}
MAX_RANK = 8


def wire_name(dtype: np.dtype) -> str | None:
    """The wire name of an array's dtype (either byte order), None if it cannot be sent."""
    return _WIRE_NAMES.get(dtype) or _WIRE_NAMES.get(dtype.newbyteorder("="))
_ENCODING_NAMES: dict[int, str] = {value: name for name, value in pb2.TensorEncoding.items()}
_UNPADDED_MASK = -1  # _encoding_of's answer for a mask of full rows: sent as LENGTHS


_UNPADDED_MASKS: dict[tuple[tuple[int, ...], np.dtype], np.ndarray] = {}
MAX_CACHED_MASK_VALUES = 8192
MAX_LENGTHS_MASK_VALUES = 1 << 20  # rows x width of a mask sent as row lengths (far above 256 x a max_length)


def unpadded_mask(shape: tuple[int, ...], dtype: np.dtype | type = np.int64) -> np.ndarray:
    """A read-only all-ones attention mask, one per shape and dtype: is_unpadded_mask() knows it
    without looking at its values (numpy calls are what a hop's code spends most on)."""
    key = (tuple(shape), np.dtype(dtype))
    if math.prod(key[0]) > MAX_CACHED_MASK_VALUES:  # kept small: the cache holds up to 1024 of them
        return np.ones(key[0], key[1])
    mask = _UNPADDED_MASKS.get(key)
    if mask is None:
        if len(_UNPADDED_MASKS) >= 1024:
            _UNPADDED_MASKS.clear()
        mask = _UNPADDED_MASKS[key] = np.ones(key[0], key[1])
        mask.flags.writeable = False
    return mask


def all_finite(array: np.ndarray) -> bool:
    """Whether every value is finite (always so for integers). A finite sum means every value is:
    one pass instead of two; a sum that overflows (or an array holding NaN) gets the exact check."""
    if array.dtype.kind != "f":
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(array.sum())):
            return True
    return bool(np.isfinite(array).all())


def is_unpadded_mask(array: np.ndarray) -> bool:
    """True if `array` is all ones; False if unknown without looking at its values (it may still be)."""
    return _UNPADDED_MASKS.get((array.shape, array.dtype)) is array


def is_all_ones(mask: np.ndarray) -> bool:
    """True if every value of `mask` is 1 (a mask without padding): at once for unpadded_mask's arrays."""
    return is_unpadded_mask(mask) or bool((mask == 1).all())


def to_tensor(array: np.ndarray) -> pb2.Tensor:
    array = np.asarray(array)
    name = wire_name(array.dtype)
    if name is None:
        raise ValueError(
            f"dtype {array.dtype} cannot be sent as a tensor (supported: {', '.join(DTYPES)})")
    wire = DTYPES[name]  # tobytes() writes C order; only another byte order needs converting first
    data = (array if array.dtype == wire else np.ascontiguousarray(array, dtype=wire)).tobytes()
    return pb2.Tensor(dtype=name, shape=array.shape, data=data,
                      encoding=pb2.TENSOR_ENCODING_RAW)


def from_tensor(tensor: pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """The array a Tensor message holds (raw: read-only, sharing the message's bytes)."""
    if tensor.encoding != pb2.TENSOR_ENCODING_RAW:
        return _decode(tensor, name)
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidInput(
            f"tensor '{name}' has unknown dtype '{tensor.dtype}' (supported: {', '.join(DTYPES)})")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"tensor '{name}' has rank {len(shape)}, at most {MAX_RANK} allowed")
    if min(shape, default=0) < 0:
        raise InvalidInput(f"tensor '{name}' has a negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    data = tensor.data  # each read of a bytes field copies it
    if len(data) != expected:
        raise InvalidInput(
            f"tensor '{name}' has {len(data)} bytes of data; shape {list(shape)} "
            f"of {tensor.dtype} needs {expected}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if not all_finite(array):
        bad = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
        raise InvalidInput(
            f"tensor '{name}' holds NaN or infinite values (first at flat index {bad})")
    return array


def encode_tensors(arrays: Mapping[str, np.ndarray], encoding: str = "fp32") -> dict[str, pb2.Tensor]:
    """Tensor messages for `arrays`: float tensors in `encoding` (FLOAT_ENCODINGS), masks compact."""
    float_encoding = _float_encoding(encoding)
    return {name: _encode(name, array, float_encoding) for name, array in arrays.items()}


def decode_tensors(tensors: Mapping[str, pb2.Tensor]) -> dict[str, np.ndarray]:
    return {name: from_tensor(tensor, name) for name, tensor in tensors.items()}


def wire_bytes(tensors: Mapping[str, pb2.Tensor]) -> int:
    """The tensor payload of encoded tensors on the wire: data and scales."""
    return sum(len(t.data) + len(t.scales) for t in tensors.values())


def _float_encoding(encoding: str) -> int:
    if encoding not in FLOAT_ENCODINGS:
        raise ValueError(f"unknown tensor encoding {encoding!r}: one of {', '.join(FLOAT_ENCODINGS)}")
    return FLOAT_ENCODINGS[encoding]


def _encoding_of(name: str, array: np.ndarray, float_encoding: int) -> int:
    """How one tensor travels: float tensors as asked; a 0/1 attention mask compactly
    (_UNPADDED_MASK: as lengths, every row full)."""
    kind = array.dtype.kind
    if not array.size or wire_name(array.dtype) is None:
        return pb2.TENSOR_ENCODING_RAW
    if kind == "f":
        if float_encoding == pb2.TENSOR_ENCODING_INT4_GROUP and (array.ndim < 2 or array.shape[-1] % INT4_GROUP):
            float_encoding = pb2.TENSOR_ENCODING_INT8_TOKEN
        if float_encoding == pb2.TENSOR_ENCODING_INT8_TOKEN and array.ndim < 2:
            return pb2.TENSOR_ENCODING_INT8_TENSOR
        return float_encoding
    if name == ATTENTION_MASK and kind in "iub":
        if array.ndim == 2 and is_all_ones(array):  # no padding: the common case, checked first
            return _UNPADDED_MASK
        if array.ndim == 2 and np.array_equal(array, _right_padded(array.sum(axis=1), array.shape[1])):
            return pb2.TENSOR_ENCODING_LENGTHS  # (which also means it holds only 0 and 1)
        if not ((array == 0) | (array == 1)).all():
            return pb2.TENSOR_ENCODING_RAW  # the receiver explains what is wrong with it
        return pb2.TENSOR_ENCODING_UINT8
    return pb2.TENSOR_ENCODING_RAW


def _lengths_bytes(lengths: list[int]) -> bytes:
    return struct.pack(f"<{len(lengths)}i", *lengths)


def _right_padded(lengths: np.ndarray, width: int) -> np.ndarray:
    """The 0/1 mask [len(lengths), width] whose row i starts with lengths[i] ones (bool)."""
    return np.arange(width) < lengths[:, None]


def _encode(name: str, array: np.ndarray, float_encoding: int) -> pb2.Tensor:
    array = np.asarray(array)
    kind = _encoding_of(name, array, float_encoding)
    if kind == pb2.TENSOR_ENCODING_RAW:
        return to_tensor(array)
    scales = b""
    int4 = _int4_bytes(array) if kind == pb2.TENSOR_ENCODING_INT4_GROUP else None
    if kind == pb2.TENSOR_ENCODING_INT4_GROUP and int4 is None:  # values beyond float16 scales: int8 per token
        kind = pb2.TENSOR_ENCODING_INT8_TOKEN
    if kind == _UNPADDED_MASK:  # every row's length is the width: no numpy call needed
        kind, data = pb2.TENSOR_ENCODING_LENGTHS, _lengths_bytes([array.shape[1]] * array.shape[0])
    elif kind == pb2.TENSOR_ENCODING_LENGTHS:
        data = array.sum(axis=1).astype("<i4").tobytes()
    elif kind == pb2.TENSOR_ENCODING_UINT8:
        data = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    elif kind == pb2.TENSOR_ENCODING_FP16:  # saturates beyond fp16's range instead of sending inf
        data = np.clip(array, -FP16_MAX, FP16_MAX).astype("<f2").tobytes()
    elif int4 is not None:
        data, scales = int4
    else:
        values = array.astype(np.float32)
        per_token = kind == pb2.TENSOR_ENCODING_INT8_TOKEN
        absmax = np.abs(values).max(axis=-1, keepdims=True) if per_token else np.abs(values).max(initial=0.0)
        scale = (absmax / 127.0).astype(np.float32)
        q = np.rint(values / np.where(scale > 0, scale, 1.0)).clip(-127, 127).astype(np.int8)
        data, scales = q.tobytes(), np.ascontiguousarray(scale, dtype="<f4").tobytes()
    return pb2.Tensor(dtype=wire_name(array.dtype), shape=array.shape, data=data,
                      encoding=cast("pb2.TensorEncoding", kind), scales=scales)


# For a float16 array, the largest int4 scale whose 7 * scale is a finite float16 (65504 / 7 rounds up
# past it): its largest values lose less than half a step, and the receiver's array stays finite
_INT4_FP16_ARRAY_MAX_SCALE = 9352.0


def _int4_bytes(array: np.ndarray) -> tuple[bytes, bytes] | None:
    """Data and scales of the int4 encoding: q in -7..7 stored as q + 8, two to a byte, low nibble first.
    None where a group's values need a larger scale than float16 holds (or are not finite)."""
    groups = array.astype(np.float32).reshape(-1, INT4_GROUP)
    wanted = np.abs(groups).max(axis=1, keepdims=True) / 7.0
    if not wanted.max(initial=0.0) <= FP16_MAX:  # (also where a value is NaN or infinite)
        return None
    if array.dtype == np.float16:
        wanted = np.minimum(wanted, _INT4_FP16_ARRAY_MAX_SCALE)
    # float16 scales, rounded up: no |value| / scale passes 7 (rounding to nearest would clip a group's
    # largest values, by whole steps where the scale is a float16 subnormal)
    scale = wanted.astype("<f2")
    scale = np.where(scale.astype(np.float32) < wanted, np.nextafter(scale, np.float16(np.inf)), scale)
    step = scale.astype(np.float32)
    q = (np.rint(groups / np.where(step > 0, step, 1.0)).clip(-7, 7) + 8).astype(np.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).tobytes(), scale.astype("<f2").tobytes()


def _int4_values(data: bytes, scales: np.ndarray, shape: tuple[int, ...], native: np.dtype) -> np.ndarray:
    """The values of int4 data; one array of the result's size besides the result (a float16 or float64 dtype:
    one more)."""
    packed = np.frombuffer(data, np.uint8)
    nibbles = np.empty((packed.size, 2), np.uint8)  # the stored q + 8, in order
    np.bitwise_and(packed, 15, out=nibbles[:, 0])
    np.right_shift(packed, 4, out=nibbles[:, 1])
    values = nibbles.astype(np.float32)
    del nibbles
    values -= 8.0
    groups = values.reshape(-1, INT4_GROUP)  # a view: scaled in place
    groups *= scales[:, None]
    return values.reshape(shape).astype(native, copy=False)


# encoding -> (bytes per value, scales: a count, or -1 for one per row of the last axis)
_ITEM_BYTES_AND_SCALES: dict[int, tuple[int, int]] = {
    pb2.TENSOR_ENCODING_FP16: (2, 0), pb2.TENSOR_ENCODING_INT8_TENSOR: (1, 1),
    pb2.TENSOR_ENCODING_INT8_TOKEN: (1, -1), pb2.TENSOR_ENCODING_UINT8: (1, 0),
}


def _decode(tensor: pb2.Tensor, name: str) -> np.ndarray:
    """The array an encoded (not raw) Tensor holds, every field checked."""
    kind = tensor.encoding
    dtype_name = tensor.dtype
    dtype = DTYPES.get(dtype_name)
    label = _ENCODING_NAMES.get(kind)
    if label is None:
        raise InvalidInput(f"tensor '{name}' has unsupported encoding {kind}")
    if dtype is None:
        raise InvalidInput(
            f"tensor '{name}' has unknown dtype '{dtype_name}' (supported: {', '.join(DTYPES)})")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK or min(shape, default=0) < 0:
        raise InvalidInput(f"tensor '{name}' has an invalid shape {list(shape)}")
    floats = kind in (pb2.TENSOR_ENCODING_FP16, pb2.TENSOR_ENCODING_INT8_TENSOR, pb2.TENSOR_ENCODING_INT8_TOKEN,
                      pb2.TENSOR_ENCODING_INT4_GROUP)
    if floats != (dtype.kind == "f"):
        raise InvalidInput(f"tensor '{name}': encoding {label} does not apply to dtype {dtype_name}")
    if kind == pb2.TENSOR_ENCODING_LENGTHS and len(shape) != 2:
        raise InvalidInput(f"tensor '{name}': encoding {label} needs shape [batch, sequence], got {list(shape)}")
    if kind == pb2.TENSOR_ENCODING_INT8_TOKEN and not shape:  # a scale per row of the last axis
        raise InvalidInput(f"tensor '{name}': encoding {label} needs at least one axis, got a scalar")
    if kind == pb2.TENSOR_ENCODING_INT4_GROUP and (not shape or shape[-1] % INT4_GROUP):
        raise InvalidInput(f"tensor '{name}': encoding {label} needs a last axis that is a multiple of "
                           f"{INT4_GROUP}, got shape {list(shape)}")
    native = _NATIVE[dtype_name]
    size = math.prod(shape)
    rows = math.prod(shape[:-1]) if shape else 0  # of the last axis, even where that axis is empty
    item, n_scales = _ITEM_BYTES_AND_SCALES.get(kind, (0, 0))
    if n_scales < 0:  # one per row
        n_scales = rows
    expected = 4 * shape[0] if kind == pb2.TENSOR_ENCODING_LENGTHS else size * item
    scale_size = 4
    if kind == pb2.TENSOR_ENCODING_INT4_GROUP:  # half a byte per value, a float16 scale per group
        expected, n_scales, scale_size = size // 2, size // INT4_GROUP, 2
    data, scale_bytes = tensor.data, tensor.scales  # each read of a bytes field copies it
    if len(data) != expected or len(scale_bytes) != scale_size * n_scales:
        raise InvalidInput(
            f"tensor '{name}' ({label}) has {len(data)} bytes of data and {len(scale_bytes)} of "
            f"scales; shape {list(shape)} needs {expected} and {scale_size * n_scales}")
    if kind == pb2.TENSOR_ENCODING_LENGTHS:  # one int per row: plain Python beats numpy's set-up
        if size > MAX_LENGTHS_MASK_VALUES:  # a few bytes would otherwise unfold into any size of mask
            raise InvalidInput(f"tensor '{name}' ({label}) of shape {list(shape)} unfolds into {size} values, at "
                               f"most {MAX_LENGTHS_MASK_VALUES}")
        lengths = struct.unpack(f"<{shape[0]}i", data)
        if not lengths:
            return np.zeros(shape, native)
        shortest, longest = min(lengths), max(lengths)
        if shortest < 0 or longest > shape[1]:
            raise InvalidInput(f"tensor '{name}' has row lengths outside 0..{shape[1]}")
        if shortest == shape[1]:  # no padding (always so for one sample)
            return unpadded_mask(shape, native)
        return _right_padded(np.array(lengths), shape[1]).astype(native)
    if kind == pb2.TENSOR_ENCODING_UINT8:
        return np.frombuffer(data, np.uint8).reshape(shape).astype(native)
    if kind == pb2.TENSOR_ENCODING_FP16:
        values = np.frombuffer(data, "<f2").reshape(shape).astype(native)
    else:
        scales = np.frombuffer(scale_bytes, "<f4" if scale_size == 4 else "<f2")
        if not (np.isfinite(scales) & (scales >= 0)).all():
            raise InvalidInput(f"tensor '{name}' has negative, NaN or infinite scales")
        if kind == pb2.TENSOR_ENCODING_INT4_GROUP:
            with np.errstate(over="ignore"):  # beyond a float16 dtype's range: refused just below
                values = _int4_values(data, scales.astype(np.float32), shape, native)
        else:
            q = np.frombuffer(data, np.int8).reshape(shape)
            scale = scales.reshape(*shape[:-1], 1) if kind == pb2.TENSOR_ENCODING_INT8_TOKEN else scales[0]
            values = (q * scale).astype(native)
    if not all_finite(values):
        raise InvalidInput(f"tensor '{name}' holds NaN or infinite values")
    return values
