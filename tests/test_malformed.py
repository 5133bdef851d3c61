"""A corpus of malformed requests at Classify (client API) and Continue (tier-to-tier API).

Each gets its expected status and a message naming the problem; afterwards the tier is still
SERVING and answers a good request exactly as before. A hypothesis test then throws random
requests (texts, raw bytes, tensors) at the running tiers: every reply is OK or an expected status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.client import health_status
from shared.contract.manifest import Manifest, load_manifest
from shared.tools.processes import TierCluster, running_tiers
from shared.wire.codec import DTYPES, to_tensor
from shared.wire.rpc import pb2

MAX_MESSAGE = 1 << 20  # the tiers run with a 1 MiB message limit here
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
GOOD_TEXTS = ["a good film", "bad dull plot", "the story"]


@pytest.fixture(scope="module")
def manifest(tiny_artifacts: Path) -> Manifest:
    return load_manifest(tiny_artifacts)


@pytest.fixture(scope="module")
def cluster(tiny_artifacts: Path) -> Iterator[TierCluster]:
    flags = {tier: {"max_message_bytes": MAX_MESSAGE} for tier in ("mobile", "edge", "cloud")}
    with running_tiers(tiny_artifacts, flags=flags) as started:
        yield started


class RawStubs:
    """Classify and Continue on bytes: requests are sent exactly as given (no client-side checks)."""

    def __init__(self, cluster: TierCluster) -> None:
        self.channels = {tier: grpc.insecure_channel(proc.address) for tier, proc in cluster.tiers.items()}
        self.classify = self.channels["mobile"].unary_unary("/tierserve.v1.Classifier/Classify")
        self.continue_ = self.channels["edge"].unary_unary("/tierserve.v1.Continuation/Continue")

    def call(self, api: str, payload: bytes, timeout: float = 10) -> tuple[grpc.StatusCode, str, bytes]:
        method = self.classify if api == "classify" else self.continue_
        try:
            return grpc.StatusCode.OK, "", method(payload, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", b""

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


@pytest.fixture(scope="module")
def stubs(cluster: TierCluster) -> Iterator[RawStubs]:
    started = RawStubs(cluster)
    yield started
    started.close()


def good_continue(manifest: Manifest, batch: int = 2, seq: int = 5) -> pb2.ContinueRequest:
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(batch, seq, manifest.hidden_size)).astype(np.float32)
    mask = np.ones((batch, seq), np.int64)
    return pb2.ContinueRequest(tensors={"hidden": to_tensor(hidden), "attention_mask": to_tensor(mask)},
                               request_ids=[f"r/{i}" for i in range(batch)])


@pytest.fixture(scope="module")
def expected_good(stubs: RawStubs, manifest: Manifest) -> dict[str, bytes]:
    """What a good request gets before any malformed one was sent."""
    return {"classify": _good_reply(stubs, "classify", manifest),
            "continue": _good_reply(stubs, "continue", manifest)}


def _good_reply(stubs: RawStubs, api: str, manifest: Manifest) -> bytes:
    if api == "classify":
        payload = pb2.ClassifyRequest(texts=GOOD_TEXTS, request_id="good",
                                      thresholds={"mobile": 1.01, "edge": 1.01}).SerializeToString()
    else:
        payload = good_continue(manifest).SerializeToString()
    code, details, reply = stubs.call(api, payload)
    assert code == grpc.StatusCode.OK, details
    return reply


def _answers(api: str, reply: bytes) -> list[tuple]:
    response = (pb2.ClassifyResponse if api == "classify" else pb2.ContinueResponse).FromString(reply)
    return [(a.request_id, a.tier, a.label_index, tuple(np.round(a.probabilities, 6)), a.degraded)
            for a in response.answers]


def assert_still_healthy(cluster: TierCluster, stubs: RawStubs, manifest: Manifest,
                         expected_good: dict[str, bytes]) -> None:
    for tier, proc in cluster.tiers.items():
        assert health_status(proc.address, timeout=5) == "SERVING", tier
    for api in ("classify", "continue"):
        assert _answers(api, _good_reply(stubs, api, manifest)) == _answers(api, expected_good[api])


# --- the corpus ---------------------------------------------------------------------------------

def classify(texts: list[str] | None = None, **fields: object) -> Callable[[Manifest], bytes]:
    return lambda m: pb2.ClassifyRequest(texts=GOOD_TEXTS if texts is None else texts,
                                         **fields).SerializeToString()  # type: ignore[arg-type]


def raw(payload: bytes) -> Callable[[Manifest], bytes]:
    return lambda m: payload


def tensor(name: str, make: Callable[[int], np.ndarray | pb2.Tensor | None]) -> Callable[[Manifest], bytes]:
    """A good Continue request with tensor `name` replaced (None: removed); make gets hidden_size."""
    def build(m: Manifest) -> bytes:
        request = good_continue(m)
        value = make(m.hidden_size)
        if value is None:
            del request.tensors[name]
        else:
            request.tensors[name].CopyFrom(value if isinstance(value, pb2.Tensor) else to_tensor(value))
        return request.SerializeToString()
    return build


def continue_(change: Callable[[pb2.ContinueRequest], object]) -> Callable[[Manifest], bytes]:
    def build(m: Manifest) -> bytes:
        request = good_continue(m)
        change(request)
        return request.SerializeToString()
    return build


GOOD_CLASSIFY = pb2.ClassifyRequest(texts=["a good film"]).SerializeToString()
# field 1 (texts), length 3, bytes that are not UTF-8
INVALID_UTF8_TEXT = b"\x0a\x03\xff\xfe\xfd"
# field 2 (request_ids) of a ContinueRequest, not UTF-8, after a good request's bytes
INVALID_UTF8_ID = b"\x12\x02\xc3\x28"


def _hidden(h: int, batch: int = 2, seq: int = 5, dtype: type = np.float32) -> np.ndarray:
    return np.zeros((batch, seq, h), dtype)


CORPUS: dict[str, tuple[str, Callable[[Manifest], bytes], grpc.StatusCode, str]] = {
    # name: (api, request bytes, expected status, words the message must hold)
    "no texts": ("classify", classify([]), INVALID, "no texts"),
    "an empty text": ("classify", classify(["fine", ""]), INVALID, "text 1 is empty"),
    "a blank text": ("classify", classify(["  \t\n"]), INVALID, "text 0 is empty"),
    "too many texts": ("classify", classify(["good"] * 257), INVALID, "too many texts: 257"),
    "a text too long": ("classify", classify(["a" * 10_001]), INVALID, "text 0 has 10001 characters"),
    "threshold for the cloud": (
        "classify", classify(thresholds={"cloud": 0.5}), INVALID, "unknown or last tier 'cloud'"),
    "unknown threshold key": ("classify", classify(thresholds={"fog": 0.5}), INVALID, "tier 'fog'"),
    "negative threshold": ("classify", classify(thresholds={"mobile": -0.1}), INVALID, "mobile is -0.1"),
    "NaN threshold": ("classify", classify(thresholds={"edge": float("nan")}), INVALID, "edge is nan"),
    "infinite threshold": ("classify", classify(thresholds={"edge": float("inf")}), INVALID, "edge is inf"),
    "invalid UTF-8 text": (
        "classify", raw(INVALID_UTF8_TEXT), INVALID, "not a valid tierserve.v1.ClassifyRequest"),
    "invalid UTF-8 request id": (
        "classify", raw(GOOD_CLASSIFY + b"\x1a\x02\xc3\x28"), INVALID, "not a valid tierserve.v1.ClassifyRequest"),
    "garbage bytes": ("classify", raw(b"\xff\xff\xff\xff"), INVALID, "not a valid tierserve.v1.ClassifyRequest"),
    "truncated message": ("classify", raw(GOOD_CLASSIFY[:-3]), INVALID, "not a valid"),
    "oversize message": (
        "classify", classify(["good " * 1800] * 200), EXHAUSTED, f"vs. {MAX_MESSAGE}"),
    # Continue, the tier-to-tier API, at the edge
    "hidden of the wrong width": (
        "continue", tensor("hidden", lambda h: _hidden(h + 1)), INVALID, "tensor 'hidden' has shape"),
    "hidden of rank 2": ("continue", tensor("hidden", lambda h: np.zeros((2, 5), np.float32)), INVALID, "rank 2"),
    "hidden as float64": (
        "continue", tensor("hidden", lambda h: _hidden(h, dtype=np.float64)), INVALID, "dtype float64"),
    "hidden as int64": ("continue", tensor("hidden", lambda h: _hidden(h, dtype=np.int64)), INVALID, "dtype int64"),
    "hidden with NaN": (
        "continue", tensor("hidden", lambda h: np.full((2, 5, h), np.nan, np.float32)), INVALID, "NaN"),
    "hidden with infinity": (
        "continue", tensor("hidden", lambda h: np.full((2, 5, h), np.inf, np.float32)), INVALID, "infinite"),
    "hidden of another batch size": (
        "continue", tensor("hidden", lambda h: _hidden(h, batch=3)), INVALID, "'hidden' has 3 for the same"),
    "mask shorter than hidden": (
        "continue", tensor("attention_mask", lambda h: np.ones((2, 4), np.int64)), INVALID, "dimension 1 is"),
    "mask of int32": (
        "continue", tensor("attention_mask", lambda h: np.ones((2, 5), np.int32)), INVALID, "dtype int32"),
    "mask values not 0/1": (
        "continue", tensor("attention_mask", lambda h: np.full((2, 5), 3, np.int64)), INVALID,
        "only hold 0 and 1"),
    "a row without tokens": (
        "continue", tensor("attention_mask", lambda h: np.zeros((2, 5), np.int64)), INVALID, "row 0 has no tokens"),
    "missing mask": ("continue", tensor("attention_mask", lambda h: None), INVALID, "missing ['attention_mask']"),
    "unexpected tensor": (
        "continue", tensor("pixels", lambda h: np.zeros((2, 3), np.float32)), INVALID, "unexpected ['pixels']"),
    "no tensors": ("continue", continue_(lambda r: r.ClearField("tensors")), INVALID, "missing"),
    "too few ids": ("continue", continue_(lambda r: r.request_ids.pop()), INVALID, "1 request ids for a batch of 2"),
    "too many ids": (
        "continue", continue_(lambda r: r.request_ids.append("r/2")), INVALID, "3 request ids for a batch of 2"),
    "more samples than max_batch": (
        "continue", continue_(lambda r: r.request_ids.extend(str(i) for i in range(300))), INVALID,
        "too many samples: 302"),
    "truncated tensor bytes": (
        "continue", tensor("hidden", lambda h: pb2.Tensor(dtype="float32", shape=[2, 5, h], data=b"\0" * 12)),
        INVALID, "has 12 bytes of data"),
    "tensor bytes too long": (
        "continue", tensor("attention_mask", lambda h: pb2.Tensor(dtype="int64", shape=[2, 5], data=b"\0" * 88)),
        INVALID, "has 88 bytes of data"),
    "empty batch": (
        "continue", continue_(lambda r: (
            r.ClearField("request_ids"), r.tensors["hidden"].CopyFrom(to_tensor(np.zeros((0, 5, 32), np.float32))),
            r.tensors["attention_mask"].CopyFrom(to_tensor(np.ones((0, 5), np.int64))))),
        INVALID, "the batch is empty"),
    "unknown dtype": (
        "continue", tensor("hidden", lambda h: pb2.Tensor(dtype="float8", shape=[2, 5, h])), INVALID,
        "unknown dtype 'float8'"),
    "negative dimension": (
        "continue", tensor("hidden", lambda h: pb2.Tensor(dtype="float32", shape=[2, -5, h])), INVALID,
        "negative dimension"),
    "rank 9": ("continue", tensor("hidden", lambda h: pb2.Tensor(dtype="float32", shape=[1] * 9, data=b"\0" * 4)),
               INVALID, "rank 9"),
    "huge shape": (
        "continue", tensor("hidden", lambda h: pb2.Tensor(dtype="float32", shape=[1 << 40, 1 << 20, h])),
        INVALID, "bytes of data"),
    "unknown encoding": (
        "continue", tensor("hidden", lambda h: pb2.Tensor(dtype="float32", shape=[2, 5, h], encoding=99)),
        INVALID, "unsupported encoding 99"),
    "bad threshold key at Continue": (
        "continue", continue_(lambda r: r.thresholds.update({"edgy": 0.5})), INVALID, "tier 'edgy'"),
    "threshold out of range at Continue": (
        "continue", continue_(lambda r: r.thresholds.update({"edge": -2.0})), INVALID, "edge is -2.0"),
    "invalid UTF-8 request id at Continue": (
        "continue", lambda m: good_continue(m).SerializeToString() + INVALID_UTF8_ID, INVALID,
        "not a valid tierserve.v1.ContinueRequest"),
    "oversize tensor message": (
        "continue", tensor("hidden", lambda h: np.zeros((2, 5000, h), np.float32)), EXHAUSTED, f"vs. {MAX_MESSAGE}"),
}
# requests that look odd but are valid: answered like the good request
ACCEPTED: dict[str, tuple[str, Callable[[Manifest], bytes]]] = {
    "unknown field in Classify (proto3: ignored)": ("classify", raw(GOOD_CLASSIFY + b"\x98\x06\x01")),
    "unknown field in a Tensor (ignored)": (
        "continue", lambda m: _with_unknown_tensor_field(good_continue(m)).SerializeToString()),
    "known field with another wire type (kept as unknown)": ("classify", raw(GOOD_CLASSIFY + b"\x18\x01")),
}


def _with_unknown_tensor_field(request: pb2.ContinueRequest) -> pb2.ContinueRequest:
    hidden = request.tensors["hidden"]
    hidden.MergeFromString(b"\xa0\x06\x07")  # field 100, varint 7
    return request


def test_the_corpus_is_large_and_distinct() -> None:
    assert len(CORPUS) >= 30
    assert len({api for api, *_ in CORPUS.values()}) == 2


@pytest.mark.parametrize("case", list(CORPUS))
def test_a_malformed_request_gets_its_status_and_the_tier_stays_healthy(
        case: str, cluster: TierCluster, stubs: RawStubs, manifest: Manifest,
        expected_good: dict[str, bytes]) -> None:
    api, build, status, words = CORPUS[case]
    code, details, _ = stubs.call(api, build(manifest))
    assert code == status, f"{case}: {code} {details}"
    assert words in details, f"{case}: {details!r}"
    assert_still_healthy(cluster, stubs, manifest, expected_good)


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_odd_but_valid_requests_are_answered(case: str, stubs: RawStubs, manifest: Manifest) -> None:
    api, build = ACCEPTED[case]
    code, details, reply = stubs.call(api, build(manifest))
    assert code == grpc.StatusCode.OK, details
    assert _answers(api, reply)


# --- random requests ----------------------------------------------------------------------------

EXPECTED = {grpc.StatusCode.OK, INVALID, EXHAUSTED}
PROPERTY_SETTINGS = settings(max_examples=120, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
tier_names = st.sampled_from(["mobile", "edge", "cloud", "", "MOBILE", "x" * 40])
threshold_values = st.floats(allow_nan=True, allow_infinity=True, width=64)
texts = st.lists(st.text(max_size=80) | st.sampled_from(GOOD_TEXTS), max_size=6)


@st.composite
def tensors(draw: st.DrawFn) -> pb2.Tensor:
    dtype = draw(st.sampled_from([*DTYPES, "float8", ""]))
    shape = draw(st.lists(st.integers(-2, 6), max_size=4))
    if draw(st.booleans()) and dtype in DTYPES and all(d >= 0 for d in shape):
        size = int(np.prod(shape)) * DTYPES[dtype].itemsize
        data = draw(st.binary(min_size=size, max_size=size))
    else:
        data = draw(st.binary(max_size=64))
    return pb2.Tensor(dtype=dtype, shape=shape, data=data, encoding=draw(st.integers(0, 6)))


@PROPERTY_SETTINGS
@given(texts=texts, thresholds=st.dictionaries(tier_names, threshold_values, max_size=3),
       request_id=st.text(max_size=20))
def test_random_classify_requests(stubs: RawStubs, texts: list[str], thresholds: dict[str, float],
                                  request_id: str) -> None:
    payload = pb2.ClassifyRequest(texts=texts, thresholds=thresholds, request_id=request_id).SerializeToString()
    code, details, _ = stubs.call("classify", payload)
    assert code in EXPECTED, details


@PROPERTY_SETTINGS
@given(payload=st.binary(max_size=256), api=st.sampled_from(["classify", "continue"]))
def test_random_bytes(stubs: RawStubs, payload: bytes, api: str) -> None:
    code, details, _ = stubs.call(api, payload)
    assert code in EXPECTED, details


@PROPERTY_SETTINGS
@given(named=st.dictionaries(st.sampled_from(["hidden", "attention_mask", "x"]), tensors(), max_size=3),
       request_ids=st.lists(st.text(max_size=8), max_size=4),
       thresholds=st.dictionaries(tier_names, threshold_values, max_size=2))
def test_random_continue_requests(stubs: RawStubs, named: dict[str, pb2.Tensor], request_ids: list[str],
                                  thresholds: dict[str, float]) -> None:
    payload = pb2.ContinueRequest(tensors=named, request_ids=request_ids, thresholds=thresholds).SerializeToString()
    code, details, _ = stubs.call("continue", payload)
    assert code in EXPECTED, details


def test_the_tiers_are_healthy_after_the_random_requests(
        cluster: TierCluster, stubs: RawStubs, manifest: Manifest, expected_good: dict[str, bytes]) -> None:
    assert_still_healthy(cluster, stubs, manifest, expected_good)
