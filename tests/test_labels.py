"""Ground truth reported by clients (ReportLabels): each exit's live accuracy, bounded memory,
clear errors for unknown or forgotten sample ids and unknown labels; real tiers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.common import scrape
from shared.client import TierClient
from shared.tools.processes import TierCluster, running_tiers
from tests.tiny_model import sentence

_rng = np.random.default_rng(9)
TEXTS = [sentence(_rng, i % 2, 2) for i in range(12)]


@pytest.fixture(scope="module")
def cluster(tiny_artifacts: Path) -> Iterator[TierCluster]:
    with running_tiers(tiny_artifacts, flags={"mobile": {"label_memory": 10}}) as started:
        yield started


def _counts(cluster: TierCluster) -> dict[str, tuple[float, float]]:
    samples = scrape(cluster.tiers["mobile"].metrics_port)
    return {tier: (samples[("tierserve_reported_labels_total", (("exit", tier),))],
                   samples[("tierserve_reported_label_hits_total", (("exit", tier),))])
            for tier in ("mobile", "edge", "cloud")}


def test_reported_labels_count_towards_the_exit_that_answered(cluster: TierCluster) -> None:
    with TierClient(cluster.entry_address) as client:
        before = _counts(cluster)
        answers = client.classify(TEXTS[:6], request_id="a")
        truth = {a.request_id: ("positive" if i % 2 else "negative") for i, a in enumerate(answers)}
        assert client.report_labels(truth) == 6
        after = _counts(cluster)
    for tier in ("mobile", "edge", "cloud"):
        mine = [a for a in answers if a.tier == tier]
        hits = sum(a.label == truth[a.request_id] for a in mine)
        assert after[tier][0] - before[tier][0] == len(mine)
        assert after[tier][1] - before[tier][1] == hits


def test_unknown_forgotten_ids_and_unknown_labels_are_clear_errors(cluster: TierCluster) -> None:
    with TierClient(cluster.entry_address) as client:
        client.classify(TEXTS[:4], request_id="old")
        client.classify(TEXTS[:10], request_id="new")  # memory of 10: "old/*" is forgotten
        for labels, code, says in [
                ({"old/0": "negative"}, grpc.StatusCode.NOT_FOUND, "the last 10 answers are remembered"),
                ({"never/0": "negative"}, grpc.StatusCode.NOT_FOUND, "'never/0' (label 0) was not answered here"),
                ({"new/0": "neutral"}, grpc.StatusCode.INVALID_ARGUMENT, "not one of this model's labels")]:
            with pytest.raises(grpc.RpcError) as caught:
                client.report_labels(labels)
            assert caught.value.code() == code and says in caught.value.details()
        before = _counts(cluster)
        with pytest.raises(grpc.RpcError):  # all or nothing: one bad id refuses the report
            client.report_labels({"new/1": "negative", "never/1": "negative"})
        assert _counts(cluster) == before
        assert client.report_labels({"new/9": "positive"}) == 1
