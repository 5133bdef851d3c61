"""deploy/k8s checked without a cluster: every kustomization rendered (`kubectl kustomize`, offline),
every object validated against the Kubernetes OpenAPI schemas (PyPI kubernetes-validate, strict:
unknown fields are errors), and the wiring: each tier's --next names a Service that exists and
selects the next tier's pods on the right port, probe and Service ports are container ports, the
environment is valid settings, the model volume holds what each tier loads (the tiers are started
from exactly those files), graceful termination outlasts the drain, and the NetworkPolicies allow
only clients -> mobile -> edge -> cloud and Prometheus scrapes."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
TIERS = ("mobile", "edge", "cloud")
NEXT_TIER = {"mobile": "edge", "edge": "cloud"}
SERVICE_NAMES = {"mobile": "tierserve.v1.Classifier", "edge": "tierserve.v1.Continuation",
                 "cloud": "tierserve.v1.Continuation"}
SITES = K8S / "overlays" / "three-sites"
# every kustomization a user applies, and the all-sites view
RENDERS = {"base": K8S / "base", "three-sites": SITES,
           **{f"three-sites/{tier}": SITES / tier for tier in TIERS}}
# the oldest Kubernetes still commonly run, and the newest the schemas know
KUBERNETES_VERSIONS = ("1.29.0", "latest")
EXTERNAL_NAME = "external-dns.alpha.kubernetes.io/hostname"


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    return path


def render(folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(folder) for name, folder in RENDERS.items()}


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def tier_of(deployment: dict[str, Any]) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment).get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- rendering and schemas


def test_every_kustomization_renders_the_expected_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base = rendered["base"]
    assert set(of_kind(base, "Deployment")) == set(TIERS)
    assert set(of_kind(base, "PodDisruptionBudget")) == set(TIERS)
    assert set(of_kind(base, "HorizontalPodAutoscaler")) == {"edge", "cloud"}
    assert set(of_kind(base, "NetworkPolicy")) == set(TIERS)
    assert set(of_kind(base, "Service")) == {"mobile", "edge-headless", "cloud-headless"}
    for tier in TIERS:
        (deployment,) = of_kind(rendered[f"three-sites/{tier}"], "Deployment").values()
        assert tier_of(deployment) == tier, "each site runs one tier"
    assert len(rendered["three-sites"]) == sum(len(rendered[f"three-sites/{t}"]) for t in TIERS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(
        rendered: dict[str, list[dict[str, Any]]], version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    errors = []
    for name, docs in rendered.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at "
                              f"{'/'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)


def test_validation_catches_a_broken_object(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = yaml.safe_load(yaml.safe_dump(of_kind(rendered["base"], "Deployment")["edge"]))
    container(deployment)["readinessProbe"]["grpc"]["port"] = "grpc"  # grpc probes take a number only
    container(deployment)["livenesProbe"] = container(deployment)["livenessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


# ---- wiring


def next_address(deployment: dict[str, Any]) -> str | None:
    return env(deployment).get(f"TIERSERVE_{tier_of(deployment).upper()}_NEXT")


def test_every_next_names_a_service_of_the_next_tier(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """In one cluster: the next tier's headless Service by name. Across sites: the LoadBalancer
    Service of the next site that publishes that DNS name."""
    for name in ("base", "three-sites"):
        docs = rendered[name]
        services = of_kind(docs, "Service")
        by_hostname = {s["metadata"].get("annotations", {}).get(EXTERNAL_NAME): s for s in services.values()}
        for deployment in of_kind(docs, "Deployment").values():
            tier = tier_of(deployment)
            address = next_address(deployment)
            if tier not in NEXT_TIER:
                assert address is None, f"{name}: cloud has no next tier"
                continue
            assert address, f"{name}: {tier} has no TIERSERVE_{tier.upper()}_NEXT"
            host, port = address.rsplit(":", 1)
            service = services.get(host) if name == "base" else by_hostname.get(host)
            assert service is not None, f"{name}: {tier}'s next {address} names no Service"
            if name == "base":
                assert service["spec"].get("clusterIP") == "None", "the tier in front balances over pod addresses"
            else:
                assert service["spec"]["type"] == "LoadBalancer"
            (target,) = [d for d in of_kind(docs, "Deployment").values() if tier_of(d) == NEXT_TIER[tier]]
            labels = target["spec"]["template"]["metadata"]["labels"]
            assert selects(service["spec"]["selector"], labels), f"{service['metadata']['name']} selects no {tier}"
            (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
            assert grpc_port["port"] == int(port)
            assert grpc_port["targetPort"] in {p["name"] for p in container(target)["ports"]}
            listen = env(target)[f"TIERSERVE_{NEXT_TIER[tier].upper()}_LISTEN"]
            assert int(listen.rsplit(":", 1)[1]) == container_port(target, "grpc") == int(port)


def container_port(deployment: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container(deployment)["ports"] if p["name"] == name]
    return int(port)


def probe_port(probe: dict[str, Any]) -> tuple[int, str]:
    if "grpc" in probe:
        return int(probe["grpc"]["port"]), probe["grpc"].get("service", "")
    command = probe["exec"]["command"]
    assert command[:2] == ["python", "/usr/local/lib/tierserve/healthcheck.py"], command
    return int(command[2].rsplit(":", 1)[1]), (command[3] if len(command) > 3 else "")


def test_probe_ports_equal_container_ports(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        for deployment in of_kind(docs, "Deployment").values():
            tier, main = tier_of(deployment), container(deployment)
            grpc_port = container_port(deployment, "grpc")
            assert int(env(deployment)[f"TIERSERVE_{tier.upper()}_LISTEN"].rsplit(":", 1)[1]) == grpc_port
            assert env(deployment)[f"TIERSERVE_{tier.upper()}_LISTEN"].startswith("0.0.0.0:")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                port, service = probe_port(main[kind])
                assert port == grpc_port, f"{name}: {tier} {kind} probes {port}, listens on {grpc_port}"
                # ready: the tier's own service; alive/started: the server as a whole
                assert service == (SERVICE_NAMES[tier] if kind == "readinessProbe" else ""), (name, tier, kind)
            tls = f"TIERSERVE_{tier.upper()}_TLS_CERT" in env(deployment)
            assert all(("exec" if tls else "grpc") in main[k] for k in ("readinessProbe", "livenessProbe")), \
                f"{name}: {tier}: the kubelet's gRPC probes are plaintext; a TLS tier needs the exec probe"
            metrics = container_port(deployment, "metrics")
            assert int(env(deployment)[f"TIERSERVE_{tier.upper()}_METRICS_PORT"]) == metrics
            assert env(deployment)[f"TIERSERVE_{tier.upper()}_METRICS_ADDR"] == "0.0.0.0"
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert int(annotations["prometheus.io/port"]) == metrics
        for service in of_kind(docs, "Service").values():
            pods = [d for d in of_kind(docs, "Deployment").values()
                    if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
            assert len(pods) == 1, f"{name}: Service {service['metadata']['name']} selects {len(pods)} tiers"
            names = {p["name"]: p["containerPort"] for p in container(pods[0])["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names and names[port["targetPort"]] == port["port"], port


def test_tier_environment_is_valid_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from shared.serving.settings import SETTINGS_BY_TIER

    for name, docs in rendered.items():
        for deployment in of_kind(docs, "Deployment").values():
            tier = tier_of(deployment)
            cls = SETTINGS_BY_TIER[tier]
            prefix = cls.model_config["env_prefix"]
            mine = {k.removeprefix(prefix).lower(): v for k, v in env(deployment).items() if k.startswith(prefix)}
            unknown = set(mine) - set(cls.model_fields)
            assert not unknown, f"{name}: {tier}: {sorted(unknown)} are no settings"
            cls(**mine)
            assert container(deployment)["command"] == ["python", "-m", f"{tier}_node"]


def model_copy(deployment: dict[str, Any], model: Path) -> tuple[list[str], str]:
    """(files the init container copies, the volume it copies them into): its command run here, with the
    model image's /model read from `model` and the volume's mount path written to a temporary folder."""
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert init["image"].rsplit("/", 1)[-1].startswith("tierserve-model"), init
    (mount,) = init["volumeMounts"]
    target = mount["mountPath"].rstrip("/")
    with tempfile.TemporaryDirectory(prefix="tierserve-k8s-init-") as tmp:
        paths = {"/model": str(model), target: tmp}
        command = [re.sub(r"(?<![\w/])(/model|" + re.escape(target) + r")(?=/)", lambda m: paths[m.group(1)], arg)
                   for arg in init["command"]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{init['command']}: {done.stderr}"
        return sorted(path.name for path in Path(tmp).iterdir()), mount["name"]


@pytest.fixture(scope="module")
def model_files(rendered: dict[str, list[dict[str, Any]]], tiny_artifacts: Path) -> dict[str, list[str]]:
    """What each tier's init container copies from a text model, the same in every rendering."""
    found: dict[str, list[str]] = {}
    for name, docs in rendered.items():
        for deployment in of_kind(docs, "Deployment").values():
            tier = tier_of(deployment)
            files, volume = model_copy(deployment, tiny_artifacts)
            assert found.setdefault(tier, files) == files, name
            mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
            assert mounts[volume]["mountPath"] == env(deployment)[f"TIERSERVE_{tier.upper()}_ARTIFACTS"]
            assert mounts[volume].get("readOnly") is True
            volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
            assert "emptyDir" in volumes[volume]
    return found


def test_an_image_model_without_a_tokenizer_is_copied_too(rendered: dict[str, list[dict[str, Any]]],
                                                          tiny_artifacts: Path, tmp_path: Path) -> None:
    for name in ("manifest.json", "mobile.onnx"):  # what an image model's mobile tier loads: no tokenizer.json
        shutil.copy(tiny_artifacts / name, tmp_path / name)
    (mobile,) = [d for d in of_kind(rendered["base"], "Deployment").values() if tier_of(d) == "mobile"]
    assert model_copy(mobile, tmp_path)[0] == ["manifest.json", "mobile.onnx"]


def test_each_tier_gets_only_its_slice_and_the_manifest(model_files: dict[str, list[str]],
                                                        tiny_artifacts: Path) -> None:
    from shared.contract.manifest import load_manifest

    manifest = load_manifest(tiny_artifacts)
    for tier, files in model_files.items():
        (spec,) = [s for s in manifest.slices if s.tier == tier]
        expected = {"manifest.json", spec.file} | ({manifest.tokenizer_file} if tier == "mobile" else set())
        assert set(files) == expected, f"{tier} copies {files}, loads {sorted(expected)}"


@pytest.fixture
def per_tier_folders(model_files: dict[str, list[str]], tiny_artifacts: Path) -> Iterator[dict[str, Path]]:
    with tempfile.TemporaryDirectory(prefix="tierserve-k8s-model-") as tmp:
        folders = {}
        for tier, files in model_files.items():
            folders[tier] = Path(tmp) / tier
            folders[tier].mkdir()
            for name in files:
                shutil.copy(tiny_artifacts / name, folders[tier] / name)
        yield folders


def test_each_tier_serves_from_exactly_what_its_model_volume_holds(per_tier_folders: dict[str, Path]) -> None:
    from shared.client import TierClient
    from shared.tools.processes import start_tier, wait_until_serving

    started = []
    with tempfile.TemporaryDirectory(prefix="tierserve-k8s-logs-") as logs:
        try:
            next_address = None
            for tier in reversed(TIERS):
                started.append(start_tier(tier, per_tier_folders[tier], Path(logs), next_address))
                next_address = started[-1].address
            wait_until_serving(started, timeout=60)
            with TierClient(started[-1].address, timeout=30) as client:
                (answer,) = client.classify(["a good film"], thresholds={"mobile": 1.01, "edge": 1.01})
            assert answer.tier == "cloud" and not answer.degraded, answer
        finally:
            for process in started:
                process.stop()


def test_termination_outlasts_the_drain(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from shared.serving.settings import SETTINGS_BY_TIER

    for name, docs in rendered.items():
        for deployment in of_kind(docs, "Deployment").values():
            tier = tier_of(deployment)
            prefix = SETTINGS_BY_TIER[tier].model_config["env_prefix"]
            fields = SETTINGS_BY_TIER[tier].model_fields
            grace = float(env(deployment).get(f"{prefix}GRACE_SECONDS", fields["grace_seconds"].default))
            age_grace = float(env(deployment).get(f"{prefix}MAX_CONNECTION_AGE_GRACE_S",
                                                  fields["max_connection_age_grace_s"].default))
            pre_stop = container(deployment).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
            # the pause that lets endpoint removal reach kube-proxy and the callers before the tier drains
            assert pre_stop is not None and pre_stop[0] == "sleep", f"{name}: {tier}: {pre_stop}"
            pause = float(pre_stop[1])
            period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert period > pause + grace + age_grace, \
                f"{name}: {tier}: {period} s to stop, preStop {pause} + drain {grace} + {age_grace} s"


def test_images_have_a_tag_the_kubelet_does_not_pull_again(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """`:latest` (or no tag) makes the kubelet pull always: an image loaded onto the node could never run."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, docs in rendered.items():
        for deployment in of_kind(docs, "Deployment").values():
            spec = deployment["spec"]["template"]["spec"]
            for c in [*spec["containers"], *spec["initContainers"]]:
                repository, _, tag = c["image"].rpartition(":")
                assert repository and "/" not in tag and tag != "latest", f"{name}: {c['name']}: {c['image']}"
                if repository.rsplit("/", 1)[-1] == "tierserve":
                    assert tag == version, f"{name}: {c['image']}: the serving image is tagged with the version"


def test_replicas_are_kept_available_and_scaled(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        deployments = of_kind(docs, "Deployment")
        scaled = {a["spec"]["scaleTargetRef"]["name"]: a["spec"]["minReplicas"]
                  for a in of_kind(docs, "HorizontalPodAutoscaler").values()}
        for deployment_name, deployment in deployments.items():
            # an autoscaled Deployment leaves its count to the autoscaler: a fixed one is reset at every apply
            assert ("replicas" in deployment["spec"]) != (deployment_name in scaled), f"{name}: {deployment_name}"
            least = scaled.get(deployment_name) or deployment["spec"]["replicas"]
            assert least >= 2, "one replica cannot be drained without downtime"
            assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
            for c in [container(deployment), *deployment["spec"]["template"]["spec"]["initContainers"]]:
                resources = c["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]) and \
                    {"cpu", "memory"} <= set(resources["limits"]), f"{name}: {c['name']}"
                assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        for budget in of_kind(docs, "PodDisruptionBudget").values():
            matched = [d for d in deployments.values() if selects(
                budget["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])]
            assert len(matched) == 1
            least = scaled.get(matched[0]["metadata"]["name"]) or matched[0]["spec"]["replicas"]
            assert budget["spec"]["minAvailable"] < least
        assert {tier_of(d) for d in deployments.values() if tier_of(d) != "mobile"} == {
            a["spec"]["scaleTargetRef"]["name"] for a in of_kind(docs, "HorizontalPodAutoscaler").values()}
        for scaler in of_kind(docs, "HorizontalPodAutoscaler").values():
            assert scaler["spec"]["scaleTargetRef"]["name"] in deployments
            assert scaler["spec"]["minReplicas"] >= 2


def test_network_policies_allow_only_the_chain_and_scrapes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    policies = of_kind(docs, "NetworkPolicy")
    deployments = {tier_of(d): d for d in of_kind(docs, "Deployment").values()}
    for tier in TIERS:
        policy = policies[tier]
        assert selects(policy["spec"]["podSelector"]["matchLabels"],
                       deployments[tier]["spec"]["template"]["metadata"]["labels"])
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        grpc_rule, metrics_rule = policy["spec"]["ingress"]
        assert [p["port"] for p in grpc_rule["ports"]] == [container_port(deployments[tier], "grpc")]
        caller = {"edge": "mobile", "cloud": "edge"}.get(tier)
        if caller:
            (source,) = grpc_rule["from"]
            assert source["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == caller
        else:
            assert "from" not in grpc_rule, "clients reach mobile from anywhere"
        assert [p["port"] for p in metrics_rule["ports"]] == [container_port(deployments[tier], "metrics")]
        assert "namespaceSelector" in metrics_rule["from"][0]
        egress = policy["spec"]["egress"]
        to_next = [r for r in egress if "to" in r]
        if tier in NEXT_TIER:
            (rule,) = to_next
            assert rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == NEXT_TIER[tier]
            assert [p["port"] for p in rule["ports"]] == [container_port(deployments[NEXT_TIER[tier]], "grpc")]
        else:
            assert not to_next, "cloud calls nothing"
        assert all({p["port"] for p in r["ports"]} == {53} for r in egress if "to" not in r), "only DNS besides"
    sites = rendered["three-sites"]
    for policy in of_kind(sites, "NetworkPolicy").values():
        rules = policy["spec"]["ingress"][0].get("from", []) + [
            t for r in policy["spec"]["egress"] for t in r.get("to", [])]
        assert all("ipBlock" in r for r in rules), f"across sites the peers are addresses: {policy}"


def test_mtls_component_mounts_the_secret_on_every_tier(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for deployment in of_kind(rendered["three-sites"], "Deployment").values():
        tier = tier_of(deployment)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "tierserve-tls"
        mounted = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
        values = env(deployment)
        paths = [v for k, v in values.items() if "_TLS_" in k]
        assert paths and all(p.startswith(mounted["tls"] + "/") for p in paths)
        if tier in NEXT_TIER:
            assert f"TIERSERVE_{tier.upper()}_NEXT_TLS_CERT" in values
        if tier != "mobile":
            assert f"TIERSERVE_{tier.upper()}_TLS_CLIENT_CA" in values
            assert values["TIERSERVE_HEALTH_TLS_CA"] == values[f"TIERSERVE_{tier.upper()}_TLS_CLIENT_CA"]


def test_model_image_dockerfile_builds_from_the_serving_image(rendered: dict[str, list[dict[str, Any]]]) -> None:
    text = (K8S / "model.Dockerfile").read_text()
    serving = {c["image"] for d in of_kind(rendered["base"], "Deployment").values()
               for c in d["spec"]["template"]["spec"]["containers"]}
    assert len(serving) == 1  # by default the model image sits on the serving image the base names
    assert "FROM ${BASE}" in text and f"ARG BASE={serving.pop()}" in text and "COPY . /model/" in text
