"""Overhead of the three gRPC tiers over the floor: requests forced to the cloud, batch 1.

End-to-end latency at the client (real SST-2 dev sentences, one per request, thresholds > 1 so
every sample crosses both hops) versus the same three slices chained in one process with
onnxruntime, with the tiers' thread settings (shared.serving.runner.SliceRunner, 1 intra-op thread) and the
same tokeniser and calibration. Per-hop overhead from the answers' per-tier timings. The tiers are
measured placed two ways: "spread", consecutive tiers pinned to different cores (shared.serving.placement,
the tiers' `cpus` setting: as on machines of their own; the headline), and "floating", every tier
free to run on every core, where the kernel puts it. The chain and the two placements are measured
in alternating blocks of texts: this shared machine's speed drifts by up to 10% between minutes,
which measured one after the other moved the ratio by as much. The ratio of each block
(`overhead_ratio_by_block`, `bare_relay_ratio_by_block`) shows how far the drift moves it within a run.

For scale, the bare cost of a hop in this stack: the p50 round trip of a grpc.aio echo server in
another process, sent the bytes of a median forwarded hidden state and answering them back
(no tier code at all), as a new unary call and as a message on an open stream;
`ratio_if_hops_were_bare` is what the ratio would be if each of the three hops cost only a bare
round trip on a stream (the client and the tiers all send their calls on streams). The same round
trip after IDLE_SECONDS of idleness (`bare_grpc_stream_round_trip_after_idle_ms`) is what a hop
meets in the chain of tiers, where each process waits while the others run their slices: on a
shared VM, code that ran moments ago is out of the caches by then. The floor of the whole stack,
measured in the same blocks: the bare relay (bench.relay), three Python processes running the same
slices on grpc.aio and passing raw bytes, no tier code (`bare_relay_ratio`).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import FORCE_CLOUD, base_parser, dev_set, load, percentiles_ms, table, tiers, write_result
from bench.relay import Relay
from bench.relay import latencies as relay_latencies
from shared.client import TierClient
from shared.contract.calibration import softmax_rows
from shared.contract.manifest import TIERS, Manifest, verified_slice_path
from shared.contract.text import TextEncoder
from shared.serving.placement import format_cpu_list, parse_cpu_list, pin_process, spread, usable_cpus
from shared.serving.runner import SliceRunner

WARMUP = 20
IDLE_SECONDS = 0.003  # about one slice's run: how long a tier waits between its messages
ROUNDS = 8  # alternating blocks of chain and three-tier measurements


class Chain:
    """The floor: tokeniser + the three slices in this process, with the tiers' thread settings."""

    def __init__(self, artifacts: Path, manifest: Manifest, threads: int = 1) -> None:
        self.manifest = manifest
        self.runners = [SliceRunner(verified_slice_path(artifacts, s), s, threads) for s in manifest.slices]
        self.encoder = TextEncoder.for_manifest(manifest, artifacts)
        self.compute_seconds: list[float] = []  # per text: the three slices' onnxruntime runs alone

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
            self.compute_seconds.append(compute)
        return seconds

    def close(self) -> None:
        for runner in self.runners:
            runner.close()


def tier_latencies(client: TierClient, texts: Sequence[str]
                   ) -> tuple[list[float], dict[str, list[float]], list[float]]:
    """Seconds per text at the client, per hop (the RPC time not spent inside the callee), and
    the tiers' onnxruntime runs alone."""
    seconds: list[float] = []
    compute: list[float] = []
    hops: dict[str, list[float]] = {"client_mobile": [], "mobile_edge": [], "edge_cloud": []}
    for text in texts:
        started = time.perf_counter()
        [answer] = client.classify([text], FORCE_CLOUD)
        elapsed = time.perf_counter() - started
        assert answer.tier == "cloud"
        mobile, edge, cloud = answer.timings
        seconds.append(elapsed)
        compute.append(mobile.compute_seconds + edge.compute_seconds + cloud.compute_seconds)
        hops["client_mobile"].append(elapsed - mobile.server_seconds)
        hops["mobile_edge"].append(mobile.server_seconds - mobile.own_seconds - edge.server_seconds)
        hops["edge_cloud"].append(edge.server_seconds - edge.own_seconds - cloud.server_seconds)
    return seconds, hops, compute


@dataclass
class TierRuns:
    """Per text: seconds at the client, per-hop seconds, the slices' onnxruntime seconds."""

    seconds: list[float] = field(default_factory=list)
    hops: dict[str, list[float]] = field(default_factory=dict)
    compute: list[float] = field(default_factory=list)

    def add(self, client: TierClient, texts: Sequence[str]) -> None:
        seconds, hops, compute = tier_latencies(client, texts)
        self.seconds += seconds
        self.compute += compute
        for name, values in hops.items():
            self.hops.setdefault(name, []).extend(values)


@dataclass
class Measured:
    """Seconds per text of every system measured, and their slices' onnxruntime seconds."""

    chain: list[float] = field(default_factory=list)
    chain_compute: list[float] = field(default_factory=list)
    tiers: dict[str, TierRuns] = field(default_factory=dict)  # per placement
    relay: list[float] = field(default_factory=list)  # bench.relay: the floor of this stack
    relay_compute: list[float] = field(default_factory=list)
    block_sizes: list[int] = field(default_factory=list)  # texts per alternating block, in order

    def ratio_by_block(self, seconds: Sequence[float]) -> list[float]:
        """p50 of `seconds` / p50 of the chain, per alternating block."""
        ratios, start = [], 0
        for size in self.block_sizes:
            end = start + size
            ratios.append(float(np.median(seconds[start:end]) / np.median(self.chain[start:end])))
            start = end
        return ratios


def measure(artifacts: Path, manifest: Manifest, texts: list[str], placements: Mapping[str, Mapping[str, str]]
            ) -> Measured:
    """The chain, the three tiers per placement (tier -> CPU list: every thread of the tier's process
    is pinned there before each block) and the bare relay (placed as the first placement), measured
    in alternating blocks of texts (ROUNDS), so that drift in the machine's speed hits every side alike."""
    chain = Chain(artifacts, manifest)
    measured = Measured(tiers={name: TierRuns() for name in placements})
    relay = Relay(artifacts, manifest, next(iter(placements.values())))
    try:
        with tiers(artifacts) as cluster, TierClient(cluster.entry_address) as client:
            def place(name: str) -> None:
                for tier, cpus in placements[name].items():
                    pin_process(parse_cpu_list(cpus), cluster.tiers[tier].process.pid)

            chain.latencies(texts[:WARMUP])
            relay_latencies(relay, chain.encoder, texts[:WARMUP])
            for name in placements:
                place(name)
                tier_latencies(client, texts[:WARMUP])
            chain.compute_seconds.clear()
            names = list(placements)
            for i, block in enumerate(np.array_split(np.array(texts, dtype=object), ROUNDS)):
                measured.block_sizes.append(len(block))
                measured.chain += chain.latencies(list(block))
                for name in names if i % 2 == 0 else names[::-1]:
                    place(name)
                    measured.tiers[name].add(client, list(block))
                seconds, compute = relay_latencies(relay, chain.encoder, list(block))
                measured.relay += seconds
                measured.relay_compute += compute
    finally:
        chain.close()
        relay.close()
    measured.chain_compute = chain.compute_seconds
    return measured


def _echo_server(port: int) -> None:
    import grpc

    async def serve() -> None:
        async def echo(request: bytes, context: object) -> bytes:
            return request

        async def echo_stream(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
            async for request in requests:
                yield request

        server = grpc.aio.server()
        handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo),  # no (de)serialisers: raw bytes
                    "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def bare_round_trips_ms(payload_bytes: int, calls: int = 2000) -> dict[str, float]:
    """p50 ms of grpc.aio round trips to an echo server in another process (the floor of a hop):
    a new unary call each ("unary"), a message on one open bidirectional stream ("stream"), and
    such a message after IDLE_SECONDS of sleep ("stream_after_idle")."""
    import grpc

    from shared.tools.processes import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.overhead", "--echo-server", str(port)])

    async def client() -> dict[str, float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            echo = channel.unary_unary("/echo.Echo/Echo")
            stream = channel.stream_stream("/echo.Echo/EchoStream")()
            payload = b"\0" * payload_bytes

            async def over_stream() -> None:
                await stream.write(payload)
                await stream.read()

            seconds: dict[str, list[float]] = {"unary": [], "stream": [], "stream_after_idle": []}
            for i in range(calls + 200):
                for kind, round_trip in (("unary", lambda: echo(payload)), ("stream", over_stream)):
                    started = time.perf_counter()
                    await round_trip()
                    if i >= 200:
                        seconds[kind].append(time.perf_counter() - started)
            for _ in range(calls // 4):
                time.sleep(IDLE_SECONDS)  # the whole process idles, as a tier between its messages
                started = time.perf_counter()
                await over_stream()
                seconds["stream_after_idle"].append(time.perf_counter() - started)
            await stream.done_writing()
            return {kind: float(np.median(values) * 1e3) for kind, values in seconds.items()}

    try:
        return asyncio.run(client())
    finally:
        server.terminate()
        server.wait()


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, _ = dev_set(manifest, data, limit)
    cpus = spread(TIERS)
    everywhere = format_cpu_list(usable_cpus())
    placements = {"spread": cpus} if cpus else {}  # the headline first
    placements["floating"] = {tier: everywhere for tier in TIERS}
    measured = measure(artifacts, manifest, texts, placements)
    chain = percentiles_ms(measured.chain)
    by_placement = {placement: _summary(chain, r) | {"overhead_ratio_by_block": measured.ratio_by_block(r.seconds)}
                    for placement, r in measured.tiers.items()}
    relay = percentiles_ms(measured.relay)
    headline = next(iter(by_placement.values()))
    encoder = TextEncoder.for_manifest(manifest, artifacts)
    tokens = int(np.median([encoder.encode([t]).tensors["attention_mask"].shape[1] for t in texts]))
    bare = bare_round_trips_ms(tokens * manifest.hidden_size * 4)
    bare_hops = 3 * bare["stream"]  # TierClient and the tiers all send their calls on streams
    result = {
        "samples": len(texts), "chain_ms": chain, "placement": next(iter(placements)), "cpus": cpus, **headline,
        "slice_compute_p50_ms": {"chain": percentiles_ms(measured.chain_compute)["p50"],
                                 "three_tier": headline["slice_compute_p50_ms"],
                                 "bare_relay": percentiles_ms(measured.relay_compute)["p50"]},
        "bare_relay_ms": relay, "bare_relay_ratio": relay["p50"] / chain["p50"],
        "bare_relay_ratio_by_block": measured.ratio_by_block(measured.relay), "block_sizes": measured.block_sizes,
        "by_placement": by_placement,
        "bare_grpc_round_trip_ms": bare["unary"], "bare_grpc_stream_round_trip_ms": bare["stream"],
        "bare_grpc_stream_round_trip_after_idle_ms": bare["stream_after_idle"],
        "bare_payload_tokens": tokens, "ratio_if_hops_were_bare": (chain["p50"] + bare_hops) / chain["p50"],
        "ratio_if_hops_were_bare_after_idle": (chain["p50"] + 3 * bare["stream_after_idle"]) / chain["p50"],
    }
    rows = [["in-process chain", chain["p50"], chain["p99"], chain["mean"], None]]
    rows += [[f"three tiers (gRPC), {name}", r["three_tier_ms"]["p50"], r["three_tier_ms"]["p99"],
              r["three_tier_ms"]["mean"], r["overhead_ratio"]] for name, r in by_placement.items()]
    rows += [[f"bare relay (bench.relay), {result['placement']}", relay["p50"], relay["p99"], relay["mean"],
              result["bare_relay_ratio"]]]
    print(table(["system", "p50 ms", "p99 ms", "mean ms", "ratio p50"], rows))
    print("tiers spread: " + (", ".join(f"{t} on CPU {c}" for t, c in cpus.items()) if cpus else
                              "no (one CPU)") + "; floating: where the kernel puts them")
    for name, r in by_placement.items():
        print(f"{name}: overhead ratio p50 {r['overhead_ratio']:.3f} (p99 {r['overhead_ratio_p99']:.3f}); "
              f"per hop {r['per_hop_overhead_ms']:.3f} ms; hop p50 (RPC time outside the callee): "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in r["hop_p50_ms"].items()))
    blocks = {**{f"tiers {name}": r["overhead_ratio_by_block"] for name, r in by_placement.items()},
              "bare relay": result["bare_relay_ratio_by_block"]}
    print(f"ratio per block ({ROUNDS} blocks alternating with the chain; the machine's drift between minutes): "
          + "; ".join(f"{name} {min(r):.3f}..{max(r):.3f}" for name, r in blocks.items()))
    compute = result["slice_compute_p50_ms"]
    print(f"the three slices' onnxruntime runs alone, p50: {compute['chain']:.3f} ms in the chain, "
          f"{compute['three_tier']:.3f} ms in the tiers ({result['placement']}), "
          f"{compute['bare_relay']:.3f} ms in the relay")
    print(f"bare relay: three processes running the same slices on grpc.aio, passing raw bytes on streams, no "
          f"tier code: ratio {result['bare_relay_ratio']:.3f}, the floor of Python + gRPC + processes here; "
          f"the tiers' own work per request: {headline['three_tier_ms']['p50'] - relay['p50']:.3f} ms over it")
    print(f"bare grpc.aio round trip ({tokens} tokens of hidden state): {bare['unary']:.3f} ms as a unary call, "
          f"{bare['stream']:.3f} ms on an open stream; with three such hops on streams and no tier "
          f"code the ratio would be {result['ratio_if_hops_were_bare']:.3f}")
    print(f"the same on a stream after {IDLE_SECONDS * 1e3:.0f} ms idle: {bare['stream_after_idle']:.3f} ms; "
          f"ratio with three such hops {result['ratio_if_hops_were_bare_after_idle']:.3f}")
    if out is not None:
        write_result(out, "overhead", result)
    return result


def _summary(chain: dict[str, float], runs: TierRuns) -> dict[str, Any]:
    three = percentiles_ms(runs.seconds)
    return {"three_tier_ms": three, "overhead_ratio": three["p50"] / chain["p50"],
            "overhead_ratio_p99": three["p99"] / chain["p99"],
            "per_hop_overhead_ms": (three["p50"] - chain["p50"]) / 3,
            "hop_p50_ms": {name: percentiles_ms(values)["p50"] for name, values in runs.hops.items()},
            "slice_compute_p50_ms": percentiles_ms(runs.compute)["p50"]}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        _echo_server(args.echo_server)
        return
    run(args.artifacts, args.data, args.limit, args.out)


if __name__ == "__main__":
    main()
