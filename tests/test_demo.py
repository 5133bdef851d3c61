"""`tierserve demo` end to end on the tiny model and its generated dev set."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from shared.contract.manifest import TIERS
from shared.tools.cli import main


def _tier_processes() -> list[str]:
    """Tier processes started by this test process (other sessions' tiers on the machine don't count)."""
    listing = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    me = str(os.getpid())
    return [line for line in listing.splitlines()
            if line.split()[1:2] == [me] and any(f"-m {t}_node" in line for t in TIERS)]


def test_demo_matches_the_builder_report_and_leaves_no_process(
        tiny_artifacts: Path, tiny_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    before = _tier_processes()
    out = tmp_path / "demo.json"
    status = main(["demo", "--artifacts", str(tiny_artifacts), "--data",
                   str(tiny_data / "dev.tsv"), "--latency-samples", "40", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    results = json.loads(out.read_text())
    report = json.loads((tiny_artifacts / "report.json").read_text())
    assert results["samples"] == len((tiny_data / "dev.tsv").read_text().splitlines()) - 1
    assert results["builder_report"]["comparable"]
    assert results["accuracy"] == pytest.approx(report["system_accuracy"], abs=1e-12)
    for tier, e in zip(TIERS, report["exits"], strict=True):
        assert results["exits"][tier]["fraction"] == pytest.approx(e["exit_fraction"], abs=1e-12)
    assert results["single_pass_agrees"]
    assert set(results["tier_exit_status"].values()) == {0}
    assert "accuracy" in printed and "p95 ms" in printed
    assert _tier_processes() == before
