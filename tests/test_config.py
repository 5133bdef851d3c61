"""Node settings: defaults that run locally, environment with a prefix, flags over both."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from shared.errors import TierServeError
from shared.serving.server import run_event_loop
from shared.serving.settings import CloudSettings, EdgeSettings, MobileSettings, parse_settings


def test_local_defaults_chain_mobile_to_edge_to_cloud(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MOBILE", "EDGE", "CLOUD"):
        for field in ("LISTEN", "NEXT", "METRICS_PORT", "ARTIFACTS"):
            monkeypatch.delenv(f"TIERSERVE_{name}_{field}", raising=False)
    mobile, edge, cloud = MobileSettings(), EdgeSettings(), CloudSettings()
    assert (mobile.listen, mobile.next) == ("127.0.0.1:50051", "127.0.0.1:50052")
    assert (edge.listen, edge.next) == ("127.0.0.1:50052", "127.0.0.1:50053")
    assert cloud.listen == "127.0.0.1:50053" and not hasattr(cloud, "next")
    assert (mobile.metrics_port, edge.metrics_port, cloud.metrics_port) == (9101, 9102, 9103)
    assert mobile.artifacts == Path("artifacts/default")


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERSERVE_EDGE_THRESHOLD", "0.7")
    monkeypatch.setenv("TIERSERVE_EDGE_HOP_TIMEOUT", "2.5")
    monkeypatch.setenv("TIERSERVE_MOBILE_THRESHOLD", "0.1")  # another tier's prefix: ignored
    edge = parse_settings("edge", ["--listen", "127.0.0.1:0", "--threshold", "0.9"])
    assert isinstance(edge, EdgeSettings)
    assert (edge.listen, edge.threshold, edge.hop_timeout) == ("127.0.0.1:0", 0.9, 2.5)


def test_bad_values_exit_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings("cloud", ["--onnx-threads", "0"])
    assert caught.value.code == 2
    assert "onnx_threads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings("cloud", ["--next", "127.0.0.1:1"])  # the cloud has no next tier


def test_a_misspelt_setting_in_the_environment_stops_the_tier(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TIERSERVE_EDGE_GRACE_SECOND", "20")  # GRACE_SECONDS
    monkeypatch.setenv("TIERSERVE_MOBILE_BOGUS", "1")  # another tier's prefix: that tier's business
    with pytest.raises(SystemExit) as caught:
        parse_settings("edge", [])
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert "TIERSERVE_EDGE_GRACE_SECOND (did you mean TIERSERVE_EDGE_GRACE_SECONDS?)" in err and "BOGUS" not in err
    monkeypatch.delenv("TIERSERVE_EDGE_GRACE_SECOND")
    # what Kubernetes injects for Services named tierserve-edge and tierserve-edge-headless: not settings, not typos
    for injected in ("SERVICE_HOST", "SERVICE_PORT", "SERVICE_PORT_GRPC", "PORT_50052_TCP",
                     "PORT_50052_TCP_ADDR", "PORT_50052_TCP_PORT", "PORT_50052_TCP_PROTO", "HEADLESS_SERVICE_HOST"):
        monkeypatch.setenv(f"TIERSERVE_EDGE_{injected}", "10.0.0.1")
    monkeypatch.setenv("TIERSERVE_EDGE_PORT", "tcp://10.0.0.1:50052")
    monkeypatch.setenv("TIERSERVE_EDGE_HEADLESS_PORT", "tcp://10.0.0.2:50052")
    assert parse_settings("edge", []).tier == "edge"
    monkeypatch.setenv("TIERSERVE_EDGE_METRIC_PORT", "9102")  # a typo, not a link: its value is no address
    with pytest.raises(SystemExit):
        parse_settings("edge", [])
    assert "TIERSERVE_EDGE_METRIC_PORT (did you mean TIERSERVE_EDGE_METRICS_PORT?)" in capsys.readouterr().err
    monkeypatch.delenv("TIERSERVE_EDGE_METRIC_PORT")
    monkeypatch.setenv("TIERSERVE_CLOUD_NEXT", "127.0.0.1:1")  # the cloud has no next tier
    with pytest.raises(SystemExit):
        parse_settings("cloud", [])
    assert "TIERSERVE_CLOUD_NEXT" in capsys.readouterr().err


def _loop_kind(kind: str) -> str:
    """The package of the event loop run_event_loop(kind) runs a coroutine on."""
    seen = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    run_event_loop(main(), kind)
    return seen[0]


def test_the_event_loop_setting_picks_the_loop() -> None:
    assert parse_settings("edge", []).event_loop == "auto"
    assert parse_settings("edge", ["--event-loop", "asyncio"]).event_loop == "asyncio"
    assert (_loop_kind("auto"), _loop_kind("uvloop"), _loop_kind("asyncio")) == ("uvloop", "uvloop", "asyncio")
    with pytest.raises(SystemExit):
        parse_settings("edge", ["--event-loop", "trio"])


def test_auto_falls_back_to_asyncio_and_uvloop_without_the_package_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert _loop_kind("auto") == "asyncio"
    with pytest.raises(TierServeError, match="uvloop package is not installed"):
        _loop_kind("uvloop")


def test_a_profile_is_a_training_budget_on_small_datasets() -> None:
    from shared.builder.config import PROFILES

    quick, full = PROFILES["quick"], PROFILES["full"]
    assert quick.epochs_for(40000) == 1.0 and full.epochs_for(65000) == 2.0  # SST-2: one pass, two (full)
    assert quick.epochs_for(15000) == pytest.approx(20000 / 15000)  # at least 20,000 samples seen
    assert quick.epochs_for(2934) == pytest.approx(20000 / 2934)  # MRPC's training pairs: ~6.8 passes
    assert full.epochs_for(2000) == pytest.approx(30.0)


@pytest.mark.parametrize("tier", ["mobile", "edge", "cloud"])
def test_every_tier_prints_its_help(tier: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m <tier>_node --help`: help texts holding a % once crashed argparse's formatting."""
    from shared.serving.server import main as serve_main

    with pytest.raises(SystemExit) as done:
        serve_main(tier, ["--help"])
    assert done.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--max-batch" in printed and "--artifacts" in printed
    if tier != "cloud":
        assert "5% of the time left" in printed
