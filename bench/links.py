"""Links: the three tiers in three network namespaces joined by veth pairs whose bandwidth the kernel
shapes (tc tbf), the client in the mobile namespace; hidden states forwarded as fp32, fp16, int8 or int4.

`sudo python -m bench.links --artifacts artifacts/default [--limit 400]` (root: it makes namespaces).

    mobile ns                       edge ns                          cloud ns
    client -> mobile tier  --veth-- edge tier (routes mobile<->cloud) --veth-- cloud tier
              127.0.0.1    10.77.1.1|10.77.1.2                10.77.2.1|10.77.2.2   + cloud-only tier

Each link is shaped in both directions with a token bucket (tbf) at the profile's rate: mobile<->edge
10 or 50 Mbit/s, edge<->cloud 100 Mbit/s. The cloud-only baseline is the entry-tier server on the
whole model (bench.whole_model) in the cloud namespace, sent the raw text from the mobile namespace
over the same two links. One text per request, one request at a time. Per encoding and profile:
bytes per forwarded sample (the tiers' own tierserve_forwarded_bytes_total), p50/p95 per exit tier
and overall, accuracy. This kernel has no netem delay, so the links add transmission time only;
`--rtt-ms` adds a round trip per link crossed to each answer afterwards, analytically (an
assumption, reported apart). All tiers share this machine's cores, so compute is not what mobile,
edge and cloud hardware would take. Namespaces and processes are removed on exit, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO_ROOT, base_parser, dev_set, load, machine, stop_group, table, write_result
from bench.whole_model import assemble

ENCODINGS = ("fp32", "fp16", "int8", "int4")
PROFILES = {"10 Mbit/s": 10, "50 Mbit/s": 50}  # mobile<->edge rate; edge<->cloud is EDGE_CLOUD_MBIT
EDGE_CLOUD_MBIT = 100
MOBILE_IP, EDGE_IP_M, EDGE_IP_C, CLOUD_IP = "10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"
PORTS = {"mobile": 50051, "edge": 50052, "cloud": 50053, "whole": 50054}
METRICS = {"mobile": 9101, "edge": 9102, "cloud": 9103, "whole": 9104}
TIERS = ("mobile", "edge", "cloud")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def namespaces() -> Iterator[dict[str, str]]:
    """mobile, edge and cloud namespaces (names unique to this process), linked and routed; always removed."""
    ns = {tier: f"tierserve-{tier}-{os.getpid()}" for tier in TIERS}
    made: list[str] = []
    try:
        for name in ns.values():
            _ip("netns", "add", name)
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        for (a, a_dev, a_ip), (b, b_dev, b_ip) in ((("mobile", "me0", MOBILE_IP), ("edge", "em0", EDGE_IP_M)),
                                                   (("edge", "ec0", EDGE_IP_C), ("cloud", "ce0", CLOUD_IP))):
            _ip("link", "add", a_dev, "netns", ns[a], "type", "veth", "peer", "name", b_dev, "netns", ns[b])
            for side, dev, ip in ((a, a_dev, a_ip), (b, b_dev, b_ip)):
                _ip("-n", ns[side], "addr", "add", f"{ip}/24", "dev", dev)
                _ip("-n", ns[side], "link", "set", dev, "up")
        _ip("-n", ns["mobile"], "route", "add", "10.77.2.0/24", "via", EDGE_IP_M)
        _ip("-n", ns["cloud"], "route", "add", "10.77.1.0/24", "via", EDGE_IP_C)
        _ip("netns", "exec", ns["edge"], "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        yield ns
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def shape(ns: Mapping[str, str], mobile_edge_mbit: float, edge_cloud_mbit: float) -> None:
    """tbf on both ends of both links. burst: two full frames, or a millisecond at the rate if more (the
    least tbf accepts at high rates); so a forwarded tensor crosses at the rate, not in one burst."""
    for tier, dev, mbit in (("mobile", "me0", mobile_edge_mbit), ("edge", "em0", mobile_edge_mbit),
                            ("edge", "ec0", edge_cloud_mbit), ("cloud", "ce0", edge_cloud_mbit)):
        burst = max(2 * 1514, int(mbit * 1e6 / 8 / 1000))
        subprocess.run(["tc", "-n", ns[tier], "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                        "burst", str(burst), "latency", "500ms"], check=True, capture_output=True, text=True)


@contextmanager
def tier_in(ns: str, node: str, artifacts: Path, listen: str, metrics: tuple[str, int], log: Path,
            flags: Mapping[str, object]) -> Iterator[None]:
    """`python -m <node>` inside namespace `ns` (stopped with SIGTERM, then SIGKILL, on exit)."""
    from shared.serving.process import PARENT_PID_ENV

    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", node, "--listen", listen, "--artifacts",
            str(artifacts.resolve()), "--metrics-addr", metrics[0], "--metrics-port", str(metrics[1])]
    for name, value in flags.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield
    finally:
        stop_group(process, 10)


def run_client(ns: str, spec: Mapping[str, Any], work: Path) -> dict[str, Any]:
    """The client pass (worker below) as a process in namespace `ns`; its JSON result."""
    spec_path, out_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                       if p)}
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "bench.links", "--worker",
                           str(spec_path), str(out_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted(work.glob("*.log")))
        raise RuntimeError(f"client pass failed (exit {done.returncode}):\n{done.stderr[-3000:]}\n{logs}")
    return dict(json.loads(out_path.read_text()))


def worker(spec_path: Path, out_path: Path) -> None:
    """In the mobile namespace: wait for the servers, send every text alone, time each answer; scrape the
    tiers' forwarded-bytes counters before and after."""
    from shared.client import TierClient, health_status

    spec = json.loads(spec_path.read_text())
    deadline = time.monotonic() + 90
    for address in spec["wait_for"]:
        while health_status(address, timeout=0.5) != "SERVING":
            if time.monotonic() > deadline:
                raise SystemExit(f"{address} not SERVING after 90 s")
            time.sleep(0.2)
    before = {hop: _forwarded(*where) for hop, where in spec["metrics"].items()}
    latencies, tiers, predictions = [], [], []
    with TierClient(spec["address"], timeout=60) as client:
        for text in spec["texts"][:20]:  # warm-up: connections, first runs of each slice
            client.classify([text])
        before = {hop: _forwarded(*where) for hop, where in spec["metrics"].items()}
        for text in spec["texts"]:
            started = time.perf_counter()
            [answer] = client.classify([text])
            latencies.append(time.perf_counter() - started)
            tiers.append(answer.tier)
            predictions.append(answer.label_index)
    after = {hop: _forwarded(*where) for hop, where in spec["metrics"].items()}
    per_sample = {hop: (after[hop][1] - before[hop][1]) / max(1.0, after[hop][0] - before[hop][0])
                  for hop in after}
    forwarded = {hop: after[hop][0] - before[hop][0] for hop in after}
    out_path.write_text(json.dumps({"latencies": latencies, "tiers": tiers, "predictions": predictions,
                                    "bytes_per_forwarded_sample": per_sample, "forwarded_samples": forwarded}))


def _forwarded(host: str, port: int, hop: str) -> tuple[float, float]:
    """(samples, bytes) forwarded over `hop` so far, from a tier's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
              if s.labels.get("hop") == hop}
    return values.get("tierserve_forwarded_samples_total", 0.0), values.get("tierserve_forwarded_bytes_total", 0.0)


def latency_figures(result: Mapping[str, Any], labels: np.ndarray, rtt_s: Mapping[str, float] | None = None
                    ) -> dict[str, Any]:
    """p50/p95 (ms) overall and per exit tier, answers per tier, accuracy; rtt_s adds a round trip per link
    crossed: {"mobile": 0, "edge": rtt_me, "cloud": rtt_me + rtt_ec} by the tier that answered."""
    seconds = np.asarray(result["latencies"])
    tiers = np.asarray(result["tiers"])
    if rtt_s:
        seconds = seconds + np.array([rtt_s[t] for t in tiers])
    ms = seconds * 1e3
    figures: dict[str, Any] = {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                               "accuracy": float((np.asarray(result["predictions"]) == labels).mean())}
    for tier in TIERS:
        mine = ms[tiers == tier]
        figures[tier] = {"share": len(mine) / len(ms), "p50_ms": float(np.percentile(mine, 50)) if len(mine) else None,
                         "p95_ms": float(np.percentile(mine, 95)) if len(mine) else None}
    return figures


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        encodings: Sequence[str] = ENCODINGS, profiles: Mapping[str, float] = PROFILES,
        rtt_ms: tuple[float, float] = (10.0, 20.0)) -> dict[str, Any] | None:
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        why = "not root" if os.geteuid() else "missing " + ", ".join(missing)
        print(f"links: skipped: needs root and iproute2 ({why}); run `sudo .venv/bin/python -m bench.links`",
              flush=True)
        return None
    manifest = load(artifacts)
    texts, labels = dev_set(manifest, data, limit)
    assert isinstance(texts, list), "bench.links measures a text model"
    whole = assemble(artifacts, artifacts.with_name(artifacts.name + "-whole"))
    rtt_s = {"mobile": 0.0, "edge": rtt_ms[0] / 1e3, "cloud": (rtt_ms[0] + rtt_ms[1]) / 1e3}
    runs: list[dict[str, Any]] = []
    with namespaces() as ns, tempfile.TemporaryDirectory(prefix="tierserve-links-") as tmp:
        work = Path(tmp)
        for encoding in encodings:
            with ExitStack() as stack:  # this encoding's tiers, and the cloud-only tier beside them
                cloud, edge = f"{CLOUD_IP}:{PORTS['cloud']}", f"{EDGE_IP_M}:{PORTS['edge']}"
                stack.enter_context(tier_in(ns["cloud"], "cloud_node", artifacts, cloud, (CLOUD_IP, METRICS["cloud"]),
                                            work / f"cloud-{encoding}.log", {}))
                stack.enter_context(tier_in(ns["edge"], "edge_node", artifacts, edge, (EDGE_IP_M, METRICS["edge"]),
                                            work / f"edge-{encoding}.log",
                                            {"next": cloud, "forward_encoding": encoding}))
                stack.enter_context(tier_in(ns["mobile"], "mobile_node", artifacts, f"127.0.0.1:{PORTS['mobile']}",
                                            ("127.0.0.1", METRICS["mobile"]), work / f"mobile-{encoding}.log",
                                            {"next": edge, "forward_encoding": encoding}))
                whole_address = f"{CLOUD_IP}:{PORTS['whole']}"
                stack.enter_context(tier_in(ns["cloud"], "mobile_node", whole, whole_address,
                                            (CLOUD_IP, METRICS["whole"]), work / f"whole-{encoding}.log",
                                            {"next": "127.0.0.1:9"}))  # never called: threshold 0 answers all
                for profile, mbit in profiles.items():
                    shape(ns, mbit, EDGE_CLOUD_MBIT)
                    for system, address, metrics in (
                            ("three-tier", f"127.0.0.1:{PORTS['mobile']}",
                             {"mobile_edge": ["127.0.0.1", METRICS["mobile"], "mobile_edge"],
                              "edge_cloud": [EDGE_IP_M, METRICS["edge"], "edge_cloud"]}),
                            ("cloud-only", whole_address, {})):
                        spec = {"address": address, "texts": texts, "metrics": metrics,
                                "wait_for": [f"127.0.0.1:{PORTS['mobile']}", edge, cloud, whole_address]}
                        result = run_client(ns["mobile"], spec, work)
                        if system == "cloud-only":  # its entry tier answers, after the text crossed both links
                            result["tiers"] = ["cloud"] * len(result["tiers"])
                        entry = {"encoding": encoding, "profile": profile, "system": system,
                                 "bytes_per_forwarded_sample": result["bytes_per_forwarded_sample"],
                                 "forwarded_samples": result["forwarded_samples"],
                                 "measured": latency_figures(result, labels),
                                 "with_rtt": latency_figures(result, labels, rtt_s)}
                        runs.append(entry)
                        m = entry["measured"]
                        print(f"links: {profile:<10} {encoding:<5} {system:<10} p50 {m['p50_ms']:6.1f} ms  "
                              f"p95 {m['p95_ms']:6.1f} ms  accuracy {m['accuracy']:.4f}", flush=True)
    result = {"runs": runs, **summarise(runs, encodings, profiles), "samples": len(texts),
              "rates_mbit": {"mobile_edge": dict(profiles), "edge_cloud": EDGE_CLOUD_MBIT},
              "rtt_ms_added_analytically": {"mobile_edge": rtt_ms[0], "edge_cloud": rtt_ms[1]},
              "artifacts": str(artifacts), "machine": machine(),
              "command": " ".join(["python -m bench.links", *sys.argv[1:]])}
    print_tables(result, encodings, profiles)
    if out is not None:
        write_result(out / "links", "links", result)
    return result


def summarise(runs: Sequence[Mapping[str, Any]], encodings: Sequence[str], profiles: Mapping[str, float]
              ) -> dict[str, Any]:
    """The goals on the slowest profile: int8 / fp32 p95 of cloud answers, three-tier p50 vs cloud-only."""
    def find(system: str, profile: str, encoding: str) -> Mapping[str, Any]:
        return next(r for r in runs if (r["system"], r["profile"], r["encoding"]) == (system, profile, encoding))

    slow = min(profiles, key=lambda p: profiles[p])
    cloud_only = {kind: float(np.median([find("cloud-only", slow, e)[kind]["p50_ms"] for e in encodings]))
                  for kind in ("measured", "with_rtt")}
    goals: dict[str, Any] = {"profile": slow}
    if "int8" in encodings and "fp32" in encodings:
        ratio = (find("three-tier", slow, "int8")["measured"]["cloud"]["p95_ms"]
                 / find("three-tier", slow, "fp32")["measured"]["cloud"]["p95_ms"])
        goals["int8_over_fp32_cloud_p95"] = {"value": ratio, "goal": "<= 0.5", "met": ratio <= 0.5}
    for encoding in encodings:
        for kind in ("measured", "with_rtt"):
            ours = find("three-tier", slow, encoding)[kind]["p50_ms"]
            goals[f"three_tier_p50_over_cloud_only_{encoding}_{kind}"] = {
                "value": ours / cloud_only[kind], "three_tier_p50_ms": ours, "cloud_only_p50_ms": cloud_only[kind],
                "goal": "< 1", "met": ours < cloud_only[kind]}
    return {"goals": goals, "cloud_only_p50_ms_median_over_passes": cloud_only}


def headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """What bench.run_all puts in summary.json: the goals and, per profile and encoding, bytes and p50/p95."""
    cells: dict[str, dict[str, Any]] = {}
    for r in result["runs"]:
        name = r["encoding"] if r["system"] == "three-tier" else f"cloud-only ({r['encoding']} pass)"
        cells.setdefault(r["profile"], {})[name] = {
            "bytes_per_forwarded_sample": r["bytes_per_forwarded_sample"], "p50_ms": r["measured"]["p50_ms"],
            "p95_ms": r["measured"]["p95_ms"], "cloud_p95_ms": r["measured"]["cloud"]["p95_ms"],
            "accuracy": r["measured"]["accuracy"]}
    return {"goals": result["goals"], "by_profile": cells, "rtt_ms_added_analytically":
            result["rtt_ms_added_analytically"], "samples": result["samples"], "artifacts": result["artifacts"]}


def print_tables(result: Mapping[str, Any], encodings: Sequence[str], profiles: Mapping[str, float]) -> None:
    rows = []
    for r in result["runs"]:
        m, b = r["measured"], r["bytes_per_forwarded_sample"]
        rows.append([r["profile"], r["encoding"] if r["system"] == "three-tier" else "(text)", r["system"],
                     b.get("mobile_edge"), b.get("edge_cloud"), m["p50_ms"], m["p95_ms"],
                     *[f"{m[t]['share']:.2f}: {_ms(m[t]['p50_ms'])}/{_ms(m[t]['p95_ms'])}" for t in TIERS],
                     m["accuracy"], r["with_rtt"]["p50_ms"], r["with_rtt"]["p95_ms"]])
    print(table(["mobile->edge", "forward", "system", "B/sample m->e", "B/sample e->c", "p50 ms", "p95 ms",
                 "mobile share: p50/p95", "edge", "cloud", "accuracy", "p50 +RTT", "p95 +RTT"], rows))
    for name, goal in result["goals"].items():
        print(f"{name}: {goal}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--worker"]:
        worker(Path(args_list[1]), Path(args_list[2]))
        return
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--encodings", default=",".join(ENCODINGS), help="forward encodings (%(default)s)")
    parser.add_argument("--rtt-ms", default="10,20", help="round trip added analytically per link crossed: "
                        "mobile-edge,edge-cloud (%(default)s)")
    args = parser.parse_args(args_list)
    me, ec = (float(x) for x in args.rtt_ms.split(","))
    run(args.artifacts, args.data, args.limit, args.out, args.encodings.split(","), PROFILES, (me, ec))


if __name__ == "__main__":
    main()
