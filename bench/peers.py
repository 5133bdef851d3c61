"""Peers: the same whole model served by KServe's Python ModelServer and by tierserve's cloud-only tier,
and tierserve's three tiers at their default thresholds, driven by one load generator over the Open
Inference Protocol gRPC: SST-2 dev, one text per request, concurrency 1, 8 and 32.

`python -m bench.peers --artifacts artifacts/default [--blocks 3 --seconds 3]`. Every server and variant
runs at once (the idle ones share the cores; `--kserve-variants default --three-tier-variants default`
leaves one of each); the measurement alternates between them (block 1: level 1 A B C, level 8 A B C, ...; then
block 2, ...) so that the machine's drift hits every server alike, and each figure is the median over
blocks with its min..max. Accuracy: every dev text once per server, after the load.

- KServe (A): `kserve` in its own virtualenv (default ~/.cache/tierserve/kserve-venv, made on first
  use with pip: its pins never touch ours), serving bench/kserve_model.py: KServe's custom-model
  pattern with onnxruntime and the tokenizer on the whole-model ONNX graph (bench.whole_model).
- tierserve cloud-only (B): the entry-tier server on that same whole-model graph (bench.throughput).
- tierserve three-tier (C): mobile -> edge -> cloud on 127.0.0.1, the manifest's thresholds; at the
  tiers' defaults, with the entry tier running two batches side by side (`--slice-workers 2`, a
  user setting: more throughput, a wider p99), and pinned to CPUs (`--cpus`, as
  shared.serving.placement.spread splits the machine: on two cores the entry tier on one, the edge
  and the cloud on the other); the best taken as for the cloud-only tier, and every variant's own
  pair (throughput, p99) against KServe at c=32 in `goals`.
KServe runs as it comes and tuned (one onnxruntime thread, no log line per request); the cloud-only
tier at its default (one thread), with a thread per core, and with a thread per core and
`--onnx-spinning true` (a user setting, off by default), as KServe's default. Ratios: each side's
best variant at that level over KServe's best, the medians, and per block; every pair is in the JSON.
The generator is Triton's perf_analyzer from a Debian 13 chroot
(--chroot, default /var/tmp/trixie; see bench.perf_analyzer) where it exists, else bench.oip_load
(tritonclient); `--generator` picks one.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench import oip_load
from bench.common import REPO_ROOT, base_parser, dev_set, load, machine, scrape, stop_group, table, tiers, write_result
from bench.perf_analyzer import FIGURES
from bench.throughput import cloud_only
from bench.whole_model import assemble
from shared.contract.manifest import TIERS
from shared.serving.placement import spread

LEVELS = (1, 8, 32)
KSERVE_VERSION = "0.21.0"
KSERVE_VENV = Path.home() / ".cache" / "tierserve" / "kserve-venv"
DEFAULT_CHROOT = Path("/var/tmp/trixie")
PERF_ANALYZER = "/opt/pa/bin/perf_analyzer"  # inside the chroot
KSERVE_MODEL = "whole"
# KServe as it comes (onnxruntime's default threads, one per core; a log line per request) and tuned
# as tierserve runs (one intra-op thread: two spinning threads per process fight the load generator
# and each other on a small machine), with no per-request log lines
KSERVE_VARIANTS = {"default": ("kserve", 0, False), "tuned": ("kserve, 1 thread, quiet", 1, True)}
# the three tiers at their defaults, with the user setting that lets the entry tier run two batches side by
# side (the slice on one core, the next batch's on the other): more throughput, a wider p99 (bench.tier_ab),
# and pinned with the `cpus` setting as shared.serving.placement.spread splits this machine's CPUs (on two:
# the entry tier on one, the edge and the cloud on the other)
THREE_TIER_VARIANTS: dict[str, tuple[str, dict[str, dict[str, object]]]] = {
    "default": ("three-tier", {}),
    "mobile-2-workers": ("three-tier, mobile 2 slice workers", {"mobile": {"slice_workers": 2}}),
    # on one CPU there is nothing to pin: the variant would be the defaults under another name
    **({"pinned": ("three-tier, pinned", {tier: {"cpus": cpus} for tier, cpus in placement.items()})}
       if (placement := spread(TIERS)) else {})}


def kserve_python(venv: Path) -> Path:
    """The KServe virtualenv's python, made (or brought to our pins) with pip on first use.

    onnxruntime and tokenizers are pinned to the versions tierserve runs, so both servers run the
    same kernels and the same tokenisation; torch is not needed there."""
    pins = [f"kserve=={KSERVE_VERSION}"] + [f"{p}=={importlib.metadata.version(p)}"
                                            for p in ("onnxruntime", "tokenizers")]
    python, stamp = venv / "bin" / "python", venv / ".tierserve-pins"
    if stamp.is_file() and stamp.read_text().split() == pins and python.is_file():
        return python
    print(f"peers: installing {' '.join(pins)} into {venv} (once)", flush=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    stamp.write_text("\n".join(pins) + "\n")
    return python


def model_config_bytes(name: str, classes: int) -> bytes:
    """The ModelConfigResponse perf_analyzer reads: bench/kserve_model.py's input and its outputs, the
    entry tier's five (shared.serving.oip; built with tritonclient's copy of the messages, since
    ours and tritonclient's cannot be imported in one process)."""
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2

    outputs = {"label_index": (mc.TYPE_INT64, [-1]), "label": (mc.TYPE_STRING, [-1]),
               "probabilities": (mc.TYPE_FP32, [-1, classes]), "confidence": (mc.TYPE_FP32, [-1]),
               "exit_tier": (mc.TYPE_STRING, [-1])}
    config = mc.ModelConfig(
        name=name, platform="kserve", max_batch_size=0,
        input=[mc.ModelInput(name="texts", data_type=mc.TYPE_STRING, dims=[-1])],
        output=[mc.ModelOutput(name=n, data_type=t, dims=d) for n, (t, d) in outputs.items()])
    return bytes(service_pb2.ModelConfigResponse(config=config).SerializeToString())


@contextmanager
def kserve_server(python: Path, whole: Path, classes: int, log_dir: Path, onnx_threads: int, quiet: bool
                  ) -> Iterator[str]:
    from shared.tools.processes import free_port

    grpc_port, http_port = free_port(), free_port()
    config = log_dir / "kserve-model-config.pb"
    config.write_bytes(model_config_bytes(KSERVE_MODEL, classes))
    log_path = log_dir / f"kserve-{grpc_port}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(python), str(REPO_ROOT / "bench" / "kserve_model.py"), "--artifacts", str(whole.resolve()),
             "--model_name", KSERVE_MODEL, "--grpc_port", str(grpc_port), "--http_port", str(http_port),
             "--model-config", str(config), "--onnx-threads", str(onnx_threads)]
            + ["--quiet", "--enable_latency_logging", "false"] * quiet,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{grpc_port}"
    try:
        _wait_ready(address, KSERVE_MODEL, process, log_path)
        yield address
    finally:
        stop_group(process, 15)


def _wait_ready(address: str, model: str, process: subprocess.Popen[bytes], log_path: Path,
                timeout: float = 120.0) -> None:
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout
    with grpcclient.InferenceServerClient(address) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"KServe exited with status {process.returncode}:\n{_tail(log_path)}")
            with contextlib.suppress(Exception):  # not listening yet
                if client.is_model_ready(model):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"KServe not ready after {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.5)


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


Measure = Callable[[str, str, int], dict[str, Any]]  # (address, model, concurrency) -> figures


def perf_analyzer_measure(chroot: Path, texts: Sequence[str], seconds: float) -> Measure:
    """perf_analyzer, unmodified, in the chroot (which shares our network namespace: 127.0.0.1 works)."""
    (chroot / "tmp" / "tierserve-peers-input.json").write_text(json.dumps({"data": [{"texts": [t]} for t in texts]}))

    def attempt(address: str, model: str, level: int) -> dict[str, Any]:
        done = subprocess.run(
            ["chroot", str(chroot), PERF_ANALYZER, "-m", model, "-i", "grpc", "-u", address,
             "--input-data", "/tmp/tierserve-peers-input.json", "--shape", "texts:1",
             "--concurrency-range", str(level), "--measurement-interval", str(int(seconds * 1000)),
             "--max-trials", "3", "--stability-percentage", "1000"],  # 3 windows, always kept: blocks give the spread
            capture_output=True, text=True, timeout=600)
        found = {name: re.search(pattern, done.stdout) for name, pattern in FIGURES.items()}
        values = {name: float(m.group(1)) if m else None for name, m in found.items()}
        if done.returncode != 0 or values["throughput_per_s"] is None:
            raise RuntimeError(f"perf_analyzer failed against {model} at {address} (exit {done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return {"throughput_per_s": values["throughput_per_s"], "requests": values["requests"],
                "p50_ms": (values["p50_us"] or 0) / 1e3, "p99_ms": (values["p99_us"] or 0) / 1e3}

    return once_more(attempt)


def once_more(measure: Measure) -> Measure:
    """`measure`, run a second time when the first fails (a load tool's failure to connect has been seen once
    in many runs, with the server serving on): the cell records the first failure under "retried" and a
    second failure raises. A long run is not lost to one transient, and no retry goes unseen."""

    def measure_again(address: str, model: str, level: int) -> dict[str, Any]:
        try:
            return measure(address, model, level)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines() or [type(exc).__name__]
            print(f"peers: {first[0]} -- measuring once more", flush=True)
            return {**measure(address, model, level), "retried": "\n".join(first[-3:])}

    return measure_again


def tritonclient_measure(texts: Sequence[str], labels: Sequence[int], seconds: float) -> Measure:
    def measure(address: str, model: str, level: int) -> dict[str, Any]:
        return oip_load.drive(address, model, texts, labels, level, seconds).figures()

    return measure


def cpu_snapshot(cluster: Any) -> dict[str, float]:
    """CPU seconds each tier has used so far, from its own process_cpu_seconds_total (as bench.soak reads its
    memory), and the machine's busy seconds over all cores ("machine", from /proc/stat): which tier runs out
    of CPU first when the three tiers share the cores."""
    used = {tier: scrape(process.metrics_port)[("process_cpu_seconds_total", ())]
            for tier, process in cluster.tiers.items()}
    cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    used["machine"] = (sum(cpu[:8]) - cpu[3] - cpu[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    return used


def cores_used(before: Mapping[str, float], after: Mapping[str, float], seconds: float) -> dict[str, float]:
    """Cores each process (and the machine) kept busy on average between two cpu_snapshot calls."""
    return {name: (after[name] - before[name]) / seconds for name in before}


def pick_generator(choice: str, chroot: Path) -> str:
    ready = (chroot / PERF_ANALYZER.lstrip("/")).is_file() and os.geteuid() == 0
    if choice == "perf_analyzer" and not ready:
        raise SystemExit(f"perf_analyzer not found at {chroot}{PERF_ANALYZER} (or not root for chroot); make the "
                         "chroot as bench/perf_analyzer.py says, or use --generator tritonclient")
    if choice == "auto":
        if not ready:
            print(f"peers: no perf_analyzer at {chroot}{PERF_ANALYZER} (or not root): using bench.oip_load "
                  "(tritonclient)", flush=True)
        return "perf_analyzer" if ready else "tritonclient"
    return choice


def summarise(cells: dict[str, dict[int, list[dict[str, Any]]]], levels: Sequence[int]) -> dict[str, Any]:
    """Median and min..max over blocks per server and level; ratios of ours against the best KServe variant
    at that level (highest median throughput), of medians and per block."""
    stats: dict[str, dict[int, dict[str, Any]]] = {}
    for server, by_level in cells.items():
        stats[server] = {}
        for level in levels:
            runs = by_level[level]
            stats[server][level] = {key: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v))}
                                    for key in ("throughput_per_s", "p50_ms", "p99_ms")
                                    if (v := [r[key] for r in runs if r.get(key) is not None])}
    kserve = [name for name in cells if name.startswith("kserve")]
    ours = [name for name in cells if name not in kserve]

    def best(prefix: str, level: int) -> str:
        return max((n for n in cells if n.startswith(prefix)),
                   key=lambda n: stats[n][level]["throughput_per_s"]["median"])

    ratios: dict[str, dict[int, dict[str, Any]]] = {}
    baseline: dict[int, str] = {}
    for level in levels:
        if not kserve:
            break
        theirs = baseline[level] = best("kserve", level)
        for side in ("cloud-only", "three-tier"):  # each side's best variant against KServe's best
            mine = best(side, level)
            pairs = list(zip(cells[mine][level], cells[theirs][level], strict=True))
            ratios.setdefault(side, {})[level] = {
                "ours": mine, "against": theirs,
                "throughput": stats[mine][level]["throughput_per_s"]["median"]
                / stats[theirs][level]["throughput_per_s"]["median"],
                "throughput_by_block": [a["throughput_per_s"] / b["throughput_per_s"] for a, b in pairs],
                "p99": stats[mine][level]["p99_ms"]["median"] / stats[theirs][level]["p99_ms"]["median"],
                "p99_by_block": [a["p99_ms"] / b["p99_ms"] for a, b in pairs]}

    def of_medians(server: str, variant: str, level: int) -> dict[str, float]:
        return {key: stats[server][level][key]["median"] / stats[variant][level][key]["median"]
                for key in ("throughput_per_s", "p99_ms")}

    by_variant = {variant: {server: {level: of_medians(server, variant, level) for level in levels}
                            for server in ours} for variant in kserve}
    return {"stats": stats, "ratios": ratios, "kserve_baseline": baseline, "ratios_by_kserve_variant": by_variant}


def headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """What bench.run_all puts in summary.json."""
    def pick(server: str, key: str) -> dict[int, float]:
        return {level: r[key] for level, r in result["ratios"].get(server, {}).items()}

    return {"three_tier_throughput_x_kserve": pick("three-tier", "throughput"),
            "cloud_only_throughput_x_kserve": pick("cloud-only", "throughput"),
            "three_tier_p99_x_kserve": pick("three-tier", "p99"), "kserve_baseline": result["kserve_baseline"],
            "ratios_by_kserve_variant": result["ratios_by_kserve_variant"], "goals": result["goals"],
            "accuracy": result["accuracy"], "generator": result["generator"], "artifacts": result["artifacts"],
            "blocks": result["blocks"], "seconds_per_cell": result["seconds_per_cell"]}


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        seconds: float = 3.0, blocks: int = 3, levels: Sequence[int] = LEVELS, generator: str = "auto",
        chroot: Path = DEFAULT_CHROOT, kserve_venv: Path = KSERVE_VENV,
        kserve_variants: Sequence[str] = tuple(KSERVE_VARIANTS),
        three_tier_variants: Sequence[str] = tuple(THREE_TIER_VARIANTS)) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, labels = dev_set(manifest, data, limit)
    assert isinstance(texts, list), "bench.peers measures a text model"
    label_list = [int(x) for x in labels]
    whole = assemble(artifacts, artifacts.with_name(artifacts.name + "-whole"))
    generator = pick_generator(generator, chroot)
    measure = (perf_analyzer_measure(chroot, texts, seconds) if generator == "perf_analyzer"
               else tritonclient_measure(texts, label_list, seconds))
    try:
        python: Path | None = kserve_python(kserve_venv)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"peers: KServe could not be installed into {kserve_venv} ({exc}); measuring tierserve only", flush=True)
        python = None
    cells: dict[str, dict[int, list[dict[str, Any]]]] = {}
    accuracy: dict[str, float] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="tierserve-peers-") as logs:
        servers: dict[str, tuple[str, str]] = {}  # name -> (address, model name)
        for variant in kserve_variants if python else ():
            name, threads, quiet = KSERVE_VARIANTS[variant]
            address = stack.enter_context(kserve_server(python, whole, len(manifest.labels), Path(logs), threads,
                                                        quiet))  # type: ignore[arg-type]
            servers[name] = (address, KSERVE_MODEL)
        servers["cloud-only"] = (stack.enter_context(cloud_only(whole, {})), "tierserve")
        cores = machine()["cores"] or 1
        if cores > 1:  # as KServe's default: an intra-op thread per core
            servers[f"cloud-only, {cores} threads"] = (stack.enter_context(cloud_only(whole, {"onnx_threads": cores})),
                                                       "tierserve")
            # and spinning between runs, as KServe's onnxruntime does by default: the tier's own setting
            spinning = {"onnx_threads": cores, "onnx_spinning": "true"}
            servers[f"cloud-only, {cores} threads, spinning"] = (stack.enter_context(cloud_only(whole, spinning)),
                                                                 "tierserve")
        clusters = {}
        for variant in three_tier_variants:
            name, flags = THREE_TIER_VARIANTS[variant]
            clusters[name] = stack.enter_context(tiers(artifacts, flags))
            servers[name] = (clusters[name].entry_address, "tierserve")
        cells = {server: {level: [] for level in levels} for server in servers}
        for block in range(blocks):
            for level in levels:
                for server, (address, model) in servers.items():
                    cluster = clusters.get(server)
                    before, started = (cpu_snapshot(cluster) if cluster else None), time.perf_counter()
                    figures = measure(address, model, level)
                    busy = ""
                    if cluster is not None:  # the load tool's own warm-up windows are in it too
                        figures["cpu_cores"] = cores_used(before, cpu_snapshot(cluster),
                                                          time.perf_counter() - started)
                        busy = "  cores " + " ".join(f"{k} {v:.2f}" for k, v in figures["cpu_cores"].items())
                    cells[server][level].append(figures)
                    print(f"block {block + 1}/{blocks}  c={level:<3} {server:<24} "
                          f"{figures['throughput_per_s']:7.1f}/s  p50 {figures['p50_ms']:6.1f} ms  "
                          f"p99 {figures['p99_ms']:6.1f} ms{busy}", flush=True)
        for server, (address, model) in servers.items():
            accuracy[server] = oip_load.accuracy(address, model, texts, label_list)
    summary = summarise(cells, levels)
    cpu = {server: {level: {name: float(np.median([r["cpu_cores"][name] for r in cells[server][level]]))
                            for name in cells[server][level][0]["cpu_cores"]} for level in levels}
           for server in clusters}
    for server, by_level in cpu.items():
        print(f"{server}, cores busy per process (median over blocks, the load tool's warm-up included): "
              + "; ".join(f"c={level} " + " ".join(f"{k} {v:.2f}" for k, v in by.items())
                          for level, by in by_level.items()))
    rows = []
    for level in levels:
        for server in cells:
            s = summary["stats"][server][level]
            side = next((name for name in ("cloud-only", "three-tier") if server.startswith(name)), server)
            ratio = summary["ratios"].get(side, {}).get(level)
            ratio = ratio if ratio is None or ratio["ours"] == server else None
            rows.append([level, server, _spread(s["throughput_per_s"]), _spread(s["p50_ms"]), _spread(s["p99_ms"]),
                         accuracy[server], f"{ratio['throughput']:.2f} ({min(ratio['throughput_by_block']):.2f}.."
                         f"{max(ratio['throughput_by_block']):.2f})" if ratio else None])
    print(table(["c", "server", "infer/s median (min..max)", "p50 ms", "p99 ms", "accuracy",
                 "x best KServe (by block)"], rows))
    goals = _goals(summary, levels)
    for name, goal in goals.items():
        print(f"{name}: {goal}")
    result = {"generator": generator, "levels": list(levels), "blocks": blocks, "seconds_per_cell": seconds,
              "samples": len(texts), "artifacts": str(artifacts), "whole_model": str(whole),
              "kserve": {"version": KSERVE_VERSION, "venv": str(kserve_venv),
                         "variants": {KSERVE_VARIANTS[v][0]: {"onnx_threads": KSERVE_VARIANTS[v][1] or "default",
                                                              "per_request_logs": not KSERVE_VARIANTS[v][2]}
                                      for v in kserve_variants}} if python else None,
              "three_tier_variants": {THREE_TIER_VARIANTS[v][0]: THREE_TIER_VARIANTS[v][1]
                                      for v in three_tier_variants},
              "cells": cells, **summary, "three_tier_cpu_cores": cpu.get("three-tier"),
              "cpu_cores_by_three_tier_variant": cpu, "accuracy": accuracy, "goals": goals,
              "machine": machine(), "command": " ".join(["python -m bench.peers", *sys.argv[1:]])}
    if out is not None:
        write_result(out / "peers", "peers", result)
    return result


def _spread(s: dict[str, float]) -> str:
    return f"{s['median']:.1f} ({s['min']:.1f}..{s['max']:.1f})"


def _goals(summary: dict[str, Any], levels: Sequence[int]) -> dict[str, Any]:
    """The issue's goals, against the best KServe variant at each level."""
    ratios = summary["ratios"]
    if not ratios or 32 not in levels:
        return {}
    three, cloud = ratios["three-tier"][32], ratios["cloud-only"]
    theirs = summary["kserve_baseline"][32]
    both = {server: summary["ratios_by_kserve_variant"][theirs][server][32]
            for server in summary["ratios_by_kserve_variant"][theirs] if server.startswith("three-tier")}
    return {"three_tier_throughput_x_kserve_c32": {"value": three["throughput"], "goal": ">= 2",
                                                   "met": three["throughput"] >= 2.0},
            "three_tier_p99_x_kserve_c32": {"value": three["p99"], "goal": "<= 1", "met": three["p99"] <= 1.0},
            # one setting meeting both at once: each three-tier variant's own pair
            "three_tier_both_c32_by_variant": {
                "value": both, "goal": "throughput >= 2 and p99 <= 1 with the same variant",
                "met": any(r["throughput_per_s"] >= 2.0 and r["p99_ms"] <= 1.0 for r in both.values())},
            "cloud_only_throughput_x_kserve": {
                "value": {level: cloud[level]["throughput"] for level in levels}, "goal": ">= 1 at each level",
                "met": all(cloud[level]["throughput"] >= 1.0 for level in levels)}}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell (%(default)s)")
    parser.add_argument("--blocks", type=int, default=3, help="rounds over every server and level (%(default)s)")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels (%(default)s)")
    parser.add_argument("--generator", choices=("auto", "perf_analyzer", "tritonclient"), default="auto",
                        help="auto: perf_analyzer where the chroot has it, else tritonclient")
    parser.add_argument("--chroot", type=Path, default=DEFAULT_CHROOT, help="a Debian 13 root with perf_analyzer "
                        "in /opt/pa (%(default)s)")
    parser.add_argument("--kserve-venv", type=Path, default=KSERVE_VENV, help="KServe's own virtualenv (%(default)s)")
    parser.add_argument("--kserve-variants", default=",".join(KSERVE_VARIANTS),
                        help="KServe as it comes (default) and/or tuned like tierserve (%(default)s)")
    parser.add_argument("--three-tier-variants", default=",".join(THREE_TIER_VARIANTS),
                        help="the three tiers at their defaults, with the entry tier running two batches "
                        "side by side, and/or pinned to CPUs (%(default)s)")
    args = parser.parse_args(argv)
    chosen = {}
    for flag, value, known in (("--kserve-variants", args.kserve_variants, KSERVE_VARIANTS),
                               ("--three-tier-variants", args.three_tier_variants, THREE_TIER_VARIANTS)):
        chosen[flag] = [v for v in value.split(",") if v]
        unknown = [v for v in chosen[flag] if v not in known]
        if unknown or not chosen[flag]:
            parser.error(f"{flag} takes one or more of {', '.join(known)} (comma-separated), got {value!r}")
    run(args.artifacts, args.data, args.limit, args.out, args.seconds, args.blocks,
        tuple(int(x) for x in args.levels.split(",")), args.generator, args.chroot, args.kserve_venv,
        chosen["--kserve-variants"], chosen["--three-tier-variants"])


if __name__ == "__main__":
    main()
