"""The bench scripts on the tiny model: they run against real tiers and report what they claim.

No timing is asserted (timing goals live in bench/results); these check that each script's figures
are the ones its answers imply, so that `make bench` cannot rot unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.contract.manifest import TIERS, load_manifest
from shared.contract.policy import relative_cost
from shared.serving.placement import spread


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
    assert {(r["kind"], r["rule"], r["p_tar"], r["tier"]) for r in rows} == {
        (k, rule, p, t) for k in ("calibrated", "uncalibrated") for rule in calibration.RULES
        for p in (0.8, 0.95) for t in ("mobile", "edge")}
    for r in rows:
        if r["rule"] == "threshold = p_tar":
            assert r["threshold"] == r["p_tar"]
        if r["accuracy"] is not None:
            assert r["miss"] == pytest.approx(r["p_tar"] - r["accuracy"])
    misses = [r["miss"] for r in rows if r["kind"] == "calibrated" and r["rule"] == calibration.RULES[0]
              and r["miss"] is not None]
    assert result["calibration_max_miss"] == (max(misses) if misses else None)


def test_codec_counts_fewer_bytes_for_compact_encodings(tiny_artifacts: Path, tiny_data: Path,
                                                        tmp_path: Path) -> None:
    from bench import codec

    result = codec.run(tiny_artifacts, str(tiny_data), limit=40, out=tmp_path)
    per_sample = {name: r["bytes_per_forwarded_sample"] for name, r in result["encodings"].items()}
    assert per_sample["fp16"] < per_sample["fp32"] and per_sample["int8"] < per_sample["fp16"]
    assert result["int8_bytes_ratio"] == pytest.approx(per_sample["int8"] / per_sample["fp32"])


def test_overhead_forces_every_request_through_both_hops(tiny_artifacts: Path, tiny_data: Path,
                                                         tmp_path: Path) -> None:
    from bench import overhead

    result = overhead.run(tiny_artifacts, str(tiny_data), limit=30, out=tmp_path)  # asserts tier == cloud
    assert result["three_tier_ms"]["n"] == result["chain_ms"]["n"] == 30
    assert set(result["hop_p50_ms"]) == {"client_mobile", "mobile_edge", "edge_cloud"}
    assert result["overhead_ratio"] == pytest.approx(result["three_tier_ms"]["p50"] / result["chain_ms"]["p50"])
    placements = {"spread", "floating"} if spread(TIERS) else {"floating"}  # spread needs two CPUs
    assert set(result["by_placement"]) == placements and result["placement"] in placements
    for each in result["by_placement"].values():
        assert each["three_tier_ms"]["n"] == 30
        assert each["overhead_ratio"] == pytest.approx(each["three_tier_ms"]["p50"] / result["chain_ms"]["p50"])
    assert result["by_placement"][result["placement"]]["overhead_ratio"] == result["overhead_ratio"]
    assert result["bare_grpc_round_trip_ms"] > 0 and result["bare_grpc_stream_round_trip_ms"] > 0
    assert result["ratio_if_hops_were_bare"] > 1
    assert result["bare_grpc_stream_round_trip_after_idle_ms"] > 0
    assert result["ratio_if_hops_were_bare_after_idle"] > 1
    assert result["bare_relay_ms"]["n"] == 30
    assert result["bare_relay_ratio"] == pytest.approx(result["bare_relay_ms"]["p50"] / result["chain_ms"]["p50"])
    assert sum(result["block_sizes"]) == 30 and len(result["block_sizes"]) == overhead.ROUNDS
    for ratios in [result["bare_relay_ratio_by_block"], *(r["overhead_ratio_by_block"]
                                                          for r in result["by_placement"].values())]:
        assert len(ratios) == overhead.ROUNDS and all(ratio > 0 for ratio in ratios)


def test_ratio_by_block_divides_each_blocks_medians() -> None:
    from bench.overhead import Measured

    measured = Measured(chain=[1.0, 1.0, 3.0, 2.0, 2.0], block_sizes=[2, 3])
    assert measured.ratio_by_block([2.0, 2.0, 2.0, 2.0, 1.0]) == [2.0, 1.0]


def test_bare_relay_computes_what_the_chain_computes(tiny_artifacts: Path, tiny_data: Path) -> None:
    """bench.relay's three processes answer with the last slice's logits of the in-process chain."""
    from bench.common import dev_set
    from bench.overhead import Chain
    from bench.relay import Relay, pack, unpack

    manifest = load_manifest(tiny_artifacts)
    chain = Chain(tiny_artifacts, manifest)
    relay = Relay(tiny_artifacts, manifest)
    try:
        texts, _ = dev_set(manifest, str(tiny_data), 5)
        for text in [*texts, " ".join(texts)]:
            feed = chain.encoder.encode([text]).tensors
            logits, seconds = relay.call(feed)
            for spec, runner in zip(manifest.slices, chain.runners, strict=True):
                outputs = runner.run_sync(feed).outputs
                feed = {name: outputs.get(source, feed.get(source)) for name, source in spec.forwards.items()}
            np.testing.assert_allclose(logits, outputs["logits"], rtol=1e-5, atol=1e-6)
            assert seconds > 0
    finally:
        chain.close()
        relay.close()
    arrays = [np.arange(6, dtype=np.float32).reshape(1, 2, 3), np.ones((1, 2), np.int64)]
    for sent, received in zip(arrays, unpack(pack(arrays)), strict=True):
        assert received.dtype == sent.dtype and np.array_equal(received, sent)
