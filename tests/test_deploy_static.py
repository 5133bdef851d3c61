"""deploy/ checked without a Docker engine: the compose file against the Compose Specification
schema, the files the Dockerfile and the compose file refer to, the wiring between compose,
the tiers' settings, Prometheus and Grafana, the dashboard's PromQL against the metrics the
tiers export, and the gRPC health probe the healthchecks run."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from concurrent import futures
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.serving.metrics import SPECS, metric_names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tierserve.json"
TIERS = ("mobile", "edge", "cloud")
# series Prometheus itself adds to every scrape, and the target labels it attaches
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"job", "instance"}
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "vector", "scalar", "clamp_min", "clamp_max", "bool", "offset", "topk", "bottomk",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


# ---- the Compose Specification schema


def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((DEPLOY / "schema" / "compose-spec.json").read_text())
    # the vendored schema names its draft as http://...# ; jsonschema knows the https id
    draft = schema.get("$schema", "").replace("http://", "https://").rstrip("#")
    cls = jsonschema.validators.validator_for({"$schema": draft})
    cls.check_schema(schema)
    return cls(schema)


def test_compose_file_matches_compose_spec_schema(compose: dict[str, Any]) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in compose_validator().iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_schema_rejects_what_compose_rejects(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["mobile"]["depends_on"]["edge"]["condition"] = "service_ready"
    broken["services"]["edge"]["helthcheck"] = broken["services"]["edge"].pop("healthcheck")
    assert len(list(compose_validator().iter_errors(broken))) >= 2


# ---- the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            current = []
            stages[rest.split()[-1] if " AS " in rest.upper() else rest] = current
        current.append((word, rest))
    return stages


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    path = path.rstrip("/")
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch(p, pat) or fnmatch(p, pat.removeprefix("**/")) or
               fnmatch(parts[i], pat.removeprefix("**/"))
               for pat in patterns for i, p in enumerate(prefixes))


def copy_sources() -> list[str]:
    sources = []
    for word, rest in dockerfile_instructions():
        if word in ("COPY", "ADD"):
            args = [a for a in rest.split() if not a.startswith("--")]
            if "--from=" not in rest:
                sources += args[:-1]
    return sources


def test_dockerfile_copies_only_paths_that_exist_in_the_context() -> None:
    sources = copy_sources()
    assert "pyproject.toml" in sources and "deploy/healthcheck.py" in sources
    patterns = dockerignore_patterns()
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert not ignored(src, patterns), f"Dockerfile copies {src}, which .dockerignore drops"


def test_dockerignore_keeps_bulky_and_generated_paths_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv", ".git", "artifacts/default/mobile.onnx", "shared/wire/gen",
                 "shared/__pycache__", ".pytest_cache"):
        assert ignored(path, patterns), path
    assert not ignored("shared/serving/metrics.py", patterns)


def test_dockerfile_stages() -> None:
    stages = dockerfile_stages()
    assert {"builder", "serve"} <= set(stages)
    assert list(stages)[-1] == "serve", "a plain `docker build` must give the serving image"
    serve = stages["serve"]
    users = [rest for word, rest in serve if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the serving image runs as a non-root user"
    assert any(word == "HEALTHCHECK" and "healthcheck.py" in rest for word, rest in serve)
    chain = {name: instrs[0][1].split()[0] for name, instrs in stages.items()}
    serve_text = " ".join(rest for name in ("serve", "deps", "wheel") for _, rest in stages[name])
    assert chain["serve"] == "deps" and "torch" not in serve_text, "no torch in the serving image"
    assert "torch" in " ".join(rest for _, rest in stages["builder"])
    assert "python -m shared.wire.stubs" in serve_text, "stubs are generated at build time"
    assert (ROOT / "shared" / "wire" / "stubs.py").is_file()


# ---- the compose file's wiring


def env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as compose passes it when the host sets none of the variables:
    `${NAME:-default}` is its default."""
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in service["environment"].items()}


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_compose_refers_to_files_that_exist(compose: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    built = {name: s["build"] for name, s in compose["services"].items() if "build" in s}
    assert {name: b["target"] for name, b in built.items()} == {
        "cloud": "serve", "edge": "serve", "mobile": "serve", "builder": "builder"}
    for build in built.values():
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("./"):  # files of deploy/ (../artifacts is an output)
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"


def test_tiers_start_in_order_with_grpc_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["mobile"]["depends_on"] == {"edge": {"condition": "service_healthy"}}
    assert services["edge"]["depends_on"] == {"cloud": {"condition": "service_healthy"}}
    assert "depends_on" not in services["cloud"]
    for name in TIERS:
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[-2] == probe_in_image(), test
        listen = env(services[name])[f"TIERSERVE_{name.upper()}_LISTEN"]
        assert port_of(test[-1]) == port_of(listen)
        volume = services[name]["volumes"][0]
        assert volume["target"] == "/artifacts" and volume["read_only"] is True
        assert env(services[name])[f"TIERSERVE_{name.upper()}_ARTIFACTS"] == "/artifacts"


def probe_in_image() -> str:
    (destination,) = [rest.split()[-1] for word, rest in dockerfile_stages()["serve"]
                      if word == "COPY" and "deploy/healthcheck.py" in rest]
    return destination


def test_tier_environment_matches_the_settings_classes(compose: dict[str, Any]) -> None:
    config = pytest.importorskip("shared.serving.settings", reason="shared/serving/settings.py not written yet")
    expected = {"mobile": (50051, 9101, "edge"), "edge": (50052, 9102, "cloud"),
                "cloud": (50053, 9103, None)}
    for name in TIERS:
        service = compose["services"][name]
        cls = config.SETTINGS_BY_TIER[name]
        prefix = cls.model_config["env_prefix"]
        fields = {key.removeprefix(prefix).lower(): value for key, value in env(service).items()}
        unknown = set(fields) - set(cls.model_fields)
        assert not unknown, f"{name}: {sorted(unknown)} are no fields of {cls.__name__}"
        settings = cls(**fields)
        grpc_port, metrics_port, next_tier = expected[name]
        assert port_of(settings.listen) == grpc_port
        assert settings.listen.startswith("0.0.0.0:") and settings.metrics_addr == "0.0.0.0"
        assert settings.metrics_port == metrics_port
        published = {f"{grpc_port}:{grpc_port}", f"{metrics_port}:{metrics_port}"}
        assert published <= set(service["ports"])
        if next_tier:
            assert settings.next == f"{next_tier}:{expected[next_tier][0]}"
        assert service["command"][:2] == ["python", "-m"]
        module = service["command"][2]
        assert module == f"{name}_node" and (ROOT / module / "__main__.py").is_file()


def test_prometheus_scrapes_each_tier_metrics_port(compose: dict[str, Any]) -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    expected = {f"{name}:{env(compose['services'][name])[f'TIERSERVE_{name.upper()}_METRICS_PORT']}"
                for name in TIERS}
    assert targets == expected
    assert [job["job_name"] for job in config["scrape_configs"]] == ["tierserve"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(
        compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090" and "9090:9090" in compose["services"][
        "prometheus"]["ports"]
    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/tierserve.yml")
    (provider,) = providers["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in panels(dashboard) if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in panels(dashboard) for t in p.get("targets", [])}
    assert uids == {source["uid"]}


# ---- the dashboard's PromQL


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) that a PromQL expression uses."""
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables ($__rate_interval, ...)
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {w.strip() for w in grouping.split(",") if w.strip()}
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    words = set(re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", bare)) - PROMQL_WORDS
    return words, labels


def label_names(series: str) -> set[str]:
    for spec in SPECS:
        if series in spec.series():
            return set(spec.labels) | ({"le"} if series.endswith("_bucket") else set())
    return set()


def unknown_names(expr: str) -> list[str]:
    metrics, labels = promql_names(expr)
    problems = sorted(metrics - metric_names() - PROMETHEUS_SERIES)
    known_labels = TARGET_LABELS.union(*(label_names(m) for m in metrics))
    problems += [f"label {label}" for label in sorted(labels - known_labels)]
    return problems


def test_dashboard_promql_uses_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for expr in exprs:
        assert promql_names(expr)[0], f"no metric in {expr}"
        assert not unknown_names(expr), f"{unknown_names(expr)} in {expr}"


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set().union(*(promql_names(e)[0] for e in dashboard_exprs()))
    for series in ("tierserve_request_duration_seconds_bucket", "tierserve_exits_total",
                   "tierserve_forwarded_samples_total", "tierserve_samples_total",
                   "tierserve_forwarded_bytes_total", "tierserve_exit_confidence_bucket",
                   "tierserve_errors_total", "tierserve_inflight_requests",
                   "tierserve_batch_size_bucket"):
        assert series in used, series
    quantiles = [e for e in dashboard_exprs() if "tierserve_request_duration_seconds_bucket" in e]
    assert all(any(f"histogram_quantile({q}," in e for e in quantiles) for q in (0.5, 0.95, 0.99))


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_a_renamed_metric_or_label_is_caught() -> None:
    good = 'sum by (tier) (rate(tierserve_exits_total{tier="edge"}[$__rate_interval]))'
    assert unknown_names(good) == []
    assert "tierserve_exit_total" in unknown_names(good.replace("exits_total", "exit_total"))
    assert unknown_names(good.replace("by (tier)", "by (node)")) == ["label node"]
    unsuffixed = "histogram_quantile(0.9, sum by (le) (rate(tierserve_batch_size[5m])))"
    assert "tierserve_batch_size" in unknown_names(unsuffixed)


def test_metric_names_include_labelled_series_without_samples() -> None:
    names = metric_names()
    assert {"tierserve_errors_total", "tierserve_degraded_total",
            "tierserve_forwarded_bytes_total", "tierserve_request_duration_seconds_bucket",
            "tierserve_inflight_requests"} <= names
    assert not {n for n in names if n.endswith("_created")}


def test_degraded_reasons_are_exported_as_zero_from_the_start_at_forwarding_tiers() -> None:
    from prometheus_client import generate_latest

    from shared.serving.metrics import DEGRADED_REASONS, TierMetrics
    from shared.serving.next_tier import HOP_FAILURES, OTHER_FAILURE

    # every reason the tiers can give (next_tier's failure kinds, circuit_open, overloaded_early) is listed
    assert {f.kind for f in [*HOP_FAILURES.values(), OTHER_FAILURE]} | {"circuit_open", "overloaded_early"} \
        == set(DEGRADED_REASONS)
    for tier in ("mobile", "edge", "cloud"):
        text = generate_latest(TierMetrics(tier).registry).decode()
        series = [line for line in text.splitlines() if line.startswith("tierserve_degraded_total{")]
        expected = [] if tier == "cloud" else DEGRADED_REASONS  # the last tier has no next tier to fail
        assert sorted(series) == sorted(f'tierserve_degraded_total{{reason="{r}",tier="{tier}"}} 0.0'
                                        for r in expected), series


def test_the_readme_lists_every_metric_and_degraded_reason() -> None:
    from shared.serving.metrics import DEGRADED_REASONS, metrics_table

    readme = (ROOT / "README.md").read_text()
    assert metrics_table() in readme, "regenerate the README's metrics table from metrics_table()"
    assert all(f"`{reason}`" in readme for reason in DEGRADED_REASONS)


# ---- the gRPC health probe the healthchecks run


def load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_health_probe_follows_the_serving_status() -> None:
    probe = load_probe()
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe.main([address]) == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe.main([address]) == 1
    finally:
        server.stop(None)
    assert probe.main([address]) == 1  # nothing listens any more


def test_health_probe_finds_the_port_of_the_tier_the_container_runs() -> None:
    probe = load_probe()
    image_env = dockerfile_env()
    assert probe.default_address(image_env, ["python", "-m", "edge_node"]) == "127.0.0.1:50052"
    assert probe.default_address(image_env, ["python", "-m", "cloud_node"]) == "127.0.0.1:50053"
    assert probe.default_address(image_env, ["/usr/local/bin/python", "/usr/local/bin/tierserve", "serve",
                                             "edge"]) == "127.0.0.1:50052"
    assert probe.default_address(image_env, ["python", "-m", "mobile_node", "--listen",
                                             "0.0.0.0:6000"]) == "127.0.0.1:6000"
    assert probe.default_address({"TIERSERVE_EDGE_LISTEN": "0.0.0.0:7"}, []) == "127.0.0.1:7"
    assert probe.default_address({"TIERSERVE_HEALTH_ADDRESS": "h:1"}, ["edge_node"]) == "h:1"
    assert probe.default_address({}, []) == "127.0.0.1:50051"


def dockerfile_env() -> dict[str, str]:
    pairs = [kv for word, rest in dockerfile_stages()["serve"] if word == "ENV"
             for kv in rest.split()]
    return dict(kv.split("=", 1) for kv in pairs)


def test_image_defaults_are_valid_settings() -> None:
    config = pytest.importorskip("shared.serving.settings", reason="shared/serving/settings.py not written yet")
    image_env = dockerfile_env()
    for name in TIERS:
        cls = config.SETTINGS_BY_TIER[name]
        prefix = cls.model_config["env_prefix"]
        mine = {k.removeprefix(prefix).lower(): v for k, v in image_env.items()
                if k.startswith(prefix)}
        assert set(mine) <= set(cls.model_fields), f"{name}: {sorted(mine)}"
        settings = cls(**mine)
        assert settings.listen.startswith("0.0.0.0:") and str(settings.artifacts) == "/artifacts"


def test_health_probe_speaks_mutual_tls(tmp_path: Path) -> None:
    """With TLS the kubelet's gRPC probes cannot be used (plaintext only): deploy/k8s's mTLS
    component runs this probe with the TIERSERVE_HEALTH_TLS_* variables instead."""
    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    probe = load_probe()
    servicer = health.HealthServicer()
    servicer.set("tierserve.v1.Continuation", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        mutual = {"TIERSERVE_HEALTH_TLS_CA": str(pki.ca), "TIERSERVE_HEALTH_TLS_CERT": str(pki.client.cert),
                  "TIERSERVE_HEALTH_TLS_KEY": str(pki.client.key)}
        for host in ("127.0.0.1", "localhost"):
            assert probe.check(f"{host}:{port}", "tierserve.v1.Continuation", env=mutual)
        assert probe.check(f"127.0.0.1:{port}", "", env={**mutual, "TIERSERVE_HEALTH_TLS_SERVER_NAME": "localhost"})
        assert not probe.check(f"127.0.0.1:{port}", "", env={"TIERSERVE_HEALTH_TLS_CA": str(pki.ca)}), \
            "no client certificate: the server refuses the handshake"
        assert not probe.check(f"127.0.0.1:{port}", "", env={}), "plaintext to a TLS port"
    finally:
        server.stop(None)


def test_ci_scripts_are_executable_valid_bash() -> None:
    scripts = sorted((DEPLOY / "ci").glob("*.sh"))
    assert {s.name for s in scripts} >= {"install-prometheus.sh", "install-engine.sh", "base-images.sh", "smoke.sh"}
    for script in scripts:
        assert script.stat().st_mode & 0o111, f"{script.name} must be executable"
        subprocess.run(["bash", "-n", str(script)], check=True)
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "deploy/ci/smoke.sh" in ci_run and "make test" in ci_run


def load_smoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location("smoke", DEPLOY / "ci" / "smoke.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_test_runs_the_compose_file_with_only_the_machine_specific_changes(
        compose: dict[str, Any], tmp_path: Path) -> None:
    """The container smoke test runs a copy of deploy/docker-compose.yml: images made locally (no
    registry), host ports on 127.0.0.1, no Grafana (no image); everything else as users get it."""
    out = tmp_path / "compose.yml"
    load_smoke().derive_compose(COMPOSE, out, "localhost/tierserve:latest", "localhost/prom:ci")
    derived = load_yaml(out)
    assert set(derived["services"]) == {"cloud", "edge", "mobile", "prometheus"}
    assert not list(compose_validator().iter_errors(derived))
    for name, service in derived["services"].items():
        original = compose["services"][name]
        assert service["ports"] == [f"127.0.0.1:{p}" for p in original["ports"]]
        assert service["image"] == ("localhost/prom:ci" if name == "prometheus" else "localhost/tierserve:latest")
        same = set(original) - {"build", "image", "ports", "volumes", "depends_on"}
        assert {k: service[k] for k in same} == {k: original[k] for k in same}, name
        assert len(service["volumes"]) == len(original["volumes"])
        if name in TIERS:
            assert service.get("depends_on") == original.get("depends_on")
            assert service["volumes"] == original["volumes"]  # ${TIERSERVE_ARTIFACTS:-...}, set by smoke.sh
    (config,) = [v for v in derived["services"]["prometheus"]["volumes"] if "prometheus.yml" in v]
    assert Path(config.split(":")[0]) == DEPLOY / "prometheus" / "prometheus.yml"
