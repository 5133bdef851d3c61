"""The builder on a tiny random BERT: real training, calibration, ONNX export and report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from shared.builder.build import BuildConfig, build, check_split_points
from shared.contract.manifest import TIERS, load_manifest, verified_slice_path
from shared.contract.text import TextEncoder
from shared.data.text import load_splits, read_table
from shared.errors import ArtifactError, BuildInputError
from tests.tiny_model import make_dataset

REPORT_EXIT_KEYS = {"tier", "layer", "accuracy", "ece_before", "ece_after", "temperature", "threshold",
                    "exit_fraction", "exited_accuracy"}


def test_build_writes_a_complete_artifact_folder(tiny_artifacts: Path) -> None:
    for name in ("manifest.json", "mobile.onnx", "edge.onnx", "cloud.onnx", "tokenizer.json",
                 "report.json", "reliability.png", "tradeoff.png"):
        assert (tiny_artifacts / name).is_file(), name
    manifest = load_manifest(tiny_artifacts)
    assert manifest.labels == ["negative", "positive"]
    assert manifest.split_points() == (1, 2, 3)
    assert [s.tier for s in manifest.slices] == list(TIERS)
    assert manifest.slices[0].inputs == ["input_ids", "attention_mask"]
    assert manifest.slices[-1].outputs == ["logits"]
    assert manifest.provenance.profile == "tiny"
    report = json.loads((tiny_artifacts / "report.json").read_text())
    assert [e["tier"] for e in report["exits"]] == list(TIERS)
    for e in report["exits"]:
        assert e.keys() >= REPORT_EXIT_KEYS
    assert sum(e["exit_fraction"] for e in report["exits"]) == pytest.approx(1.0)
    for key in ("final_accuracy", "relative_cost", "accuracy_drop_points", "build_seconds", "provenance"):
        assert key in report
    assert report["max_logit_difference"] <= 1e-4
    assert report["final_accuracy"] > 0.7  # learnable data: training really happened


def test_slices_have_dynamic_axes_and_chain_like_the_report(tiny_artifacts: Path, tiny_data: Path) -> None:
    manifest = load_manifest(tiny_artifacts)
    sessions = {s.tier: ort.InferenceSession(str(verified_slice_path(tiny_artifacts, s))) for s in manifest.slices}
    encoder = TextEncoder.for_manifest(manifest, tiny_artifacts)
    _, test = load_splits(tiny_data)
    report = json.loads((tiny_artifacts / "report.json").read_text())
    correct = []
    for start in range(0, len(test), 37):  # odd batch sizes, mixed lengths
        batch = encoder.encode(test.texts[start : start + 37]).tensors
        logits, hidden = sessions["mobile"].run(None, batch)
        logits, hidden = sessions["edge"].run(None, {"hidden": hidden, "attention_mask": batch["attention_mask"]})
        (logits,) = sessions["cloud"].run(None, {"hidden": hidden, "attention_mask": batch["attention_mask"]})
        correct.extend(logits.argmax(-1) == test.labels[start : start + 37])
    assert np.mean(correct) == pytest.approx(report["final_accuracy"], abs=1e-9)


def test_second_build_with_same_config_is_cached(tiny_artifacts: Path, capsys: pytest.CaptureFixture) -> None:
    from shared.builder.build import CONFIG_FILE

    config = BuildConfig.model_validate_json((tiny_artifacts / CONFIG_FILE).read_text())
    before = (tiny_artifacts / "mobile.onnx").stat().st_mtime_ns
    build(config, tiny_artifacts)
    assert "cached build" in capsys.readouterr().out
    assert (tiny_artifacts / "mobile.onnx").stat().st_mtime_ns == before


def test_a_build_never_replaces_what_is_not_a_model(tiny_artifacts: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--out is checked before any training: a build replaces its folder whole, so it refuses (even with
    --force) a file, a folder of other files, the working folder or one above it, and the data's folder."""
    from shared.builder.build import CONFIG_FILE

    config = BuildConfig.model_validate_json((tiny_artifacts / CONFIG_FILE).read_text())
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    (data_folder / "train.csv").write_text("text,label\n")
    monkeypatch.chdir(notes)
    cases = {tmp_path / "a-file": "is a file", notes: "the working folder or one above it",
             tmp_path: "the working folder or one above it",
             data_folder: "lies in --out"}
    for out, message in cases.items():
        data = data_folder / "train.csv" if out == data_folder else config.data
        with pytest.raises(BuildInputError, match=message):
            build(config.model_copy(update={"data": str(data)}), out, force=True)
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(BuildInputError, match=r"holds files that are no model \(notes.txt\)"):
        build(config, notes, force=True)
    assert (notes / "notes.txt").read_text() == "mine" and (tmp_path / "a-file").read_text() == "mine"
    assert (data_folder / "train.csv").is_file()
    link = tmp_path / "current"
    link.symlink_to(tiny_artifacts)
    with pytest.raises(BuildInputError, match="is a symbolic link: name the folder itself"):
        build(config, link, force=True)


def test_a_finished_build_takes_the_place_of_the_old_one_whole(tmp_path: Path) -> None:
    from shared.builder.build import _replace_folder

    out, staging = tmp_path / "model", tmp_path / "staging"
    for folder, name in ((out, "old.txt"), (staging, "new.txt")):
        folder.mkdir()
        (folder / name).write_text(name)
    _replace_folder(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "staging"]  # no .model.new or .model.old left


def test_a_changed_profile_is_not_a_cached_build(tiny_artifacts: Path, tmp_path: Path) -> None:
    from shared.builder.build import CONFIG_FILE, PROFILE_KEY, _profile_settings, _recorded_config

    def same(path: Path, config: BuildConfig) -> bool:  # what build() takes for a cached build
        recorded, profile = _recorded_config(path)
        return recorded == config and profile == _profile_settings(config)

    recorded = json.loads((tiny_artifacts / CONFIG_FILE).read_text())
    config = BuildConfig.model_validate(recorded)
    assert same(tiny_artifacts / CONFIG_FILE, config)
    for change in ({**recorded[PROFILE_KEY], "distillation_weight": 9.0}, None):
        changed = {**recorded, PROFILE_KEY: change} if change else {k: v for k, v in recorded.items()
                                                                    if k != PROFILE_KEY}
        (tmp_path / CONFIG_FILE).write_text(json.dumps(changed))
        assert not same(tmp_path / CONFIG_FILE, config)  # a release's profile changed, or an older file


def test_a_build_of_other_profile_settings_says_it_rebuilds(tiny_artifacts: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from shared.builder.build import CONFIG_FILE, PROFILE_KEY

    out = tmp_path / "old-release"
    shutil.copytree(tiny_artifacts, out)
    recorded = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({k: v for k, v in recorded.items() if k != PROFILE_KEY}))
    build(BuildConfig.model_validate(recorded), out)
    assert "other tiny profile settings than this release's" in capsys.readouterr().out
    assert json.loads((out / CONFIG_FILE).read_text())[PROFILE_KEY] == recorded[PROFILE_KEY]


def test_a_model_without_a_readable_build_config_is_not_replaced(tiny_artifacts: Path, tmp_path: Path) -> None:
    from shared.builder.build import CONFIG_FILE

    out = tmp_path / "model"
    shutil.copytree(tiny_artifacts, out)
    config = BuildConfig.model_validate_json((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text("{not json")
    with pytest.raises(BuildInputError, match=f"holds a model without a readable {CONFIG_FILE}: pass --out"):
        build(config, out)
    assert (out / CONFIG_FILE).read_text() == "{not json"


def test_manifest_round_trips(tiny_artifacts: Path, tmp_path: Path) -> None:
    from shared.contract.manifest import Manifest, save_manifest

    manifest = load_manifest(tiny_artifacts)
    save_manifest(manifest, tmp_path)
    assert Manifest.model_validate_json((tmp_path / "manifest.json").read_text()) == manifest


def test_tampered_slice_is_refused(tiny_artifacts: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, copy)
    manifest = load_manifest(copy)
    path = copy / manifest.slice("edge").file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        verified_slice_path(copy, manifest.slice("edge"))
    verified_slice_path(copy, manifest.slice("mobile"))  # untouched slices still load


def test_frozen_encoder_three_classes_csv(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "data3", num_classes=3, train=400, dev=90)
    csv_file = tmp_path / "all.csv"
    rows = (folder / "train.tsv").read_text().splitlines()[1:]
    csv_file.write_text("text,label\n" + "\n".join(r.replace("\t", ",") for r in rows) + "\n")
    out = build(BuildConfig(backbone=str(tiny_checkpoint), data=str(csv_file), profile="tiny",
                            split_points=(1, 2, 3), freeze_encoder=True, epochs=1), tmp_path / "m3")
    manifest = load_manifest(out)
    assert manifest.labels == ["0", "1", "2"]
    assert manifest.provenance.test_samples == 40  # 10% of the single file
    report = json.loads((out / "report.json").read_text())
    assert report["exits"][0]["accuracy"] >= 0.0


@pytest.mark.parametrize(("points", "message"), [
    ((2, 1, 3), "strictly increasing"),
    ((0, 2, 3), "strictly increasing"),
    ((1, 2, 5), "number of layers"),
])
def test_bad_split_points_say_what_to_fix(points: tuple[int, int, int], message: str) -> None:
    with pytest.raises(BuildInputError, match=message):
        check_split_points(points, 3)


def test_bad_data_says_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(BuildInputError, match="does not exist"):
        load_splits(tmp_path / "missing")
    bad = tmp_path / "cols.tsv"
    bad.write_text("words\tstars\nhello\t1\n")
    with pytest.raises(BuildInputError, match="text column"):
        read_table(bad)
    one = tmp_path / "one"
    one.mkdir()
    for name in ("train", "dev"):
        (one / f"{name}.tsv").write_text("sentence\tlabel\na\t1\nb\t1\n")
    with pytest.raises(BuildInputError, match="only one class"):
        load_splits(one)


def test_missing_backbone_is_reported(tmp_path: Path, tiny_data: Path) -> None:
    with pytest.raises(BuildInputError, match="not a Hugging Face checkpoint"):
        build(BuildConfig(backbone=str(tmp_path), data=str(tiny_data), profile="tiny"), tmp_path / "out")


def test_calibration_hold_out_leaves_no_phrase_of_it_in_training() -> None:
    from shared.data.text import TextDataset, hold_out_calibration

    sentences = [f"s{i} has a rather good plot and w{i} cast" for i in range(50)]
    phrases = [p for s in sentences for p in (s.split(" and ")[0], "a rather good plot", s.split()[-2])]
    texts = sentences + phrases
    data = TextDataset(texts, np.zeros(len(texts), dtype=np.int64), ["a"], "generated")
    fit, calib, _ = hold_out_calibration(data, 5, seed=0)
    assert len(calib) == 5
    assert set(calib.texts) <= set(sentences)  # whole examples only, never a phrase of another row
    for held in calib.texts:
        assert not any(f" {t} " in f" {held} " for t in fit.texts)
    # each held sentence takes its two own phrases along, and the 50 rows of the phrase all share
    assert len(fit) == len(texts) - 5 - 5 * 2 - 50
    # a holdout: more whole sentences, none of them calibration's, and no phrase of theirs in fit either
    fit, again, holdout = hold_out_calibration(data, 5, seed=0, holdout=7)
    assert again.texts == calib.texts  # asking for a holdout leaves the calibration split as it was
    assert len(holdout) == 7 and set(holdout.texts) <= set(sentences) and not set(holdout.texts) & set(calib.texts)
    for held in holdout.texts:
        assert not any(f" {t} " in f" {held} " for t in fit.texts)
    assert len(fit) == len(texts) - 12 - 12 * 2 - 50


def test_word_spans_are_whole_words_in_order_and_long_texts_hold_out_fast() -> None:
    from shared.data.text import TextDataset, WordSpans, hold_out_calibration

    spans = WordSpans(["a b c d", "x y"])
    assert {t: t in spans for t in ("b c", "a b c d", "x", "y", "b d", "c d x", "bc", "a b c d e", "")} == {
        "b c": True, "a b c d": True, "x": True, "y": True, "b d": False, "c d x": False, "bc": False,
        "a b c d e": False, "": False}
    # reviews of 2,000 words: every span of every calibration text was a set of ~2M strings per text
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{j}" for j in rng.integers(0, 5000, 2000)) for _ in range(60)]
    texts.append(" ".join(texts[0].split()[100:140]))  # a phrase of one review
    data = TextDataset(texts, np.zeros(len(texts), dtype=np.int64), ["a"], "generated")
    fit, calib, _ = hold_out_calibration(data, 12, seed=0)
    assert len(calib) == 12 and len(fit) == len(texts) - 12 - (texts[0] in calib.texts)


def test_holdout_is_evaluated_written_and_refreshed_by_retune(tiny_checkpoint: Path, tiny_data: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    from shared.tools.cli import main
    from shared.tools.demo import load_labeled
    from tests.conftest import TINY_LABELS

    config = BuildConfig(backbone=str(tiny_checkpoint), data=str(tiny_data), profile="tiny", split_points=(1, 2, 3),
                         label_names=TINY_LABELS, max_length=32, holdout_samples=100)
    out = build(config, tmp_path / "model")
    printed = capsys.readouterr().out
    assert "holdout: 100 more whole examples" in printed and "on 100 held-out examples of train" in printed
    figures = json.loads((out / "report.json").read_text())["holdout"]
    assert figures["samples"] == 100 and abs(sum(figures["exit_fraction"]) - 1) < 1e-9
    texts, labels, _ = load_labeled(str(out / "holdout.tsv"), None, load_manifest(out), out)
    with np.load(out / "holdout_logits.npz") as saved:
        assert len(texts) == 100 and (labels == saved["labels"]).all()
    assert set(texts) <= {line.split("\t")[0] for line in (tiny_data / "train.tsv").read_text().splitlines()}
    # never exit early: every held-out sample answers at the cloud, and the report says so
    assert main(["retune", "--artifacts", str(out), "--in-place", "--policy", "p_tar", "--p-tar", "1", "1"]) == 0
    refreshed = json.loads((out / "report.json").read_text())["holdout"]
    assert refreshed["exit_fraction"] == [0.0, 0.0, 1.0] and refreshed["accuracy_drop_points"] == 0.0
    assert "held-out examples of train" in capsys.readouterr().out


def test_holdout_and_a_calibration_fraction_are_refused_for_an_image_model(tmp_path: Path) -> None:
    with pytest.raises(BuildInputError, match="--holdout-samples is for text models"):
        build(BuildConfig(family="image", holdout_samples=10), tmp_path / "out")
    with pytest.raises(BuildInputError, match="--calibration-fraction is for text models.*--calibration-samples"):
        build(BuildConfig(family="image", calibration_fraction=0.2), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_retune_switches_policy_without_retraining(tiny_artifacts: Path, tmp_path: Path) -> None:
    import shutil

    from shared.tools.cli import main

    copy = tmp_path / "retuned"
    shutil.copytree(tiny_artifacts, copy)
    assert main(["retune", "--artifacts", str(copy), "--in-place", "--policy", "cost", "--max-drop", "0.5"]) == 0
    manifest = load_manifest(copy)
    assert manifest.policy.kind == "cost" and manifest.policy.max_drop_points == 0.5
    assert manifest.policy.delta == 0.1  # the default guarantee, recorded
    assert manifest.policy.drop_bound_points is not None and manifest.policy.drop_bound_points <= 0.5
    assert main(["retune", "--artifacts", str(copy), "--in-place", "--policy", "cost", "--max-drop", "0.5",
                 "--delta", "0.3"]) == 0
    assert load_manifest(copy).policy.delta == 0.3
    with pytest.raises(SystemExit):  # argparse: "delta 1.0 must be in (0, 1)"
        main(["retune", "--artifacts", str(copy), "--in-place", "--policy", "cost", "--delta", "1"])
    for spec in manifest.slices:
        verified_slice_path(copy, spec)  # slices untouched
    assert main(["retune", "--artifacts", str(copy), "--in-place", "--policy", "p_tar", "--p-tar", "0.99", "0.99"]) == 0
    strict = load_manifest(copy)
    assert strict.policy.kind == "p_tar" and strict.policy.p_tar == {"mobile": 0.99, "edge": 0.99}
    assert strict.exits[0].threshold >= manifest.exits[0].threshold or strict.exits[0].threshold > 1
    assert main(["retune", "--artifacts", str(copy), "--in-place", "--policy", "p_tar", "--p-tar", "0.7,0.75",
                 "--target", "consistency"]) == 0
    agree = load_manifest(copy).policy
    assert agree.target == "consistency" and agree.p_tar == {"mobile": 0.7, "edge": 0.75}
    assert all(b >= agree.p_tar[t] for t, b in agree.bound.items())


def test_retune_refuses_bad_budgets_costs_and_its_own_folder_as_out(tiny_artifacts: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from shared.tools.cli import main

    copy = tmp_path / "model"
    shutil.copytree(tiny_artifacts, copy)
    before = (copy / "manifest.json").read_text()
    for flags in (["--max-drop", "-1"], ["--max-drop", "nan"], ["--hop-cost", "-1", "0.3", "0.3"],
                  ["--layer-cost", "0.1", "0.1", "inf"]):
        with pytest.raises(SystemExit) as stopped:  # argparse, naming the flag
            main(["retune", "--artifacts", str(copy), "--in-place", *flags])
        assert stopped.value.code == 2 and flags[0] in capsys.readouterr().err
    assert main(["retune", "--artifacts", str(copy), "--in-place", "--layer-cost", "0", "0", "0",
                 "--hop-cost", "0", "0", "0"]) == 2
    assert "cloud-only free" in capsys.readouterr().err
    assert main(["retune", "--artifacts", str(copy), "--in-place", "--p-tar", "0.8"]) == 2  # the default is cost
    assert "--p-tar applies to --policy p_tar, and the policy is cost (the default): add --policy p_tar" in \
        capsys.readouterr().err
    assert main(["retune", "--artifacts", str(copy), "--in-place", "--policy", "p_tar", "--max-drop", "1",
                 "--target", "consistency"]) == 2
    assert "--max-drop applies to --policy cost" in capsys.readouterr().err
    assert main(["build", "--data", str(copy), "--out", str(tmp_path / "x"), "--target", "consistency"]) == 2
    assert "tierserve build: --target applies to --policy p_tar" in capsys.readouterr().err
    assert main(["retune", "--artifacts", str(copy), "--out", str(copy)]) == 2  # its own folder: --in-place says so
    assert "--in-place" in capsys.readouterr().err
    assert (copy / "manifest.json").read_text() == before


def test_manifest_without_the_guarantee_fields_still_loads(tiny_artifacts: Path, tmp_path: Path) -> None:
    """A manifest written before delta and the bounds existed (it had drop_confidence instead)."""
    from shared.contract.manifest import Manifest

    data = json.loads((tiny_artifacts / "manifest.json").read_text())
    data["policy"] = {"kind": "cost", "p_tar": {}, "max_drop_points": 0.3, "drop_confidence": 0.9,
                      "expected_cost": 0.6, "expected_accuracy": 0.85}
    old = Manifest.model_validate(data)
    assert old.policy.kind == "cost" and old.policy.delta is None and old.policy.bound == {}
    assert old.policy.target == "accuracy" and old.policy.drop_bound_points is None


def test_report_records_the_guarantee_and_calibration_intervals(tiny_artifacts: Path) -> None:
    report = json.loads((tiny_artifacts / "report.json").read_text())
    policy = report["policy"]
    assert policy["kind"] == "p_tar" and policy["delta"] == 0.1 and policy["target"] == "accuracy"
    for tier, bound in policy["bound"].items():
        assert bound >= policy["p_tar"][tier]
    for e in report["exits"]:
        lo, hi = e["ece_after_interval"]
        assert lo <= e["ece_after"] <= hi
        assert len(e["temperature_folds"]) == 5
        assert e["temperature_kept"] == (e["calibration_nll_after"] < e["calibration_nll_before"])


def test_default_policy_is_dimee_operating_point() -> None:
    from shared.builder.config import BuildConfig
    from shared.builder.report import summary_text
    from shared.contract.manifest import PolicySpec

    config = BuildConfig()
    assert config.policy == "cost" and config.max_drop_points == 0.3 and config.delta == 0.1
    spec = PolicySpec(kind="cost", max_drop_points=0.3, delta=0.1, drop_bound_points=0.27)
    report = {"exits": [], "system_accuracy": 0.9, "final_accuracy": 0.9, "accuracy_drop_points": 0.0,
              "relative_cost": 0.7, "build_seconds": 1.0, "test_split": "dev", "policy": spec.model_dump()}
    text = summary_text(report)
    assert "cost-aware (DIMEE): accuracy drop <= 0.3 points" in text and "delta 0.1" in text


def test_distillation_teaches_the_early_exits_without_training_the_teacher() -> None:
    import torch

    from shared.builder.train import distillation_loss

    final = torch.tensor([[2.0, -1.0], [0.5, 0.3]], requires_grad=True)
    agreeing = final.detach().clone().requires_grad_(True)
    assert distillation_loss([agreeing, final]).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_loss([final]).item() == 0.0  # a single exit has no student
    early = torch.tensor([[-1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    loss = distillation_loss([early, agreeing, final])
    # KL(teacher || student) per sample, averaged over samples and then over the early exits
    p = torch.softmax(final.detach(), -1)
    expected = [(p * (p.log() - torch.log_softmax(x.detach(), -1))).sum(-1).mean() for x in (early, agreeing)]
    assert loss.item() == pytest.approx(float(sum(expected)) / 2, rel=1e-6)
    loss.backward()
    assert final.grad is None  # the teacher's answer is detached: the final head learns from labels only
    assert early.grad is not None and early.grad.abs().sum() > 0
    # the first row's student puts its weight on the wrong class: the gradient pushes it toward class 0
    assert early.grad[0, 0] < 0 < early.grad[0, 1]
