"""The artifact manifest: the one contract between the builder and the serving tiers.

A build folder holds manifest.json, three ONNX slices (sha256 recorded here and checked at
load), the tokenizer (text family) and the report. Nodes read only the manifest and their slice.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from shared.errors import ArtifactError

FORMAT_VERSION: Literal[1] = 1
MANIFEST_FILE = "manifest.json"
CALIBRATION_FILE = "calibration_logits.npz"
Tier = Literal["mobile", "edge", "cloud"]
TIERS: tuple[Tier, ...] = ("mobile", "edge", "cloud")
# A threshold above any reachable confidence: the exit never answers.
NEVER_EXIT = 2.0


class SliceSpec(BaseModel):
    tier: Tier
    file: str
    sha256: str
    inputs: list[str]
    outputs: list[str]
    forwards: dict[str, str] = Field(
        default_factory=dict,
        description="next slice's input name -> this slice's output (or input) that feeds it; "
        "empty for the last slice",
    )
    first_layer: int = Field(ge=1, description="first layer (1-based) this slice runs")
    last_layer: int = Field(ge=1, description="last layer (inclusive) this slice runs")


class ExitSpec(BaseModel):
    tier: Tier
    layer: int = Field(ge=1, description="the exit head reads the output of this layer")
    temperature: float = Field(gt=0, default=1.0)
    threshold: float = Field(
        ge=0, default=NEVER_EXIT,
        description="answer here when calibrated confidence >= threshold (ignored at the last tier)",
    )


class CostModel(BaseModel):
    """DESIGN.md's cost model: lambda per layer per tier, o per hop."""

    layer_cost: dict[Tier, float] = {"mobile": 0.1, "edge": 0.1, "cloud": 0.1}
    hop_cost: dict[str, float] = {"mobile_edge": 0.3, "edge_cloud": 0.3, "mobile_cloud": 0.3}


class PolicySpec(BaseModel):
    """How the thresholds were chosen and what they promise. Fields added later default to None or
    empty, so manifests written before them still load (their thresholds carry no recorded guarantee)."""

    kind: Literal["p_tar", "cost"] = "p_tar"
    p_tar: dict[Tier, float] = Field({}, description="p_tar policy: target per early exit")
    target: Literal["accuracy", "consistency"] = Field(
        "accuracy", description="p_tar policy: what p_tar bounds, the exiting answers' accuracy or their "
        "agreement with the final exit")
    max_drop_points: float | None = None
    delta: float | None = Field(None, description="each guarantee holds with probability >= 1 - delta over "
                                "the calibration draw; None: no guarantee recorded")
    bound: dict[Tier, float] = Field({}, description="p_tar policy: Clopper-Pearson lower bound (1 - delta) "
                                     "on the exiting answers' accuracy (or agreement) per early exit that answers")
    drop_bound_points: float | None = Field(None, description="cost policy: upper bound (1 - delta) on the "
                                            "accuracy drop against the final exit, points")
    expected_cost: float | None = Field(None, description="relative to cloud-only, calibration split")
    expected_accuracy: float | None = None


class Provenance(BaseModel):
    backbone: str
    data: str
    seed: int
    profile: str
    created: str
    tierserve_version: str
    train_samples: int
    calibration_samples: int
    test_samples: int


class Manifest(BaseModel):
    format_version: Literal[1] = FORMAT_VERSION
    family: Literal["text", "image"] = "text"
    labels: list[str] = Field(min_length=2)
    num_layers: int = Field(ge=3)
    hidden_size: int
    max_length: int | None = Field(None, description="text: tokens per sequence after truncation")
    tokenizer_file: str | None = None
    tokenizer_sha256: str | None = Field(None, description="text: checked at load when recorded")
    text_pairs: bool = Field(False, description="text: each sample is a pair of texts (ClassifyRequest.pairs); the "
                             "mobile slice takes token_type_ids besides input_ids and attention_mask")
    input_shape: list[int] | None = Field(
        None, description="image: channels, height, width of the mobile slice's `pixels` input, "
        "float32 [batch, C, H, W] holding 0..255 pixel values (normalised inside the slice)")
    slices: list[SliceSpec] = Field(min_length=3, max_length=3)
    exits: list[ExitSpec] = Field(min_length=3, max_length=3)
    policy: PolicySpec = PolicySpec()
    cost_model: CostModel = CostModel()
    provenance: Provenance

    @model_validator(mode="after")
    def _tiers_in_order(self) -> Manifest:
        if [s.tier for s in self.slices] != list(TIERS) or [e.tier for e in self.exits] != list(TIERS):
            raise ValueError("slices and exits must be listed in tier order mobile, edge, cloud")
        if self.family == "text" and (self.max_length is None or self.tokenizer_file is None):
            raise ValueError("a text model needs max_length and tokenizer_file")
        if self.family == "image" and self.input_shape is None:
            raise ValueError("an image model needs input_shape")
        if self.text_pairs and self.family != "text":
            raise ValueError("text_pairs is for text models only")
        return self

    def slice(self, tier: Tier) -> SliceSpec:
        return self.slices[TIERS.index(tier)]

    def exit(self, tier: Tier) -> ExitSpec:
        return self.exits[TIERS.index(tier)]

    def split_points(self) -> tuple[int, int, int]:
        return tuple(s.last_layer for s in self.slices)  # type: ignore[return-value]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unreadable(path: Path, exc: OSError) -> ArtifactError:
    """The error for a model file this process cannot read, naming the file and the fix."""
    return ArtifactError(f"cannot read {path}: {exc.strerror} (this process runs as uid {os.getuid()}; the model "
                         "folder must be readable by it, e.g. chmod -R a+rX on the folder)")


def artifact_path(folder: str | Path, name: str, what: str) -> Path:
    """`folder / name` for a file the manifest names, which must lie inside the model folder (no
    absolute path, no `..` out of it; symbolic links inside the folder are the operator's choice)."""
    inside = os.path.normpath(name)
    if os.path.isabs(name) or inside == ".." or inside.startswith(".." + os.sep):
        raise ArtifactError(f"the manifest's {what} '{name}' lies outside the model folder {folder}: "
                            "a manifest may only name files inside its folder")
    return Path(folder) / inside


def load_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_FILE} in {folder}: build a model first (make model)")
    try:
        return Manifest.model_validate_json(path.read_text())
    except OSError as exc:
        raise unreadable(path, exc) from exc
    except ValueError as exc:
        raise ArtifactError(f"{path} is not a valid tierserve manifest: {exc}") from exc


def save_manifest(manifest: Manifest, folder: str | Path) -> Path:
    path = Path(folder) / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def verified_file(folder: str | Path, name: str, sha256: str | None, what: str) -> Path:
    """The path of a file the manifest names, after checking that it lies inside the model folder,
    exists, is readable and (where the manifest records one) matches its sha256."""
    path = artifact_path(folder, name, what)
    if not path.is_file():
        raise ArtifactError(f"{what} {path} is missing")
    if sha256 is not None:
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise unreadable(path, exc) from exc
        if actual != sha256:
            raise ArtifactError(
                f"{what} {path} has sha256 {actual[:12]}..., the manifest expects {sha256[:12]}...: "
                "the file was modified or belongs to another build; rebuild or restore it")
    return path


def verified_slice_path(folder: str | Path, spec: SliceSpec) -> Path:
    """The slice file's path, verified (verified_file)."""
    return verified_file(folder, spec.file, spec.sha256, f"the {spec.tier} slice")


def save_exit_logits(path: Path, logits: list[np.ndarray], labels: np.ndarray) -> Path:
    """A split's raw logits per exit and its labels (calibration, test, holdout): what lets thresholds be
    re-tuned, and their figures refreshed, without torch."""
    arrays: dict[str, Any] = {"labels": labels, **{f"exit{i}": z for i, z in enumerate(logits)}}
    np.savez_compressed(path, **arrays)
    return path


def load_exit_logits(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """What save_exit_logits wrote: the logits per exit, in exit order, and the labels."""
    with np.load(path, allow_pickle=False) as data:
        exits = sorted((k for k in data.files if k.startswith("exit")), key=lambda k: int(k[4:]))
        return [data[k] for k in exits], data["labels"]


def save_calibration_logits(folder: str | Path, logits: list[np.ndarray], labels: np.ndarray) -> Path:
    """The held-out calibration split's raw logits per exit: lets thresholds be re-tuned without torch."""
    return save_exit_logits(Path(folder) / CALIBRATION_FILE, logits, labels)


def load_calibration_logits(folder: str | Path) -> tuple[list[np.ndarray], np.ndarray]:
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: rebuild the model to re-tune its thresholds")
    return load_exit_logits(path)
