"""Dynamic batching (issue 6): padding to a longer sequence leaves the logits alone, concurrent
requests run as one slice call and get back exactly their own rows, each sample exits on its own."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np
import pytest

from shared.contract.manifest import SliceSpec
from shared.serving.batching import Batcher, merge
from shared.serving.runner import SliceResult, SliceRunner, TensorSignature

TOLERANCE = 1e-5
VOCAB = 60


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SliceRunner]:
    """The three slices of a small random BERT (3 layers, hidden 32), exported as the builder does."""
    torch = pytest.importorskip("torch")
    from shared.builder.export import export_slices
    from shared.builder.model import EarlyExitBert, tiny_encoder

    folder = tmp_path_factory.mktemp("batching_slices")
    torch.manual_seed(0)
    specs = export_slices(EarlyExitBert(tiny_encoder(VOCAB), (1, 2, 3), 2).eval(), folder)
    return {spec.tier: SliceRunner(folder / spec.file, spec) for spec in specs}


def text_batch(lengths: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(5, VOCAB, n)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pad_to(arrays: Mapping[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """`arrays` as merge pads them beside a request `width` tokens long (their rows only)."""
    longer = {name: np.ones((1, width, *a.shape[2:]), a.dtype) for name, a in arrays.items()}
    merged = merge([dict(arrays), longer], set(arrays))
    return {name: a[:-1] for name, a in merged.items()}


@pytest.mark.parametrize("tier", ["mobile", "edge", "cloud"])
def test_padding_to_a_longer_sequence_does_not_change_logits(slices: dict[str, SliceRunner], tier: str) -> None:
    arrays = text_batch([7, 3, 5])
    if tier != "mobile":
        hidden = slices["mobile"].run_sync(arrays).outputs["hidden_out"]
        arrays = {"hidden": hidden, "attention_mask": arrays["attention_mask"]}
    alone = slices[tier].run_sync(arrays).outputs
    padded = slices[tier].run_sync(pad_to(arrays, 31)).outputs
    assert np.abs(alone["logits"] - padded["logits"]).max() <= TOLERANCE
    if "hidden_out" in alone:  # every position of the original width, padding included
        assert np.abs(alone["hidden_out"] - padded["hidden_out"][:, :7]).max() <= TOLERANCE


class CountingRunner:
    """A SliceRunner that records the batch of every slice call."""

    def __init__(self, runner: SliceRunner) -> None:
        self.runner = runner
        self.tier, self.inputs, self.outputs = runner.tier, runner.inputs, runner.outputs
        self.calls: list[dict[str, np.ndarray]] = []

    async def run(self, arrays: Mapping[str, np.ndarray]) -> SliceResult:
        self.calls.append(dict(arrays))
        return await self.runner.run(arrays)


async def _concurrently(batcher: Batcher, requests: list[dict[str, np.ndarray]]) -> list[SliceResult]:
    try:
        return await asyncio.gather(*(batcher.run(r) for r in requests))
    finally:
        batcher.close()


@pytest.mark.parametrize("tier", ["mobile", "edge"])
def test_concurrent_requests_share_one_slice_call_and_get_their_own_rows(
        slices: dict[str, SliceRunner], tier: str) -> None:
    requests = [text_batch(lengths, seed) for seed, lengths in enumerate([[4], [9, 2], [6], [1, 3, 2]])]
    if tier == "edge":
        requests = [{"hidden": slices["mobile"].run_sync(r).outputs["hidden_out"],
                     "attention_mask": r["attention_mask"]} for r in requests]
    counting = CountingRunner(slices[tier])
    batcher = Batcher(counting, max_batch_size=7, max_queue_delay=30.0, max_padding=10)  # fills at 7: no waiting
    results = asyncio.run(_concurrently(batcher, requests))
    assert len(counting.calls) == 1
    assert counting.calls[0]["attention_mask"].shape == (7, 9)  # padded to the longest only
    for request, result in zip(requests, results, strict=True):
        alone = slices[tier].run_sync(request).outputs
        assert set(result.outputs) == set(alone)
        for name, expected in alone.items():
            assert result.outputs[name].shape == expected.shape, name  # trimmed to its own length
            assert np.abs(result.outputs[name] - expected).max() <= TOLERANCE, name


def test_max_batch_size_is_respected_and_big_requests_run_alone(slices: dict[str, SliceRunner]) -> None:
    sizes = [2, 2, 5, 1, 1, 1]
    requests = [text_batch([3] * n, seed) for seed, n in enumerate(sizes)]
    counting = CountingRunner(slices["mobile"])
    results = asyncio.run(_concurrently(Batcher(counting, max_batch_size=4, max_queue_delay=0.0), requests))
    assert [len(c["input_ids"]) for c in counting.calls] == [4, 5, 3]
    assert [len(r.outputs["logits"]) for r in results] == sizes


def test_requests_join_a_batch_only_within_the_padding_budget(slices: dict[str, SliceRunner]) -> None:
    widths = [10, 30, 11, 29, 10]  # arrival order; the oldest (10) goes first, then nearest widths
    requests = [text_batch([n], seed) for seed, n in enumerate(widths)]
    counting = CountingRunner(slices["mobile"])
    results = asyncio.run(_concurrently(Batcher(counting, 8, 0.0, max_padding=0.15), requests))
    assert [c["attention_mask"].shape for c in counting.calls] == [(3, 11), (2, 30)]
    assert [r.outputs["hidden_out"].shape[1] for r in results] == widths


class ThreadRecordingRunner(CountingRunner):
    """Records, per slice call, whether it ran on the event loop's thread or the worker thread."""

    def __init__(self, runner: SliceRunner) -> None:
        super().__init__(runner)
        self.threads: list[str] = []

    def run_sync(self, arrays: Mapping[str, np.ndarray]) -> SliceResult:
        self.calls.append(dict(arrays))
        self.threads.append("loop")
        return self.runner.run_sync(arrays)

    async def run(self, arrays: Mapping[str, np.ndarray]) -> SliceResult:
        self.threads.append("worker")
        return await super().run(arrays)


def test_a_lone_small_request_runs_inline_and_concurrent_ones_still_batch(slices: dict[str, SliceRunner]) -> None:
    recording = ThreadRecordingRunner(slices["mobile"])
    busy = {"alone": True}
    batcher = Batcher(recording, 8, 0.0, max_padding=10, inline_max_samples=2, alone=lambda: busy["alone"])
    lone = text_batch([5])

    async def scenario() -> list[SliceResult]:
        first = await batcher.run(lone)  # idle, alone, small: on the loop's thread
        await asyncio.sleep(first.compute_seconds + 0.01)  # idle again for longer than it ran
        big = await batcher.run(text_batch([5, 6, 7]))  # 3 samples > inline_max_samples
        await asyncio.sleep(0.05)
        busy["alone"] = False  # other requests in flight at the tier: take the worker thread, batch
        together = await _concurrently(batcher, [text_batch([4]), text_batch([6])])
        batcher.close()
        return [first, big, *together]

    results = asyncio.run(scenario())
    assert recording.threads == ["loop", "worker", "worker"]
    assert [len(c["input_ids"]) for c in recording.calls] == [1, 3, 2]  # the last two merged
    alone = slices["mobile"].run_sync(lone).outputs
    np.testing.assert_array_equal(results[0].outputs["logits"], alone["logits"])  # same call, same result


def test_inline_waits_for_the_slice_to_have_been_idle(slices: dict[str, SliceRunner]) -> None:
    """Back-to-back requests (a loaded tier whose loop starts one request at a time) take the worker."""
    recording = ThreadRecordingRunner(slices["mobile"])
    batcher = Batcher(recording, 8, 0.0, inline_max_samples=4)

    async def back_to_back() -> None:
        for _ in range(3):
            await batcher.run(text_batch([5]))
        batcher.close()

    asyncio.run(back_to_back())
    assert recording.threads[0] == "loop" and "worker" in recording.threads[1:]


def test_with_two_workers_two_batches_run_at_once(slices: dict[str, SliceRunner]) -> None:
    """concurrency 2: a second batch starts while the first still runs, and each request gets its rows."""
    import threading

    class SlowRunner(CountingRunner):
        def __init__(self, runner: SliceRunner) -> None:
            super().__init__(runner)
            self.running, self.most = 0, 0
            self.lock = threading.Lock()

        def run_sync(self, arrays: Mapping[str, np.ndarray]) -> SliceResult:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                threading.Event().wait(0.05)  # long enough for the next batch to start beside it
                return self.runner.run_sync(arrays)
            finally:
                with self.lock:
                    self.running -= 1

        async def run(self, arrays: Mapping[str, np.ndarray]) -> SliceResult:
            self.calls.append(dict(arrays))
            return await asyncio.get_running_loop().run_in_executor(pool, self.run_sync, arrays)

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)
    slow = SlowRunner(slices["mobile"])
    requests = [text_batch([n], seed) for seed, n in enumerate([5, 6, 7, 8])]

    async def staggered() -> list[SliceResult]:
        batcher = Batcher(slow, 2, 0.0, max_padding=10, concurrency=2)
        try:
            first = asyncio.ensure_future(batcher.run(requests[0]))
            await asyncio.sleep(0.01)  # the first batch is running: the rest queue, then split over 2 runs
            return [await first, *await asyncio.gather(*(batcher.run(r) for r in requests[1:]))]
        finally:
            batcher.close()

    results = asyncio.run(staggered())
    pool.shutdown()
    assert slow.most == 2  # two slice runs overlapped
    assert sorted(len(c["input_ids"]) for c in slow.calls) == [1, 1, 2]
    for request, result in zip(requests, results, strict=True):
        expected = slices["mobile"].run_sync(request).outputs["logits"]
        assert np.abs(result.outputs["logits"] - expected).max() <= TOLERANCE


def test_a_failed_slice_call_fails_every_request_of_its_batch() -> None:
    class Broken:
        tier = "edge"
        inputs = [TensorSignature("pixels", "pixels", np.dtype(np.float32), ("batch", 4))]
        outputs = [TensorSignature("logits", "logits", np.dtype(np.float32), ("batch", 2))]

        async def run(self, arrays: Mapping[str, np.ndarray]) -> SliceResult:
            raise RuntimeError("slice exploded")

    async def go() -> list[object]:
        batcher = Batcher(Broken(), 8, 0.0)  # type: ignore[arg-type]
        try:
            return await asyncio.gather(*(batcher.run({"pixels": np.zeros((1, 4), np.float32)})
                                          for _ in range(3)), return_exceptions=True)
        finally:
            batcher.close()

    assert [str(e) for e in asyncio.run(go())] == ["slice exploded"] * 3


def test_tensors_without_a_mask_are_concatenated_and_other_shapes_kept_apart() -> None:
    class Images:
        tier = "mobile"
        inputs = [TensorSignature("pixels", "pixels", np.dtype(np.float32), ("batch", None))]
        outputs = [TensorSignature("logits", "logits", np.dtype(np.float32), ("batch", None))]
        calls: list[tuple[int, ...]] = []

        async def run(self, arrays: Mapping[str, np.ndarray]) -> SliceResult:
            self.calls.append(arrays["pixels"].shape)
            return SliceResult({"logits": arrays["pixels"] * 2}, 0.0)

    images = Images()
    requests = [np.full((1, 4), i, np.float32) for i in range(3)] + [np.ones((2, 6), np.float32)]
    results = asyncio.run(_concurrently(Batcher(images, 8, 0.0),  # type: ignore[arg-type]
                                        [{"pixels": r} for r in requests]))
    assert images.calls == [(3, 4), (2, 6)]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["logits"], request * 2)


def test_tier_loop_answers_each_sample_of_concurrent_requests_on_its_own(
        slices: dict[str, SliceRunner]) -> None:
    """Through TierLoop with a batcher: the same exits and answers as without one, per sample."""
    from shared.contract.calibration import softmax
    from shared.contract.manifest import ExitSpec, Manifest, Provenance
    from shared.serving.metrics import TierMetrics
    from shared.serving.tier import TierLoop
    from shared.wire.rpc import pb2

    wiring = {"hidden": "hidden_out", "attention_mask": "attention_mask"}
    specs = [SliceSpec(tier=t, file=f"{t}.onnx", sha256="0" * 64, inputs=[s.name for s in r.inputs],
                       outputs=[s.name for s in r.outputs], forwards=wiring if t != "cloud" else {},
                       first_layer=i + 1, last_layer=i + 1) for i, (t, r) in enumerate(slices.items())]
    provenance = Provenance(backbone="x", data="x", seed=0, profile="tiny", created="x", tierserve_version="0",
                            train_samples=1, calibration_samples=1, test_samples=1)
    manifest = Manifest(labels=["a", "b"], num_layers=3, hidden_size=32, max_length=32, tokenizer_file="t.json",
                        slices=specs, exits=[ExitSpec(tier=t, layer=i + 1) for i, t in enumerate(slices)],
                        provenance=provenance)
    forwarded: list[str] = []

    class Cloud:
        async def continue_batch(self, tensors: Mapping[str, pb2.Tensor], request_ids: list[str],
                                 thresholds: Mapping[str, float], timeout: float | None, audit: bool = False
                                 ) -> list[pb2.Answer]:
            forwarded.extend(request_ids)
            return [pb2.Answer(request_id=r, tier="cloud") for r in request_ids]

    texts = [text_batch(lengths, seed) for seed, lengths in enumerate([[5, 2], [8], [3, 3, 6], [1]])]
    requests = [{"hidden": slices["mobile"].run_sync(r).outputs["hidden_out"], "attention_mask": r["attention_mask"]}
                for r in texts]
    ids = [[f"{i}/{j}" for j in range(len(r["hidden"]))] for i, r in enumerate(requests)]
    conf = np.sort(np.concatenate([softmax(slices["edge"].run_sync(r).outputs["logits"]).max(-1) for r in requests]))
    middle = float((conf[len(conf) // 2 - 1] + conf[len(conf) // 2]) / 2)  # some exit, some go on

    async def answers(batcher: Batcher | None) -> list[list[tuple[str, str, int]]]:
        loop = TierLoop(manifest, "edge", slices["edge"], TierMetrics("edge"), Cloud(), batcher=batcher)
        try:
            got = await asyncio.gather(*(loop.process(r, i, {"edge": middle})
                                         for r, i in zip(requests, ids, strict=True)))
        finally:
            if batcher is not None:
                batcher.close()
        return [[(a.request_id, a.tier, a.label_index) for a in response] for response in got]

    unbatched = asyncio.run(answers(None))
    sent_unbatched = sorted(forwarded)
    forwarded.clear()
    counting = CountingRunner(slices["edge"])
    assert asyncio.run(answers(Batcher(counting, 7, 30.0, max_padding=10))) == unbatched  # 7 samples: no wait
    assert len(counting.calls) == 1
    assert sorted(forwarded) == sent_unbatched
    exits = [tier for response in unbatched for _, tier, _ in response]
    assert exits.count("edge") == len(exits) // 2 + 1 and exits.count("cloud") == len(exits) // 2


def test_inputs_of_a_known_structure_still_have_their_mask_values_checked(slices: dict[str, SliceRunner]) -> None:
    from shared.errors import InvalidInput

    runner = slices["mobile"]
    assert runner.check_inputs(text_batch([3, 5])) == 2
    assert runner.check_inputs(text_batch([5, 4], seed=1)) == 2  # the same names, dtypes and shapes
    empty_row = text_batch([3, 5])
    empty_row["attention_mask"][0] = 0
    with pytest.raises(InvalidInput, match="row 0 has no tokens"):
        runner.check_inputs(empty_row)
    not_binary = text_batch([3, 5])
    not_binary["attention_mask"][1, 0] = 2
    with pytest.raises(InvalidInput, match="may only hold 0 and 1"):
        runner.check_inputs(not_binary)
    other_dtype = text_batch([3, 5])
    other_dtype["input_ids"] = other_dtype["input_ids"].astype(np.int32)
    with pytest.raises(InvalidInput, match="dtype int32"):
        runner.check_inputs(other_dtype)
