"""The container smoke test's Python side (deploy/ci/smoke.sh drives it; run with the project's venv
from the repository root). Subcommands:

  model OUT            build the tiny test model (tests/tiny_model.py, the real builder) into OUT
  compose SRC OUT      write the compose file the smoke test runs: SRC with only what this machine
                       needs changed (printed): local images, host ports on 127.0.0.1, no Grafana
  check ...            against the running stack: wait healthy, answers equal to the same model
                       served as processes, Prometheus targets up, edge stop/start to full answers
  pods ...             deploy/k8s/base's Deployments as podman containers (no cluster here): each
                       init container copies from the model image into a volume, each tier runs
                       with the rendered command, environment, user, read-only root filesystem and
                       memory limit, its Services' names as network aliases; then the readiness
                       probes' health checks and a full answer through mobile

Every address is 127.0.0.1 (published ports) or on the compose network the test created.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
TIERS = ("mobile", "edge", "cloud")
GRPC_PORTS = {"mobile": 50051, "edge": 50052, "cloud": 50053}
METRICS_PORTS = {"mobile": 9101, "edge": 9102, "cloud": 9103}
SERVICES = {"mobile": "tierserve.v1.Classifier", "edge": "tierserve.v1.Continuation",
            "cloud": "tierserve.v1.Continuation"}
FORCE_CLOUD = {"mobile": 1.01, "edge": 1.01}
THRESHOLD_SETTINGS: list[dict[str, float] | None] = [None, {"mobile": 1.01, "edge": 0.0}, FORCE_CLOUD]


def log(message: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- model


def make_model(out: Path) -> None:
    """The tiny test model, built by the real builder (3 s), readable by the image's user."""
    import tempfile

    sys.path.insert(0, str(ROOT))
    from shared.builder.build import BuildConfig, build
    from tests.tiny_model import make_checkpoint, make_dataset

    with tempfile.TemporaryDirectory(prefix="tierserve-smoke-src-") as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "checkpoint")
        data = make_dataset(Path(tmp) / "data")
        config = BuildConfig(backbone=str(checkpoint), data=str(data), profile="tiny", split_points=(1, 2, 3),
                             label_names=["negative", "positive"], max_length=32, policy="p_tar",
                             p_tar=(0.8, 0.8))
        build(config, out)


def smoke_texts(n: int = 64) -> list[str]:
    """Sentences in the tiny model's vocabulary (any model takes them)."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny_model import sentence

    rng = np.random.default_rng(21)
    return [sentence(rng, i % 2, 2) for i in range(n)]


# ---- the compose file for this machine


def derive_compose(source: Path, out: Path, image: str, prometheus_image: str) -> None:
    """deploy/docker-compose.yml as the smoke test runs it. Changed, and only this: the tiers use
    the image smoke.sh built (no `build`: the build needs the local base and the CA secret),
    Prometheus the local image, host ports bind 127.0.0.1 only, relative mounts become absolute
    (the file is written elsewhere), Grafana and the builder profile are left out (no image)."""
    compose = yaml.safe_load(source.read_text())
    compose.pop("x-tier", None)
    compose.pop("x-healthcheck", None)
    services = compose["services"]
    dropped = [name for name in ("grafana", "builder") if services.pop(name, None) is not None]
    compose["volumes"] = {k: v for k, v in compose.get("volumes", {}).items() if not k.startswith("grafana")}
    for name, service in services.items():
        if name in TIERS:
            service.pop("build", None)
            service["image"] = image
        if name == "prometheus":
            service["image"] = prometheus_image
            service["depends_on"] = [t for t in service.get("depends_on", []) if t in TIERS]
        service["ports"] = [f"127.0.0.1:{p}" for p in service.get("ports", [])]
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                if str(volume["source"]).startswith("."):
                    volume["source"] = str((source.parent / volume["source"]).resolve())
            else:
                index = service["volumes"].index(volume)
                src, rest = volume.split(":", 1)
                if src.startswith("."):
                    service["volumes"][index] = f"{(source.parent / src).resolve()}:{rest}"
    out.write_text(yaml.safe_dump(compose, sort_keys=False))
    log(f"compose file {out}: {source} with tier image {image}, Prometheus image "
        f"{prometheus_image}, host ports on 127.0.0.1, without {', '.join(dropped)}")


# ---- checks


def podman(*args: str, check: bool = True) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def container_of(project: str, service: str) -> str:
    names = podman("ps", "-a", "--format", "{{.Names}}", "--filter", f"label=io.podman.compose.project={project}",
                   "--filter", f"label=io.podman.compose.service={service}").split()
    if len(names) != 1:
        raise RuntimeError(f"expected one container of {service}, found {names}")
    return names[0]


def health(container: str) -> str:
    # podman 4.3 names it .State.Healthcheck; later versions .State.Health
    state = json.loads(podman("inspect", "--format", "{{json .State}}", container))
    return (state.get("Health") or state.get("Healthcheck") or {}).get("Status", "")


def container_ip(container: str) -> str:
    networks = json.loads(podman("inspect", "--format", "{{json .NetworkSettings.Networks}}", container))
    return ",".join(sorted(n.get("IPAddress", "") for n in networks.values()))


def wait_healthy(containers: dict[str, str], timeout: float) -> float:
    started = time.monotonic()
    while True:
        states = {tier: health(name) for tier, name in containers.items()}
        if all(s == "healthy" for s in states.values()):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            logs = {t: podman("logs", "--tail", "20", n, check=False) for t, n in containers.items()}
            raise RuntimeError(f"not healthy after {timeout:.0f} s: {states}\n{json.dumps(logs, indent=1)}")
        time.sleep(0.5)


def answers_key(answers: list[Any]) -> list[tuple[int, str, int, bool]]:
    return [(a.label_index, a.tier, a.exit_layer, a.degraded) for a in answers]


def check_answers_equal(artifacts: Path, entry: str, texts: list[str]) -> dict[str, Any]:
    """The same texts, through the containers and through the same model served as processes."""
    from shared.client import TierClient
    from shared.tools.processes import running_tiers

    def ask(address: str) -> list[list[Any]]:
        with TierClient(address, timeout=30) as client:
            return [client.classify(texts, thresholds=t) for t in THRESHOLD_SETTINGS]

    in_containers = ask(entry)
    with running_tiers(artifacts) as cluster:
        as_processes = ask(cluster.entry_address)
    max_diff = 0.0
    for setting, got, want in zip(THRESHOLD_SETTINGS, in_containers, as_processes, strict=True):
        if answers_key(got) != answers_key(want):
            raise AssertionError(f"thresholds {setting}: containers {answers_key(got)[:8]} ... "
                                 f"processes {answers_key(want)[:8]} ...")
        if any(a.degraded for a in got):
            raise AssertionError(f"thresholds {setting}: degraded answers from the containers")
        diff = float(np.max(np.abs(np.array([list(a.probabilities) for a in got]) -
                                   np.array([list(a.probabilities) for a in want]))))
        max_diff = max(max_diff, diff)
    if max_diff > 1e-4:
        raise AssertionError(f"probabilities differ by up to {max_diff:.2e}")
    tiers = {setting_name(s): dict(zip(*np.unique([a.tier for a in got], return_counts=True), strict=True))
             for s, got in zip(THRESHOLD_SETTINGS, in_containers, strict=True)}
    return {"texts": len(texts), "threshold_settings": len(THRESHOLD_SETTINGS), "equal": True,
            "max_probability_difference": max_diff,
            "answers_by_tier": {k: {t: int(n) for t, n in v.items()} for k, v in tiers.items()}}


def setting_name(setting: dict[str, float] | None) -> str:
    return "manifest" if setting is None else ",".join(f"{k}={v}" for k, v in setting.items())


def prometheus_get(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 (127.0.0.1 only)
        body = json.loads(reply.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body}")
    return body["data"]


def check_prometheus(base: str, timeout: float, texts_sent: int) -> dict[str, Any]:
    """All three tiers' targets up, and their counters in Prometheus reflect the traffic sent."""
    expected = {f"{tier}:{port}" for tier, port in METRICS_PORTS.items()}
    started = time.monotonic()
    while True:
        try:
            targets = prometheus_get(base, "/api/v1/targets")["activeTargets"]
            states = {t["labels"]["instance"]: t["health"] for t in targets}
            samples = {r["metric"].get("tier", ""): float(r["value"][1]) for r in prometheus_get(
                base, "/api/v1/query", query="sum by (tier) (tierserve_samples_total)")["result"]}
        except (OSError, RuntimeError, KeyError) as exc:
            states, samples = {"error": str(exc)}, {}
        if set(states) == expected and all(h == "up" for h in states.values()) and \
                samples.get("mobile", 0) >= texts_sent:
            return {"targets": states, "samples_total_by_tier": samples,
                    "seconds_to_all_up": round(time.monotonic() - started, 1)}
        if time.monotonic() - started > timeout:
            raise AssertionError(f"Prometheus targets {states}, samples {samples} after {timeout:.0f} s")
        time.sleep(1)


class Traffic(threading.Thread):
    """One text every `interval` s through the mobile tier, thresholds forcing the cloud; records
    (monotonic time, full answer?, degraded reason)."""

    def __init__(self, entry: str, text: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        from shared.client import TierClient

        self.client = TierClient(entry, timeout=2)
        self.text, self.interval = text, interval
        self.records: list[tuple[float, bool, str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                (answer,) = self.client.classify([self.text], thresholds=FORCE_CLOUD)
                full = answer.tier == "cloud" and not answer.degraded
                self.records.append((time.monotonic(), full, answer.degraded_reason))
            except Exception as exc:  # noqa: BLE001 (a failed request is a finding, recorded)
                self.records.append((time.monotonic(), False, f"error: {exc}"))
            self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.client.close()


def check_restart(project: str, entry: str, text: str, down_s: float) -> dict[str, Any]:
    """Stop and start edge under traffic; seconds from edge SERVING to the first full answer."""
    from shared.client import health_status

    edge = container_of(project, "edge")
    edge_address = f"127.0.0.1:{GRPC_PORTS['edge']}"
    ip_before = container_ip(edge)
    traffic = Traffic(entry, text)
    traffic.start()
    try:
        time.sleep(1.0)
        if not any(full for _, full, _ in traffic.records):
            raise AssertionError(f"no full answer before the restart: {traffic.records[-3:]}")
        stop_started = time.monotonic()
        podman("stop", "-t", "15", edge)
        stopped = time.monotonic()
        time.sleep(down_s)
        podman("start", edge)
        started = time.monotonic()
        while health_status(edge_address, timeout=0.5, service=SERVICES["edge"]) != "SERVING":
            if time.monotonic() - started > 60:
                raise AssertionError("edge not SERVING within 60 s of its start")
            time.sleep(0.02)
        serving = time.monotonic()
        while not any(full and t >= serving for t, full, _ in traffic.records):
            if time.monotonic() - serving > 60:
                raise AssertionError(f"no full answer within 60 s of edge SERVING: {traffic.records[-3:]}")
            time.sleep(0.01)
        time.sleep(0.5)
    finally:
        traffic.stop()
    records = traffic.records
    first_full = min(t for t, full, _ in records if full and t >= serving)
    down = [r for r in records if stopped <= r[0] < serving]
    reasons = sorted({re.sub(r"\d+", "N", reason.split(":")[0].split(" (next probe")[0])
                      for _, full, reason in down if not full and reason})
    errors = [r for r in records if r[2].startswith("error")]
    after = [full for t, full, _ in records if t >= first_full]
    return {"edge_ip_before": ip_before, "edge_ip_after": container_ip(edge),
            "stop_seconds": round(stopped - stop_started, 2), "down_seconds": round(down_s, 1),
            "start_to_serving_seconds": round(serving - started, 2),
            "serving_to_full_answers_seconds": round(first_full - serving, 3),
            "requests": len(records), "requests_while_edge_down": len(down),
            "degraded_while_down": sum(1 for r in down if not r[1]),
            "degraded_reasons": reasons, "failed_requests": len(errors),
            "full_after_first_full": f"{sum(after)}/{len(after)}"}


def check(args: argparse.Namespace) -> int:
    from shared.client import TierClient

    report: dict[str, Any] = {}
    containers = {tier: container_of(args.project, tier) for tier in TIERS}
    report["seconds_to_healthy"] = round(wait_healthy(containers, args.timeout), 1)
    log(f"healthy: {containers} ({report['seconds_to_healthy']} s after the check began)")
    entry = f"127.0.0.1:{GRPC_PORTS['mobile']}"
    texts = smoke_texts()
    with TierClient(entry, timeout=30) as client:  # a forwarding tier can be SERVING before its next is
        deadline = time.monotonic() + 60
        while any(a.degraded for a in client.classify(texts[:4], thresholds=FORCE_CLOUD)):
            if time.monotonic() > deadline:
                raise AssertionError("answers still degraded 60 s after all tiers were healthy")
            time.sleep(0.5)
    report["answers"] = check_answers_equal(args.artifacts, entry, texts)
    log(f"answers equal: {json.dumps(report['answers'])}")
    report["prometheus"] = check_prometheus(args.prometheus, args.timeout, len(texts))
    log(f"Prometheus: {json.dumps(report['prometheus'])}")
    report["edge_restart"] = check_restart(args.project, entry, texts[0], args.down_s)
    log(f"edge restart: {json.dumps(report['edge_restart'])}")
    restart = report["edge_restart"]
    if restart["failed_requests"]:
        raise AssertionError(f"{restart['failed_requests']} requests failed during the edge restart")
    if not restart["degraded_while_down"]:
        raise AssertionError("no degraded answer while edge was down: was it stopped?")
    if restart["serving_to_full_answers_seconds"] > args.max_restart_s:
        raise AssertionError(f"full answers {restart['serving_to_full_answers_seconds']} s after edge was "
                             f"SERVING (limit {args.max_restart_s} s)")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def run_pods(prefix: str, workdir: Path, timeout: float) -> dict[str, Any]:
    """The rendered base's pods, emulated as closely as podman allows (see the module's doc)."""
    from shared.client import TierClient, health_status

    rendered = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "k8s" / "base")],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    services = [d for d in docs if d["kind"] == "Service"]
    label = f"io.tierserve.smoke={prefix}"
    network = f"{prefix}-k8s"
    podman("network", "create", "--label", label, network)
    report: dict[str, Any] = {}
    addresses: dict[str, str] = {}
    started_at: dict[str, float] = {}
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        tier = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        user = f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
        # the emptyDir: an empty world-writable (0777) folder. A host folder, bind-mounted: podman
        # gives a named volume the owner and mode of the image's /artifacts (root, 0755)
        volume = workdir / f"{tier}-model"
        volume.mkdir()
        volume.chmod(0o777)
        (init,) = spec["initContainers"]
        (main,) = spec["containers"]
        hardening = ["--no-healthcheck", "--user", user, "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        podman("run", "--rm", "--label", label, "--network", "none", "--read-only", *hardening,
               "-v", f"{volume}:{init['volumeMounts'][0]['mountPath']}", init["image"], *init["command"])
        copied = sorted(f.name for f in volume.iterdir())
        aliases = [s["metadata"]["name"] for s in services
                   if all(labels.get(k) == v for k, v in s["spec"]["selector"].items())]
        env = [f"--env={e['name']}={e['value']}" for e in main["env"]]
        mounts = {m["name"]: m for m in main["volumeMounts"]}
        assert main["securityContext"]["readOnlyRootFilesystem"] and set(mounts) == {"model", "tmp"}
        memory = main["resources"]["limits"]["memory"].replace("Gi", "g").replace("Mi", "m")
        name = f"{prefix}-{tier}"
        podman("run", "-d", "--name", name, "--label", label, "--network", network,
               *[f"--network-alias={a}" for a in aliases], "--read-only",
               "--tmpfs", mounts["tmp"]["mountPath"], *hardening, "--memory", memory,
               "-v", f"{volume}:{mounts['model']['mountPath']}:ro", *env, main["image"], *main["command"])
        addresses[tier] = container_ip(name)
        started_at[tier] = time.monotonic()
        probe = main["readinessProbe"]["grpc"]
        report[tier] = {"model_volume": copied, "aliases": aliases, "user": user, "memory_limit": memory,
                        "probe": f"{probe['port']} {probe.get('service', '')}"}
    started = time.monotonic()
    for tier, info in report.items():
        main = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == tier)
        probe = main["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]
        address = f"{addresses[tier]}:{probe['port']}"
        while health_status(address, timeout=1, service=probe.get("service", "")) != "SERVING":
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{tier} pod not ready: {podman('logs', '--tail', '20', f'{prefix}-{tier}')}")
            time.sleep(0.2)
        info["ready_within_s"] = round(time.monotonic() - started_at[tier], 1)
    with TierClient(f"{addresses['mobile']}:{report['mobile']['probe'].split()[0]}", timeout=30) as client:
        answers = client.classify(smoke_texts(8), thresholds=FORCE_CLOUD)
    if not all(a.tier == "cloud" and not a.degraded for a in answers):
        raise AssertionError(f"pods: answers not full: {[(a.tier, a.degraded_reason) for a in answers]}")
    report["full_answers_through_mobile"] = len(answers)
    return report


def remove_labelled(prefix: str) -> None:
    label = f"label=io.tierserve.smoke={prefix}"
    for kind, listing in (("container", ["ps", "-a", "-q"]), ("volume", ["volume", "ls", "-q"]),
                          ("network", ["network", "ls", "-q"])):
        names = podman(*listing, "--filter", label, check=False).split()
        if names:
            podman(kind, "rm", "-f", *names, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model")
    p.add_argument("out", type=Path)
    p = sub.add_parser("compose")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--image", required=True)
    p.add_argument("--prometheus-image", required=True)
    p = sub.add_parser("check")
    p.add_argument("--project", required=True)
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--down-s", type=float, default=2.0)
    p.add_argument("--max-restart-s", type=float, default=2.0)
    p.add_argument("--report", type=Path)
    p = sub.add_parser("pods")
    p.add_argument("--prefix", required=True)
    p.add_argument("--workdir", type=Path, required=True, help="an empty folder for the pods' volumes")
    p.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv)
    if args.command == "model":
        make_model(args.out)
        return 0
    if args.command == "compose":
        derive_compose(args.source, args.out, args.image, args.prometheus_image)
        return 0
    if args.command == "pods":
        try:
            report = run_pods(args.prefix, args.workdir, args.timeout)
            log(f"k8s base as podman containers: {json.dumps(report)}")
        finally:
            remove_labelled(args.prefix)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
