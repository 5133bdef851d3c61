"""The cpus setting: CPU lists, the spread of the tiers over a machine's cores, a real tier pinned."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from shared.contract.manifest import TIERS
from shared.serving.placement import format_cpu_list, parse_cpu_list, spread
from shared.serving.settings import parse_settings
from shared.tools.processes import start_tier, wait_until_serving

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")


def test_cpu_lists_parse_like_linux_ones() -> None:
    assert parse_cpu_list("0") == [0]
    assert parse_cpu_list("4-5,0, 2") == [0, 2, 4, 5]
    assert parse_cpu_list("1,1-2") == [1, 2]
    assert format_cpu_list([3, 1]) == "1,3"
    for bad, says in (("a", "not a CPU list"), ("1-", "not a CPU list"), ("-1", "not a CPU list"),
                      ("", "not a CPU list"), ("3-1", "empty range")):
        with pytest.raises(ValueError, match=says):
            parse_cpu_list(bad)


def test_the_setting_is_checked_and_normalised(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_settings("edge", ["--cpus", "1, 0"]).cpus == "0,1"
    assert parse_settings("edge", []).cpus is None
    with pytest.raises(SystemExit):
        parse_settings("edge", ["--cpus", "2-1"])
    assert "cpus" in capsys.readouterr().err


def test_spread_gives_the_entry_tier_cores_of_its_own() -> None:
    assert spread(TIERS, [0]) == {}  # nothing to spread over
    assert spread(TIERS, [0, 1]) == {"mobile": "0", "edge": "1", "cloud": "1"}
    assert spread(TIERS, [2, 3, 4, 5, 6, 7]) == {"mobile": "2,3", "edge": "4,5", "cloud": "6,7"}
    assert spread(TIERS, [0, 1, 2, 3]) == {"mobile": "0,1", "edge": "2", "cloud": "3"}  # none left idle
    assert spread(TIERS, [0, 1, 2, 3, 4, 5, 6]) == {"mobile": "0,1,2", "edge": "3,4", "cloud": "5,6"}
    assert spread(TIERS[:2], [5, 1]) == {"mobile": "1", "edge": "5"}


def _allowed_cpus(pid: int) -> set[str]:
    """Cpus_allowed_list of every thread of `pid`."""
    allowed = set()
    for thread in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{thread}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                allowed.add(line.split(":", 1)[1].strip())
    return allowed


@linux_only
def test_a_pinned_tier_runs_every_thread_on_its_cpus(tiny_artifacts: Path, tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    tier = start_tier("cloud", tiny_artifacts, tmp_path, flags={"cpus": str(cpu)})
    try:
        wait_until_serving([tier])
        assert len(os.listdir(f"/proc/{tier.process.pid}/task")) > 1  # onnxruntime's and gRPC's threads too
        assert _allowed_cpus(tier.process.pid) == {str(cpu)}
    finally:
        tier.stop()


@linux_only
def test_a_tier_asked_for_a_cpu_it_cannot_use_says_so_and_exits(tiny_artifacts: Path, tmp_path: Path) -> None:
    tier = start_tier("cloud", tiny_artifacts, tmp_path, flags={"cpus": "4095"})
    deadline = time.monotonic() + 60
    while tier.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tier.stop() == 2
    assert "cpus 4095 are not usable here" in tier.log_tail()
