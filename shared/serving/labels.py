"""Ground truth from clients: the entry tier remembers which exit answered each recent sample and
with which label, so that a true label reported later (ReportLabels) counts towards that exit's
accuracy on live traffic. Memory is bounded: the oldest answers are forgotten first."""

from __future__ import annotations

import collections
from collections.abc import Sequence

from shared.errors import InvalidInput, NotFound
from shared.serving.metrics import TierMetrics
from shared.wire.rpc import pb2

MAX_LABELS_PER_REPORT = 1024


class AnswerMemory:
    def __init__(self, labels: Sequence[str], metrics: TierMetrics, capacity: int = 100_000) -> None:
        self.labels = list(labels)
        self.index = {name: i for i, name in enumerate(self.labels)}
        self.metrics = metrics
        self.capacity = capacity
        self.answers: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()

    def remember(self, answers: Sequence[pb2.Answer]) -> None:
        for answer in answers:
            self.answers[answer.request_id] = (answer.tier, answer.label_index)
            self.answers.move_to_end(answer.request_id)
        while len(self.answers) > self.capacity:
            self.answers.popitem(last=False)

    def report(self, labels: Sequence[pb2.SampleLabel]) -> int:
        """Count reported labels against the answers given; all or nothing: any unknown sample id or
        label name refuses the whole report (NOT_FOUND, INVALID_ARGUMENT) naming it."""
        if len(labels) > MAX_LABELS_PER_REPORT:
            raise InvalidInput(f"{len(labels)} labels in one report, at most {MAX_LABELS_PER_REPORT}")
        checked = []
        for i, item in enumerate(labels):
            if item.label not in self.index:
                raise InvalidInput(f"label {i} is '{item.label[:80]}', not one of this model's labels {self.labels}")
            given = self.answers.get(item.sample_id)
            if given is None:
                raise NotFound(f"sample id '{item.sample_id[:160]}' (label {i}) was not answered here recently: the "
                               f"last {self.capacity} answers are remembered (report labels sooner, or raise "
                               "label_memory)")
            checked.append((given, self.index[item.label]))
        series = self.metrics
        for (exit_tier, answered), true in checked:
            series.reported_labels.labels(exit=exit_tier).inc()
            if answered == true:
                series.reported_label_hits.labels(exit=exit_tier).inc()
        return len(checked)
