"""Compact forwarded tensors (issue 6): fp16 / int8 / int4 round-trip error bounds, masks as lengths,
the byte count the metrics record, and bad encodings as InvalidInput."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from shared.errors import InvalidInput
from shared.serving.settings import ForwardingSettings
from shared.wire.codec import (
    FLOAT_ENCODINGS,
    INT4_GROUP,
    decode_tensors,
    encode_tensors,
    from_tensor,
    is_unpadded_mask,
    unpadded_mask,
    wire_bytes,
)
from shared.wire.rpc import pb2

RNG = np.random.default_rng(0)


def hidden_and_mask(batch: int = 3, seq: int = 9, width: int = 16) -> dict[str, np.ndarray]:
    lengths = np.array([seq, 4, 1][:batch])
    mask = (np.arange(seq) < lengths[:, None]).astype(np.int64)
    hidden = (RNG.standard_normal((batch, seq, width)) * RNG.uniform(0.1, 20, (batch, seq, 1)))
    return {"hidden": hidden.astype(np.float32), "attention_mask": mask}


def round_trip(arrays: dict[str, np.ndarray], encoding: str) -> dict[str, np.ndarray]:
    return decode_tensors(encode_tensors(arrays, encoding))


@pytest.mark.parametrize("encoding", list(FLOAT_ENCODINGS))
def test_round_trip_error_bounds(encoding: str) -> None:
    arrays = hidden_and_mask(width=2 * INT4_GROUP)
    back = round_trip(arrays, encoding)
    hidden, got = arrays["hidden"], back["hidden"]
    assert got.dtype == np.float32 and got.shape == hidden.shape
    np.testing.assert_array_equal(back["attention_mask"], arrays["attention_mask"])
    assert back["attention_mask"].dtype == np.int64
    error = np.abs(got - hidden)
    if encoding == "fp32":
        assert error.max() == 0
    elif encoding == "fp16":  # round to nearest: half an fp16 ulp, relative
        assert (error <= np.abs(hidden) * 2.0**-11 + 1e-7).all()
    elif encoding == "int8":  # half a step of each token's own scale
        step = np.abs(hidden).max(axis=-1, keepdims=True) / 127
        assert (error <= step / 2 * (1 + 1e-5)).all()
    elif encoding == "int4":  # half a step of each group's own scale (a float16 scale: a little more)
        groups = hidden.reshape(-1, INT4_GROUP)
        step = np.abs(groups).max(axis=1, keepdims=True) / 7
        assert (error.reshape(-1, INT4_GROUP) <= step * (0.5 + 2.0**-8)).all()
        assert (error.reshape(-1, INT4_GROUP) > step / 4).any()  # it does round: 15 levels, not 255
    else:
        assert error.max() <= np.abs(hidden).max() / 127 / 2 * (1 + 1e-5)


def test_per_token_scale_beats_per_tensor_on_uneven_tokens() -> None:
    arrays = hidden_and_mask()
    per_token = np.abs(round_trip(arrays, "int8")["hidden"] - arrays["hidden"]).mean()
    per_tensor = np.abs(round_trip(arrays, "int8_tensor")["hidden"] - arrays["hidden"]).mean()
    assert per_token < per_tensor


@pytest.mark.parametrize(("encoding", "hidden_bytes"), [
    ("fp32", 4 * 3 * 9 * 16), ("fp16", 2 * 3 * 9 * 16),
    ("int8", 3 * 9 * 16 + 4 * 3 * 9), ("int8_tensor", 3 * 9 * 16 + 4)])  # values, then scales
def test_wire_bytes_counts_data_and_scales(encoding: str, hidden_bytes: int) -> None:
    tensors = encode_tensors(hidden_and_mask(), encoding)
    assert tensors["attention_mask"].encoding == pb2.TENSOR_ENCODING_LENGTHS
    assert len(tensors["attention_mask"].data) == 4 * 3
    assert wire_bytes(tensors) == hidden_bytes + 4 * 3


def test_int8_sends_about_a_quarter_of_fp32() -> None:
    arrays = hidden_and_mask(batch=1, seq=13, width=384)
    assert wire_bytes(encode_tensors(arrays, "int8")) / wire_bytes(encode_tensors(arrays, "fp32")) < 0.27


def test_int4_sends_half_a_byte_a_value_and_a_float16_scale_a_group() -> None:
    arrays = hidden_and_mask(batch=1, seq=13, width=384)
    hidden = encode_tensors(arrays, "int4")["hidden"]
    assert hidden.encoding == pb2.TENSOR_ENCODING_INT4_GROUP
    assert (len(hidden.data), len(hidden.scales)) == (13 * 384 // 2, 2 * 13 * 384 // INT4_GROUP)
    assert wire_bytes(encode_tensors(arrays, "int4")) / wire_bytes(encode_tensors(arrays, "int8")) < 0.57


def test_int4_packs_two_values_a_byte_low_nibble_first() -> None:
    values = np.zeros((1, INT4_GROUP), np.float32)
    values[0, :3] = [7.0, -7.0, 1.0]  # the scale is 1: q = value, stored as q + 8
    tensor = encode_tensors({"h": values}, "int4")["h"]
    assert tensor.data[:2] == bytes([15 | (1 << 4), 9 | (8 << 4)])
    assert np.frombuffer(tensor.scales, "<f2")[0] == 1.0
    np.testing.assert_array_equal(decode_tensors({"h": tensor})["h"], values)


@pytest.mark.parametrize(("shape", "sent_as"), [
    ((2, 3, 16), pb2.TENSOR_ENCODING_INT8_TOKEN),  # a last axis that is no multiple of the group
    ((30,), pb2.TENSOR_ENCODING_INT8_TENSOR),
    ((64,), pb2.TENSOR_ENCODING_INT8_TENSOR),  # one axis: its groups would span the requests of a batch
    ((2, INT4_GROUP), pb2.TENSOR_ENCODING_INT4_GROUP),
])
def test_int4_falls_back_to_int8_where_its_groups_do_not_fit(shape: tuple[int, ...], sent_as: int) -> None:
    values = RNG.standard_normal(shape).astype(np.float32)
    tensor = encode_tensors({"h": values}, "int4")["h"]
    assert tensor.encoding == sent_as
    assert decode_tensors({"h": tensor})["h"].shape == shape


def test_the_setting_offers_every_encoding_the_codec_has() -> None:
    offered = typing.get_args(ForwardingSettings.model_fields["forward_encoding"].annotation)
    assert set(offered) == set(FLOAT_ENCODINGS)


@pytest.mark.parametrize("mask", [
    np.array([[1, 0, 1, 0]], np.int64),  # not right-padded: uint8
    np.array([[True, True, False]]),
    np.ones((2, 1), np.int32),
    np.zeros((0, 4), np.int64),
])
def test_masks_round_trip_exactly(mask: np.ndarray) -> None:
    back = round_trip({"attention_mask": mask}, "int8")["attention_mask"]
    assert back.dtype == mask.dtype and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)


def test_an_unpadded_mask_is_shared_read_only_and_known_without_its_values() -> None:
    mask = unpadded_mask((2, 5))
    assert mask is unpadded_mask((2, 5)) and is_unpadded_mask(mask)
    np.testing.assert_array_equal(mask, np.ones((2, 5), np.int64))
    with pytest.raises(ValueError):
        mask[0, 0] = 0  # shared: nobody may change it
    assert not is_unpadded_mask(np.ones((2, 5), np.int64))  # equal values, not the shared array
    assert not is_unpadded_mask(unpadded_mask((2, 5), np.int32).astype(np.int64))
    sent = encode_tensors({"attention_mask": mask})["attention_mask"]
    assert sent.encoding == pb2.TENSOR_ENCODING_LENGTHS
    assert decode_tensors({"attention_mask": sent})["attention_mask"] is mask  # full rows decode to it
    padded = np.array([[1, 1, 0]], np.int64)
    back = decode_tensors(encode_tensors({"attention_mask": padded}))["attention_mask"]
    assert not is_unpadded_mask(back) and back.flags.writeable
    np.testing.assert_array_equal(back, padded)


def test_a_mask_that_is_not_0_1_goes_raw_so_the_receiver_can_explain() -> None:
    mask = np.full((1, 3), 3, np.int64)
    assert encode_tensors({"attention_mask": mask})["attention_mask"].encoding == pb2.TENSOR_ENCODING_RAW


def test_integer_tensors_and_extremes() -> None:
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert encode_tensors({"input_ids": ids}, "int8")["input_ids"].encoding == pb2.TENSOR_ENCODING_RAW
    zeros = np.zeros((2, 3, 4), np.float32)
    np.testing.assert_array_equal(round_trip({"h": zeros}, "int8")["h"], zeros)
    big = np.array([[1e6, -1e6]], np.float32)  # beyond fp16: saturates, stays finite
    assert np.isfinite(round_trip({"h": big}, "fp16")["h"]).all()
    with pytest.raises(ValueError, match="unknown tensor encoding"):
        encode_tensors({"h": zeros}, "int2")


def _int4(shape: list[int], scales: bytes, data: bytes | None = None, dtype: str = "float32") -> pb2.Tensor:
    n = int(np.prod(shape))
    return pb2.Tensor(dtype=dtype, shape=shape, data=b"\x88" * (n // 2) if data is None else data, scales=scales,
                      encoding=pb2.TENSOR_ENCODING_INT4_GROUP)


def _int8(shape: list[int], scales: bytes, dtype: str = "float32") -> pb2.Tensor:
    n = int(np.prod(shape))
    return pb2.Tensor(dtype=dtype, shape=shape, data=b"\1" * n, scales=scales,
                      encoding=pb2.TENSOR_ENCODING_INT8_TOKEN)


@pytest.mark.parametrize(("tensor", "message"), [
    (pb2.Tensor(dtype="float32", shape=[1], data=b"\0" * 4, encoding=99), "unsupported encoding 99"),
    (_int8([2, 3], b""), "0 of scales"),
    (_int8([2, 3], np.ones(3, "<f4").tobytes()), "needs 6 and 8"),
    (_int8([1, 2], np.array([np.nan], "<f4").tobytes()), "NaN or infinite scales"),
    (_int8([1, 2], np.array([-1.0], "<f4").tobytes()), "negative"),
    (_int8([1, 2], np.ones(1, "<f4").tobytes(), dtype="int64"), "does not apply to dtype int64"),
    (pb2.Tensor(dtype="float32", shape=[2], data=b"\0" * 3, encoding=pb2.TENSOR_ENCODING_FP16), "3 bytes"),
    (pb2.Tensor(dtype="float16", shape=[1], data=np.array([np.inf], "<f2").tobytes(),
                encoding=pb2.TENSOR_ENCODING_FP16), "NaN or infinite"),
    (pb2.Tensor(dtype="int64", shape=[1, 4], data=np.array([5], "<i4").tobytes(),
                encoding=pb2.TENSOR_ENCODING_LENGTHS), "row lengths outside 0..4"),
    (pb2.Tensor(dtype="int64", shape=[4], data=b"\0" * 4, encoding=pb2.TENSOR_ENCODING_LENGTHS),
     "needs shape [batch, sequence]"),
    (pb2.Tensor(dtype="float32", shape=[1, 2], data=b"\0" * 4, encoding=pb2.TENSOR_ENCODING_LENGTHS),
     "does not apply"),
    (pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 2, encoding=pb2.TENSOR_ENCODING_FP16),
     "unknown dtype"),
    (pb2.Tensor(dtype="float32", shape=[-1], data=b"", encoding=pb2.TENSOR_ENCODING_FP16), "invalid shape"),
    (_int8([], b""), "needs at least one axis"),  # found by test_malformed's random requests
    # an empty last axis still has its rows (found by test_malformed's random requests: it was INTERNAL)
    (_int8([0], b""), "needs 0 and 4"),
    (_int8([3, 0], np.ones(1, "<f4").tobytes()), "needs 0 and 12"),
    (_int4([2, 30], b""), "needs a last axis that is a multiple of 32, got shape [2, 30]"),
    (_int4([], b""), "multiple of 32, got shape []"),
    (_int4([2, 32], np.ones(2, "<f4").tobytes()), "needs 32 and 4"),  # float32 scales: twice the bytes
    (_int4([1, 32], np.ones(1, "<f2").tobytes(), data=b"\0" * 32), "32 bytes of data"),
    (_int4([1, 32], np.array([np.nan], "<f2").tobytes()), "NaN or infinite scales"),
    (_int4([1, 32], np.array([-1.0], "<f2").tobytes()), "negative"),
    (_int4([1, 32], np.ones(1, "<f2").tobytes(), dtype="int64"), "does not apply to dtype int64"),
    # q = -8 (a nibble of 0, which no encoder sends) times the largest float16 scale leaves float16
    (_int4([1, 32], np.array([65504.0], "<f2").tobytes(), data=b"\0" * 16, dtype="float16"), "NaN or infinite"),
])
def test_bad_encoded_tensors_are_invalid_input(tensor: pb2.Tensor, message: str) -> None:
    with pytest.raises(InvalidInput, match="tensor 'hidden'") as caught:
        from_tensor(tensor, "hidden")
    assert message in str(caught.value)


def test_an_int8_tensor_with_an_empty_last_axis_decodes_empty() -> None:
    decoded = from_tensor(_int8([3, 0], np.ones(3, "<f4").tobytes()), "hidden")
    assert decoded.shape == (3, 0) and decoded.dtype == np.float32


@pytest.mark.parametrize("top", [65504.0, 65490.0])
def test_int4_keeps_a_float16_tensor_at_its_range_finite(top: float) -> None:
    values = np.zeros((1, INT4_GROUP), np.float16)
    values[0, 0], values[0, 1] = top, -top
    tensor = encode_tensors({"h": values}, "int4")["h"]
    assert tensor.encoding == pb2.TENSOR_ENCODING_INT4_GROUP
    back = decode_tensors({"h": tensor})["h"]
    assert back.dtype == np.float16 and np.isfinite(back).all() and abs(float(back[0, 0]) - top) < top / 7 / 2


@pytest.mark.parametrize("absmax", [1e-6, 1e-7])
def test_int4_tiny_groups_are_not_clipped(absmax: float) -> None:  # float16 subnormal scales, rounded up
    values = np.linspace(-absmax, absmax, INT4_GROUP, dtype=np.float32)[None]
    back = round_trip({"h": values}, "int4")["h"]
    assert np.abs(back - values).max() <= (absmax / 7 + 2.0**-24) / 2 * (1 + 1e-3)


def test_int4_sends_values_beyond_float16_scales_as_int8() -> None:
    values = np.zeros((2, INT4_GROUP), np.float32)
    values[1, 0] = 1e6  # needs a scale of 1e6 / 7, beyond float16's largest
    tensor = encode_tensors({"h": values}, "int4")["h"]
    assert tensor.encoding == pb2.TENSOR_ENCODING_INT8_TOKEN
    assert decode_tensors({"h": tensor})["h"][1, 0] == pytest.approx(1e6, rel=1e-2)
