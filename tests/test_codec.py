"""numpy <-> Tensor message round trips and the checks on tensors from the wire."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import InvalidInput
from shared.wire.codec import decode_tensors, encode_tensors, from_tensor, to_tensor
from shared.wire.rpc import pb2


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "int32", "int8",
                                   "uint8", "bool"])
def test_round_trip_keeps_dtype_shape_and_values(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    back = from_tensor(to_tensor(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_data_is_raw_little_endian() -> None:
    tensor = to_tensor(np.array([1, 256], dtype=np.int32))
    assert tensor.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert from_tensor(pb2.Tensor(dtype="int32", shape=[2], data=tensor.data)).tolist() == [1, 256]


def test_big_endian_arrays_are_sent_little_endian() -> None:
    array = np.array([1.5, -2.0], dtype=">f4")
    assert from_tensor(to_tensor(array)).tolist() == [1.5, -2.0]


def test_non_contiguous_and_empty_arrays() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    np.testing.assert_array_equal(from_tensor(to_tensor(array)), array)
    assert from_tensor(to_tensor(np.zeros((0, 5), np.float32))).shape == (0, 5)


def test_named_maps_round_trip() -> None:
    arrays = {"hidden": np.ones((1, 2, 3), np.float32), "attention_mask": np.ones((1, 2), np.int64)}
    back = decode_tensors(encode_tensors(arrays))
    assert set(back) == set(arrays)


@pytest.mark.parametrize(("tensor", "message"), [
    (pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8), "unknown dtype 'complex64'"),
    (pb2.Tensor(dtype="", shape=[1], data=b"\0" * 4), "unknown dtype ''"),
    (pb2.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20), "has 20 bytes of data"),
    (pb2.Tensor(dtype="float32", shape=[-1], data=b""), "negative dimension"),
    (pb2.Tensor(dtype="float32", shape=[1] * 9, data=b"\0" * 4), "rank 9"),
    (pb2.Tensor(dtype="float32", shape=[1 << 40, 1 << 40], data=b""), "bytes of data"),
    (to_tensor(np.array([0.0, np.nan], np.float32)), "NaN or infinite values (first at flat"),
    (to_tensor(np.array([np.inf], np.float16)), "NaN or infinite"),
    (pb2.Tensor(dtype="float32", shape=[1], data=b"\0" * 4, encoding=7), "unsupported encoding"),
])
def test_bad_tensors_are_invalid_input_naming_the_problem(tensor: pb2.Tensor, message: str) -> None:
    with pytest.raises(InvalidInput, match="tensor 'hidden'") as caught:
        from_tensor(tensor, "hidden")
    assert message in str(caught.value)


def test_unsupported_dtype_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="complex64"):
        to_tensor(np.zeros(2, np.complex64))
