"""The bench scripts on the tiny model: they run against real tiers and report what they claim.

No timing is asserted (timing goals live in bench/results); these check that each script's figures
are the ones its answers imply, so that `make bench` cannot rot unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.contract.manifest import load_manifest
from shared.contract.policy import relative_cost
from shared.tools.processes import TierCluster


def test_tradeoff_headline_is_what_the_tiers_answered(tiny_artifacts: Path, tiny_data: Path,
                                                      tmp_path: Path) -> None:
    from bench import tradeoff

    result = tradeoff.run(tiny_artifacts, str(tiny_data), limit=80, out=tmp_path)
    live = result["live"]["calibrated"]
    assert live["route_agrees"]  # the running tiers route exactly like shared.contract.policy.route
    points = tuple(result["split_points"])
    cost = tradeoff.cost_model(load_manifest(tiny_artifacts), result["headline_o"])
    fractions = np.array([live["exit_fractions"][t] for t in ("mobile", "edge", "cloud")])
    assert fractions.sum() == pytest.approx(1.0)
    assert live["relative_cost"] == pytest.approx(relative_cost(fractions, points, cost))
    assert result["cost_reduction"] == pytest.approx(1 - live["relative_cost"])
    assert result["accuracy_drop_points"] == pytest.approx((result["cloud_only_accuracy"] - live["accuracy"]) * 100)
    assert [s["o"] for s in result["sweep"]] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    saved = json.loads((tmp_path / "tradeoff.json").read_text())
    assert saved["cost_reduction"] == pytest.approx(result["cost_reduction"])
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_calibration_rows_cover_every_target_and_rule(tiny_artifacts: Path, tiny_data: Path, tmp_path: Path) -> None:
    from bench import calibration

    result = calibration.run(tiny_artifacts, str(tiny_data), limit=80, out=tmp_path, p_tars=(0.8, 0.95))
    rows = result["rows"]
    kinds = {"guaranteed": ("calibrated",), "uncorrected": ("calibrated",),
             "threshold = p_tar": ("calibrated", "uncalibrated"), "guaranteed consistency": ("calibrated",)}
    assert {(r["kind"], r["rule"], r["p_tar"], r["tier"]) for r in rows} == {
        (k, rule, p, t) for rule in calibration.RULES for k in kinds[rule]
        for p in (0.8, 0.95) for t in ("mobile", "edge")}
    for r in rows:
        if r["rule"] == "threshold = p_tar":
            assert r["threshold"] == r["p_tar"]
        if r["rule"] == "guaranteed" and r["threshold"] is not None:
            assert r["bound"] >= r["p_tar"]  # what the calibration split certified
        measured = r["agreement"] if r["rule"] == "guaranteed consistency" else r["accuracy"]
        if measured is not None:
            assert r["miss"] == pytest.approx(r["p_tar"] - measured)
    misses = [r["miss"] for r in rows if r["rule"] == "guaranteed" and r["miss"] is not None]
    assert result["calibration_max_miss"] == (max(misses) if misses else None)
    for p in (0.8, 0.95):  # early-exit share per rule: what the guarantee costs
        assert result["coverage"][str(p)]["guaranteed"] == pytest.approx(
            sum(r["share"] for r in rows if r["p_tar"] == p and r["rule"] == "guaranteed"))


def test_codec_counts_fewer_bytes_for_compact_encodings(tiny_artifacts: Path, tiny_data: Path,
                                                        tmp_path: Path) -> None:
    from bench import codec

    result = codec.run(tiny_artifacts, str(tiny_data), limit=40, out=tmp_path)
    per_sample = {name: r["bytes_per_forwarded_sample"] for name, r in result["encodings"].items()}
    assert per_sample["fp16"] < per_sample["fp32"] and per_sample["int8"] < per_sample["fp16"]
    assert per_sample["int4"] < 0.6 * per_sample["int8"]  # the tiny model's width is one int4 group
    assert result["int8_bytes_ratio"] == pytest.approx(per_sample["int8"] / per_sample["fp32"])


def test_overhead_forces_every_request_through_the_three_hops_beside_a_bare_echo(
        tiny_artifacts: Path, tiny_data: Path, tmp_path: Path) -> None:
    from bench import overhead

    result = overhead.run(tiny_artifacts, str(tiny_data), limit=30, out=tmp_path)  # asserts tier == cloud
    assert result["three_tier_ms"]["n"] == result["chain_ms"]["n"] == 30
    assert result["bare_echo_round_trip_ms"]["n"] == 30 * overhead.HOPS
    assert result["overhead_ratio"] == pytest.approx(result["three_tier_ms"]["p50"] / result["chain_ms"]["p50"])
    per_hop = (result["three_tier_ms"]["p50"] - result["chain_ms"]["p50"]) / 3
    assert result["per_hop_overhead_ms"] == pytest.approx(per_hop)
    assert result["per_hop_over_echo"] == pytest.approx(per_hop / result["bare_echo_round_trip_ms"]["p50"])
    assert len(result["per_hop_over_echo_by_block"]) == overhead.ROUNDS
    parts = result["parts_p50_ms"]
    assert set(parts) == {"hop_client_mobile", "hop_mobile_edge", "hop_edge_cloud", "own_mobile", "own_edge",
                          "own_cloud", "slices"}
    assert all(value > 0 for value in parts.values()) and result["chain_slices_p50_ms"] > 0
    assert json.loads((tmp_path / "overhead.json").read_text())["per_hop_over_echo"] == result["per_hop_over_echo"]


def test_per_hop_by_block_takes_each_blocks_medians() -> None:
    from bench.overhead import Measured

    measured = Measured({"chain": [[1.0, 1.0], [3.0, 2.0, 2.0]], "tiers": [[4.0, 4.0], [5.0, 8.0, 8.0]]})
    assert measured.per_hop_by_block("tiers") == [1.0, 2.0]



def test_calibration_measures_an_image_model_too(tiny_cnn_artifacts: Path, tiny_image_data: Path,
                                                 tmp_path: Path) -> None:
    from bench import calibration

    result = calibration.run(tiny_cnn_artifacts, str(tiny_image_data), limit=60, out=tmp_path, p_tars=(0.8,))
    assert result["samples"] == 60
    assert {r["rule"] for r in result["rows"]} == set(calibration.RULES)
    assert sum(r["exited"] for r in result["rows"] if r["rule"] == "threshold = p_tar"
               and r["kind"] == "calibrated") <= 60


def test_soak_accounts_for_every_request_and_samples_memory(tiny_artifacts: Path, tiny_data: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import soak

    monkeypatch.setattr(soak, "CHECKPOINT", 20)
    result = soak.run(tiny_artifacts, str(tiny_data), limit=50, requests=60, concurrency=4)
    assert result["accounted"] == 60 and result["lost"] == 0
    assert [m["requests"] for m in result["memory"]] == [20, 40, 60]
    assert all(m["rss_mb"][tier] > 10 for m in result["memory"] for tier in ("mobile", "edge", "cloud"))


def test_overload_drives_a_level_and_counts_goodput(tiny_artifacts: Path, tiny_data: Path) -> None:
    import asyncio

    from bench import overload
    from bench.common import dev_set, load, tiers

    texts, _ = dev_set(load(tiny_artifacts), str(tiny_data), 40)
    with tiers(tiny_artifacts, {"mobile": {"max_inflight_samples": 256}}) as cluster:
        level = asyncio.run(overload._drive(cluster.entry_address, texts, 32, 12, seconds=1.5, warmup=0.5))
    outcomes = level["outcomes"]
    assert outcomes["OK"] > 0 and level["goodput_samples_per_s"] == pytest.approx(
        outcomes["OK"] * 32 / level["seconds"])
    assert outcomes.get("RESOURCE_EXHAUSTED", 0) > 0, "12 requests of 32 exceed 256 samples in flight"
    assert level["refusal_ms"]["n"] == outcomes["RESOURCE_EXHAUSTED"]


def test_drift_serves_one_stream_static_and_adaptive_and_plots_it(tiny_artifacts: Path, tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    import random

    from bench import drift

    stream = drift.drift_stream(["a good film here", "a dull plot"], samples=40, shift_at=20, other=["news"] * 3)
    assert stream[:20] == ["a good film here", "a dull plot"] * 10 and "news" in stream[20:]
    assert drift.corrupt("one two three four", 0.0, random.Random(0)) == "one two three four"
    reviews = drift.mixed_reviews(["a good film .", "great acting", "a dull plot"], [1, 1, 0], 20)
    for review in reviews:
        first, second = review.split(" , but ")
        assert {first.rstrip(" ."), second.rstrip(" .")} in ({"a dull plot", "a good film"},
                                                             {"a dull plot", "great acting"}), review
    result = drift.run(tiny_artifacts, str(tiny_data), out=tmp_path, target=0.9, fraction=0.5, samples=1000,
                       shift="contrast")
    for run in result["runs"].values():
        assert [w["start"] for w in run["windows"]] == [0, 500]
        assert all(0 < w["cost"] <= 1 for w in run["windows"])
        assert run["audits"]["mobile"]["audited_answers"] > 0
        assert run["audits"]["mobile"]["audited_samples"] <= 0.5 * 1000  # at most the fraction, not on average
    assert (tmp_path / "drift.png").stat().st_size > 0 and (tmp_path / "drift.json").exists()
    # with controllers that never move, the replay is the static run
    frozen = drift.replay(tiny_artifacts, str(tiny_data), out=tmp_path, target=0.9, fraction=0.5, samples=1000,
                          shift="contrast", draws=2, controller={"controller_min_samples": 10**9})
    for draw in frozen["draws"]:
        for replayed, served in zip(draw["windows"], result["runs"]["static"]["windows"], strict=True):
            assert replayed["cost"] == pytest.approx(served["cost"], abs=0.01)
            assert replayed["agreement"] == pytest.approx(served["agreement"], abs=0.01)
    assert (tmp_path / "drift-replay.json").exists()
    with pytest.raises(ValueError, match="controller_max_step"):
        drift.replay(tiny_artifacts, str(tiny_data), draws=1, controller={"controller_max_step": 0.02})


def test_drift_replay_offers_each_exit_the_samples_that_reach_it_and_feeds_its_controller() -> None:
    """Constructed confidences: mobile answers every other sample; with every sample audited, the mobile
    controller sees all samples in order, the edge's only those the mobile forwarded, and a controller
    that moves changes the routing of the samples after it."""
    from bench import drift

    n = 400
    mobile = np.tile([0.95, 0.6], n // 2)  # answered, forwarded, ...
    edge = np.linspace(0.5, 1.0, n)
    agrees = [np.arange(n) % 3 > 0, np.ones(n, dtype=bool)]
    frozen = {**drift.CONTROLLER, "controller_min_samples": 10**9, "controller_window": 1000}
    controllers, auditors = drift.adaptive_exits({"mobile": 0.9, "edge": 0.8}, 0.95, 1.0, frozen, seed=0)
    exits = drift.replay_exits([mobile, edge], agrees, controllers, auditors)
    assert np.array_equal(exits, np.where(mobile >= 0.9, 0, np.where(edge >= 0.8, 1, 2)))
    assert auditors[0].offered == n and auditors[1].offered == n // 2
    assert [c for c, _ in controllers[0].window] == mobile.tolist()
    assert [a for _, a in controllers[0].window] == agrees[0].tolist()
    assert [c for c, _ in controllers[1].window] == edge[1::2].tolist()
    # the mobile's agreement (2 in 3) certifies 0.95 at no threshold: its controller climbs to the
    # ceiling and from then on the mobile answers nothing
    moving = {**drift.CONTROLLER, "controller_min_samples": 50, "controller_every": 10, "controller_max_raise": 0.1}
    controllers, auditors = drift.adaptive_exits({"mobile": 0.9, "edge": 0.8}, 0.95, 1.0, moving, seed=0)
    exits = drift.replay_exits([mobile, edge], agrees, controllers, auditors)
    assert controllers[0].threshold == 1.0 and (exits[: 50] == 0).any() and not (exits[100:] == 0).any()


def test_policy_stop_is_where_the_guaranteed_search_stops() -> None:
    """Constructed calibration split: the final exit always right, the early exits wrong on a few of
    their least confident samples. The certified candidate is the policy's choice; the refused one
    right after it loses more answers and its bound passes the budget."""
    from bench.policy import stop
    from shared.contract.manifest import CostModel
    from shared.contract.policy import cost_aware_thresholds

    rng = np.random.default_rng(0)
    n = 3000
    labels = rng.integers(0, 2, n)
    confidence = rng.uniform(0.5, 1.0, (3, n))
    confidence[2] = 0.99
    wrong = [confidence[0] < 0.7, confidence[1] < 0.6, np.zeros(n, dtype=bool)]
    predicted = [np.where(w, 1 - labels, labels) for w in wrong]
    probs = [np.where(p[:, None] == np.arange(2), c[:, None], 1 - c[:, None]) for p, c in zip(predicted, confidence,
                                                                                             strict=True)]
    points, cost = (2, 4, 6), CostModel()
    certified, refused = stop(probs, labels, points, cost, 0.3, 0.1)
    assert certified["certified"] and not refused["certified"]
    assert certified["bound_points"] <= 0.3 < refused["bound_points"]
    assert refused["lost"] > certified["lost"] and refused["relative_cost"] < certified["relative_cost"]
    assert certified["thresholds"] == cost_aware_thresholds(probs, labels, points, cost, 0.3, 0.1).thresholds


def test_cpu_snapshot_counts_each_tiers_work_within_the_machines(cluster: TierCluster, tiny_artifacts: Path,
                                                                  tiny_data: Path) -> None:
    """bench.peers' per-tier CPU: the tiers' own process_cpu_seconds_total grows while they answer, and
    the machine's busy time (/proc/stat) holds at least all of theirs."""
    from bench.common import classify_all, dev_set, load
    from bench.peers import cpu_snapshot

    texts, _ = dev_set(load(tiny_artifacts), str(tiny_data), 40)
    before = cpu_snapshot(cluster)
    for _ in range(5):
        classify_all(cluster.entry_address, texts, batch_size=1)
    after = cpu_snapshot(cluster)
    used = {name: after[name] - before[name] for name in before}
    assert set(used) == {"mobile", "edge", "cloud", "machine"}
    assert used["mobile"] > 0  # every request runs the entry tier's slice
    assert used["machine"] >= used["mobile"] + used["edge"] + used["cloud"] - 0.05


def test_tier_ab_alternates_two_sets_of_tiers_and_takes_ratios_pair_by_pair(tiny_artifacts: Path, tiny_data: Path,
                                                                            tmp_path: Path) -> None:
    from bench.tier_ab import parse_settings, run

    changed = parse_settings(["mobile.coalesce_forwards=false", "edge.coalesce_forwards=false"])
    assert changed == {"mobile": {"coalesce_forwards": "false"}, "edge": {"coalesce_forwards": "false"}}
    with pytest.raises(SystemExit, match="expected <tier>.<setting>=<value>"):
        parse_settings(["gateway.threshold=1"])
    result = run(tiny_artifacts, changed, levels=(2,), blocks=2, seconds=0.5, generator="tritonclient",
                 data=str(tiny_data), limit=40, out=tmp_path)
    a, b = result["cells"]["A"][2], result["cells"]["B"][2]
    assert len(a) == len(b) == 2 and all(cell["throughput_per_s"] > 0 for cell in a + b)
    assert result["ratios_b_over_a"][2]["throughput_per_s"] == [
        y["throughput_per_s"] / x["throughput_per_s"] for x, y in zip(a, b, strict=True)]
    assert set(a[0]["cpu_cores"]) == {"mobile", "edge", "cloud", "machine"}
    assert json.loads((tmp_path / "tier_ab.json").read_text())["changed"] == changed


def test_peers_takes_each_sides_best_variant_against_kserves_best() -> None:
    from bench.peers import _goals, summarise

    def cell(throughput: float, p99: float) -> dict[str, float]:
        return {"throughput_per_s": throughput, "p50_ms": p99 / 2, "p99_ms": p99}

    cells = {"kserve": {32: [cell(200, 180), cell(220, 170)]},
             "kserve, 1 thread, quiet": {32: [cell(150, 250), cell(150, 250)]},
             "cloud-only": {32: [cell(190, 300), cell(200, 300)]},
             "three-tier": {32: [cell(380, 160), cell(400, 150)]},
             "three-tier, mobile 2 slice workers": {32: [cell(420, 170), cell(420, 200)]},
             "three-tier, pinned": {32: [cell(400, 160), cell(410, 160)]}}
    summary = summarise(cells, [32])
    three = summary["ratios"]["three-tier"][32]
    assert summary["kserve_baseline"][32] == "kserve"
    assert three["ours"] == "three-tier, mobile 2 slice workers" and three["throughput"] == 420 / 210
    assert three["throughput_by_block"] == [420 / 200, 420 / 220] and three["p99"] == 185 / 175
    goals = _goals(summary, [32])
    assert goals["three_tier_throughput_x_kserve_c32"]["met"] and not goals["three_tier_p99_x_kserve_c32"]["met"]
    assert not goals["cloud_only_throughput_x_kserve"]["met"]
    # no one variant has both: the fastest has the wider p99, the others are under 2x
    both = goals["three_tier_both_c32_by_variant"]
    assert both["value"]["three-tier, pinned"] == {"throughput_per_s": 405 / 210, "p99_ms": 160 / 175}
    assert set(both["value"]) == {name for name in cells if name.startswith("three-tier")} and not both["met"]
    cells["three-tier, pinned"][32] = [cell(430, 160), cell(425, 170)]
    assert _goals(summarise(cells, [32]), [32])["three_tier_both_c32_by_variant"]["met"]
    # KServe's tuned variant alone (as --kserve-variants tuned runs it): the pairs are against it
    del cells["kserve"]
    both = _goals(summarise(cells, [32]), [32])["three_tier_both_c32_by_variant"]["value"]
    assert both["three-tier, pinned"] == {"throughput_per_s": 427.5 / 150, "p99_ms": 165 / 250}


@pytest.mark.parametrize("flags", [["--three-tier-variants", "fast"], ["--three-tier-variants", ""],
                                   ["--kserve-variants", "default,nope"]])
def test_peers_refuses_unknown_variants_before_starting_anything(flags: list[str],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from bench.peers import THREE_TIER_VARIANTS, main

    assert all(name.startswith("three-tier") for name, _ in THREE_TIER_VARIANTS.values())  # how ratios find them
    with pytest.raises(SystemExit) as stopped:
        main(["--artifacts", "/nonexistent", *flags])
    assert stopped.value.code == 2 and flags[0] in capsys.readouterr().err


def test_peers_measures_a_failed_cell_once_more_and_records_it(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.peers import once_more

    calls: list[int] = []

    def flaky(address: str, model: str, level: int) -> dict[str, float]:
        calls.append(level)
        if len(calls) == 1:
            raise RuntimeError("perf_analyzer failed against tierserve at 127.0.0.1:1 (exit 0):\nThread [3] had error")
        return {"throughput_per_s": 100.0}

    figures = once_more(flaky)("127.0.0.1:1", "tierserve", 32)
    assert calls == [32, 32] and figures["throughput_per_s"] == 100.0
    assert "Thread [3] had error" in figures["retried"] and "measuring once more" in capsys.readouterr().out

    def broken(address: str, model: str, level: int) -> dict[str, float]:
        raise RuntimeError("perf_analyzer failed")

    with pytest.raises(RuntimeError):  # a second failure is the run's failure
        once_more(broken)("127.0.0.1:1", "tierserve", 32)
