"""Overhead of the three gRPC tiers per hop, against a bare grpc.aio unary echo: forced to the cloud, batch 1.

End-to-end latency at the client (real SST-2 dev sentences, one per request, thresholds > 1 so
every sample crosses all three hops: client -> mobile -> edge -> cloud) versus the same three
slices chained in one process with onnxruntime (the tiers' thread settings, tokeniser and
calibration). Per-hop overhead = (three-tier p50 - chain p50) / 3. Its yardstick: the p50 round
trip of a grpc.aio unary echo server in another process, sent the bytes of a median forwarded
hidden state (no tier code at all). The goal is per-hop overhead <= 1.5x that echo.

Everything is measured in alternating blocks of texts (ROUNDS): the chain, the tiers, the echo
(three round trips per text), and with --baseline DIR the tiers of another checkout (an earlier
version, its stubs generated), so that the machine's drift between minutes hits every side alike;
the per-block figures show how far the drift moves them within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import FORCE_CLOUD, base_parser, dev_set, load, percentiles_ms, table, write_result
from shared.client import TierClient, health_status
from shared.contract.calibration import softmax_rows
from shared.contract.manifest import TIERS, Manifest, verified_slice_path
from shared.contract.text import TextEncoder
from shared.serving.runner import SliceRunner
from shared.tools.processes import REPO_ROOT, free_port

WARMUP = 20
ROUNDS = 8  # alternating blocks
HOPS = 3  # client -> mobile -> edge -> cloud
GOAL = 1.5  # per-hop overhead / bare echo round trip, at most


class Chain:
    """The floor: tokeniser + the three slices in this process, with the tiers' thread settings."""

    def __init__(self, artifacts: Path, manifest: Manifest, threads: int = 1) -> None:
        self.manifest = manifest
        self.runners = [SliceRunner(verified_slice_path(artifacts, s), s, threads) for s in manifest.slices]
        self.encoder = TextEncoder.for_manifest(manifest, artifacts)
        self.slice_seconds: list[float] = []  # per text: the three slices' onnxruntime runs

    def latencies(self, texts: Sequence[str]) -> list[float]:
        """Seconds per text."""
        seconds = []
        for text in texts:
            started = time.perf_counter()
            compute = 0.0
            feed = self.encoder.encode([text]).tensors
            for spec, runner, exit_spec in zip(self.manifest.slices, self.runners, self.manifest.exits, strict=True):
                result = runner.run_sync(feed)
                compute += result.compute_seconds
                [max(p) for p in softmax_rows(result.outputs["logits"].tolist(), exit_spec.temperature)]
                feed = {name: result.outputs.get(source, feed.get(source)) for name, source in spec.forwards.items()}
            seconds.append(time.perf_counter() - started)
            self.slice_seconds.append(compute)
        return seconds

    def close(self) -> None:
        for runner in self.runners:
            runner.close()


def tier_latencies(client: TierClient, texts: Sequence[str], parts: dict[str, list[float]] | None = None
                   ) -> list[float]:
    """Seconds per text at the client, every text answered by the cloud. parts: where to add, per
    text, from the answers' per-tier timings: each hop's RPC time outside the callee, each tier's
    own work outside its slice, and the three slices' onnxruntime runs."""
    seconds = []
    for text in texts:
        started = time.perf_counter()
        [answer] = client.classify([text], FORCE_CLOUD)
        elapsed = time.perf_counter() - started
        seconds.append(elapsed)
        assert answer.tier == "cloud" and not answer.degraded, answer.degraded_reason
        if parts is not None:
            mobile, edge, cloud = answer.timings
            for name, value in (
                    ("hop_client_mobile", elapsed - mobile.server_seconds),
                    ("hop_mobile_edge", mobile.server_seconds - mobile.own_seconds - edge.server_seconds),
                    ("hop_edge_cloud", edge.server_seconds - edge.own_seconds - cloud.server_seconds),
                    *((f"own_{t.tier}", t.own_seconds - t.compute_seconds) for t in answer.timings),
                    ("slices", sum(t.compute_seconds for t in answer.timings))):
                parts.setdefault(name, []).append(value)
    return seconds


@contextlib.contextmanager
def checkout_tiers(checkout: Path, artifacts: Path) -> Iterator[str]:
    """The three tiers of another checkout (its own code, this model) on 127.0.0.1; the entry address."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    processes: list[subprocess.Popen[bytes]] = []
    addresses: list[str] = []
    try:
        next_address = None
        for tier in reversed(TIERS):
            address = f"127.0.0.1:{free_port()}"
            argv = [sys.executable, "-m", f"{tier}_node", "--listen", address, "--artifacts", str(artifacts.resolve()),
                    "--metrics-port", "0", *(["--next", next_address] if next_address else [])]
            processes.append(subprocess.Popen(argv, cwd=checkout, env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            addresses.append(address)
            next_address = address
        deadline = time.monotonic() + 120
        while not all(health_status(a) == "SERVING" for a in addresses):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError(f"the tiers of {checkout} did not start (are its stubs generated?)")
            time.sleep(0.2)
        yield addresses[-1]
    finally:
        for process in processes:
            process.terminate()
            process.wait()


def _echo_server(port: int) -> None:
    import grpc

    async def serve() -> None:
        async def echo(request: bytes, context: object) -> bytes:
            return request

        server = grpc.aio.server()
        handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}  # no (de)serialisers: raw bytes
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


class Echo:
    """A grpc.aio unary echo server in another process and its client: the bare cost of a hop."""

    def __init__(self, payload_bytes: int) -> None:
        import grpc

        port = free_port()
        self.server = subprocess.Popen([sys.executable, "-m", "bench.overhead", "--echo-server", str(port)])
        self.loop = asyncio.new_event_loop()
        self.payload = b"\0" * payload_bytes
        self.channel = self.loop.run_until_complete(self._channel(grpc, f"127.0.0.1:{port}"))
        self.call = self.channel.unary_unary("/echo.Echo/Echo")

    async def _channel(self, grpc: Any, address: str) -> Any:
        channel = grpc.aio.insecure_channel(address)
        await asyncio.wait_for(channel.channel_ready(), 30)
        return channel

    def round_trips(self, count: int) -> list[float]:
        async def measure() -> list[float]:
            seconds = []
            for _ in range(count):
                started = time.perf_counter()
                await self.call(self.payload)
                seconds.append(time.perf_counter() - started)
            return seconds

        return self.loop.run_until_complete(measure())

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()
        self.server.terminate()
        self.server.wait()


@dataclass
class Measured:
    """Seconds per text (per round trip for the echo) of each system, block by block."""

    blocks: dict[str, list[list[float]]] = field(default_factory=dict)
    parts: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # per system (tier_latencies)
    chain_slices: list[float] = field(default_factory=list)  # the chain's slices' onnxruntime seconds

    def add(self, system: str, seconds: list[float]) -> None:
        self.blocks.setdefault(system, []).append(seconds)

    def all(self, system: str) -> list[float]:
        return [s for block in self.blocks[system] for s in block]

    def per_hop_by_block(self, system: str) -> list[float]:
        """(p50 of the tiers - p50 of the chain) / HOPS, seconds, per block."""
        return [(float(np.median(t)) - float(np.median(c))) / HOPS
                for t, c in zip(self.blocks[system], self.blocks["chain"], strict=True)]


def measure(artifacts: Path, manifest: Manifest, texts: list[str], payload_bytes: int,
            baseline: Path | None = None) -> Measured:
    chain = Chain(artifacts, manifest)
    echo = Echo(payload_bytes)
    measured = Measured()
    try:
        with contextlib.ExitStack() as stack:
            # both sets of tiers started the same way: an A/A run (--baseline a copy of this checkout)
            # showed 0.3 ms per hop between two differently started sets
            checkouts = {"tiers": REPO_ROOT, **({"baseline": baseline} if baseline is not None else {})}
            clients = {name: stack.enter_context(TierClient(stack.enter_context(checkout_tiers(path, artifacts))))
                       for name, path in checkouts.items()}
            chain.latencies(texts[:WARMUP])
            echo.round_trips(WARMUP * HOPS)
            for client in clients.values():
                tier_latencies(client, texts[:WARMUP])
            for i, block in enumerate(np.array_split(np.array(texts, dtype=object), ROUNDS)):
                texts_in_block = [str(t) for t in block]
                systems = list(clients) if i % 2 == 0 else list(clients)[::-1]
                measured.add("chain", chain.latencies(texts_in_block))
                for system in systems:
                    parts = measured.parts.setdefault(system, {})
                    measured.add(system, tier_latencies(clients[system], texts_in_block, parts))
                measured.add("echo", echo.round_trips(len(texts_in_block) * HOPS))
    finally:
        chain.close()
        echo.close()
    measured.chain_slices = chain.slice_seconds[WARMUP:]
    return measured


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        baseline: Path | None = None) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, _ = dev_set(manifest, data, limit)
    encoder = TextEncoder.for_manifest(manifest, artifacts)
    tokens = int(np.median([encoder.encode([t]).tensors["attention_mask"].shape[1] for t in texts]))
    measured = measure(artifacts, manifest, texts, tokens * manifest.hidden_size * 4, baseline)
    chain = percentiles_ms(measured.all("chain"))
    echo = percentiles_ms(measured.all("echo"))
    echo_by_block = [float(np.median(b)) for b in measured.blocks["echo"]]
    systems: dict[str, Any] = {}
    for system in [s for s in ("tiers", "baseline") if s in measured.blocks]:
        three = percentiles_ms(measured.all(system))
        per_hop_by_block = measured.per_hop_by_block(system)
        systems[system] = {
            "three_tier_ms": three, "overhead_ratio": three["p50"] / chain["p50"],
            "per_hop_overhead_ms": (three["p50"] - chain["p50"]) / HOPS,
            "per_hop_over_echo": (three["p50"] - chain["p50"]) / HOPS / echo["p50"],
            "per_hop_over_echo_by_block": [h / e for h, e in zip(per_hop_by_block, echo_by_block, strict=True)],
            "parts_p50_ms": {name: percentiles_ms(values)["p50"] for name, values in measured.parts[system].items()},
        }
    result = {"samples": len(texts), "chain_ms": chain, "bare_echo_round_trip_ms": echo,
              "echo_payload_tokens": tokens, "goal_per_hop_over_echo": GOAL, **systems["tiers"],
              "baseline": str(baseline) if baseline else None, "by_system": systems}
    rows = [["in-process chain", chain["p50"], chain["p99"], None, None, None]]
    for name, s in systems.items():
        label = "three tiers, this checkout" if name == "tiers" else f"three tiers, {baseline}"
        rows.append([label, s["three_tier_ms"]["p50"], s["three_tier_ms"]["p99"], s["overhead_ratio"],
                     s["per_hop_overhead_ms"], s["per_hop_over_echo"]])
    rows.append([f"bare grpc.aio unary echo ({tokens} tokens of hidden state)", echo["p50"], echo["p99"],
                 None, None, None])
    print(table(["system", "p50 ms", "p99 ms", "ratio to chain", "per hop ms", "per hop / echo"], rows))
    print(f"per hop / echo per block ({ROUNDS} alternating blocks; the machine's drift): "
          + "; ".join(f"{name} {min(s['per_hop_over_echo_by_block']):.2f}..{max(s['per_hop_over_echo_by_block']):.2f}"
                      for name, s in systems.items())
          + f"; goal <= {GOAL}")
    chain_slices = percentiles_ms(measured.chain_slices)["p50"]
    result["chain_slices_p50_ms"] = chain_slices
    for name, s in systems.items():
        print(f"{name}, p50 ms: " + ", ".join(f"{part} {value:.3f}" for part, value in s["parts_p50_ms"].items())
              + f" (the chain's slices {chain_slices:.3f})")
    if out is not None:
        write_result(out, "overhead", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also measure the tiers of this checkout (e.g. `git worktree add DIR REV`; its "
                             "stubs generated) in the same alternating blocks")
    parser.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        _echo_server(args.echo_server)
        return
    run(args.artifacts, args.data, args.limit, args.out, args.baseline)


if __name__ == "__main__":
    main()
