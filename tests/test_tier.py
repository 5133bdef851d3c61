"""The tier loop's pure parts: what is forwarded, and the threshold overrides a request may carry."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import InvalidInput
from shared.serving.tier import check_thresholds, forwarded_tensors
from shared.wire.codec import decode_tensors, encode_tensors


def test_forwarded_rows_keep_their_order_and_lose_padding_only() -> None:
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], np.int64)
    hidden = np.arange(3 * 6 * 2, dtype=np.float32).reshape(3, 6, 2)
    inputs = {"input_ids": np.ones_like(mask), "attention_mask": mask}
    outputs = {"logits": np.zeros((3, 2), np.float32), "hidden_out": hidden}
    wiring = {"hidden": "hidden_out", "attention_mask": "attention_mask"}
    sent = forwarded_tensors(inputs, outputs, wiring, np.array([1, 2]))
    assert set(sent) == {"hidden", "attention_mask"}
    np.testing.assert_array_equal(sent["attention_mask"], mask[[1, 2], :3])
    np.testing.assert_array_equal(sent["hidden"], hidden[[1, 2], :3])
    back = decode_tensors(encode_tensors(sent))  # views: the encoder copies them
    np.testing.assert_array_equal(back["hidden"], hidden[[1, 2], :3])
    np.testing.assert_array_equal(back["attention_mask"], mask[[1, 2], :3])
    whole = forwarded_tensors(inputs, outputs, wiring, np.array([0]))
    assert whole["hidden"].shape == (1, 5, 2)


def test_tensors_without_a_mask_are_forwarded_whole() -> None:
    outputs = {"logits": np.zeros((2, 3)), "hidden_out": np.ones((2, 4, 4, 8), np.float32)}
    sent = forwarded_tensors({}, outputs, {"hidden": "hidden_out"}, np.array([1]))
    assert sent["hidden"].shape == (1, 4, 4, 8)


def test_threshold_overrides() -> None:
    assert check_thresholds({"mobile": 0.0, "edge": 1.5}) == {"mobile": 0.0, "edge": 1.5}
    for bad, message in [({"cloud": 0.5}, "'cloud'"), ({"mobile": -1.0}, "mobile is -1.0"),
                         ({"edge": float("inf")}, "edge is inf")]:
        with pytest.raises(InvalidInput, match=message):
            check_thresholds(bad)
