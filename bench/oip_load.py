"""A closed-loop load generator for any Open Inference Protocol gRPC server (tritonclient's asyncio client).

bench.peers' fallback where Triton's perf_analyzer does not run: `concurrency` workers each send one
text per ModelInfer, back to back, for `seconds` after a warm-up; it keeps every latency and
whether the answer's `label_index` matched the label. It runs in Python on the machine it
measures, so it takes more CPU per request than perf_analyzer (C++): compare servers driven by the
same generator only.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Cell:
    """One server at one concurrency: what the measured window saw."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds per request
    correct: int = 0
    errors: int = 0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def figures(self) -> dict[str, float | int | None]:
        ms = np.asarray(self.latencies) * 1e3
        return {"throughput_per_s": self.throughput, "requests": len(ms), "errors": self.errors,
                "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
                "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
                "accuracy_in_load": self.correct / len(ms) if len(ms) else None}


async def _drive(url: str, model: str, texts: Sequence[str], labels: Sequence[int], concurrency: int,
                 seconds: float, warmup: float) -> Cell:
    import tritonclient.grpc.aio as grpcclient

    requests = itertools.cycle(range(len(texts)))
    cell, measuring = Cell(), False
    wanted = grpcclient.InferRequestedOutput("label_index")
    async with grpcclient.InferenceServerClient(url) as client:
        async def worker(stop_at: float) -> None:
            while time.perf_counter() < stop_at:
                i = next(requests)
                batch = grpcclient.InferInput("texts", [1], "BYTES")
                batch.set_data_from_numpy(np.array([texts[i].encode()], dtype=np.object_))
                started = time.perf_counter()
                try:
                    result = await client.infer(model, [batch], outputs=[wanted])
                except Exception:  # counted, not fatal: a cell reports its errors
                    if measuring:
                        cell.errors += 1
                    continue
                if measuring:
                    cell.latencies.append(time.perf_counter() - started)
                    cell.correct += int(result.as_numpy("label_index")[0] == labels[i])

        start = time.perf_counter()
        running = asyncio.gather(*(worker(start + warmup + seconds) for _ in range(concurrency)))
        await asyncio.sleep(warmup)
        measuring, measured_from = True, time.perf_counter()
        await running
        cell.seconds = time.perf_counter() - measured_from
    return cell


def drive(url: str, model: str, texts: Sequence[str], labels: Sequence[int], concurrency: int,
          seconds: float, warmup: float = 1.0) -> Cell:
    return asyncio.run(_drive(url, model, texts, labels, concurrency, seconds, warmup))


def accuracy(url: str, model: str, texts: Sequence[str], labels: Sequence[int], batch: int = 16) -> float:
    """Share of texts whose answer is the label, sent `batch` per ModelInfer (quicker than one by one; each
    sample is decided on its own, so the share is the same)."""
    import tritonclient.grpc as grpcclient

    right = 0
    with grpcclient.InferenceServerClient(url) as client:
        for start in range(0, len(texts), batch):
            chunk = texts[start:start + batch]
            inputs = grpcclient.InferInput("texts", [len(chunk)], "BYTES")
            inputs.set_data_from_numpy(np.array([t.encode() for t in chunk], dtype=np.object_))
            got = client.infer(model, [inputs]).as_numpy("label_index")
            right += int((got == np.asarray(labels[start:start + batch])).sum())
    return right / len(texts)
