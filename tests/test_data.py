"""Bring your own data (issue 23): any CSV/TSV, header or not, named columns, real quoting, splits,
--labels checked against the data, default output folders, retune --out, and the messages on the way."""

from __future__ import annotations

import csv
import io
import json
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from shared.data import text as text_data
from shared.data.text import Columns, load_splits, name_labels, read_table
from shared.errors import BuildInputError
from shared.tools.cli import main

# class ids as AG News spells them, and the words of each class (all in the tiny tokenizer's vocabulary)
NEWS_CLASSES = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
CLASS_WORDS = {"1": ["w0", "w1", "w2", "w3"], "2": ["w4", "w5", "w6", "w7"], "3": ["w8", "w9", "w10", "w11"],
               "4": ["w12", "w13", "w14", "w15"]}
FILLER = [f"w{i}" for i in range(16, 40)] + ["the", "a", "story", "it", "is"]


def news_rows(n: int, seed: int = 0) -> list[list[str]]:
    """class, title, description; descriptions hold embedded quotes and tabs (a csv.writer must quote them)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = str(1 + i % 4)
        words = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(4, 12)))]
        for w in rng.choice(CLASS_WORDS[label], size=int(rng.integers(1, 3))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        title = " ".join(words[:3])
        description = " ".join(words[3:])
        if i % 3 == 0:
            description = f'it said "{description}"'  # quotes inside a field
        if i % 5 == 0:
            description = f"{description}\tmore"  # a tab inside a field
        rows.append([label, title, description])
    return rows


def write_rows(path: Path, rows: list[list[str]], delimiter: str = ",", header: list[str] | None = None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


NEWS = Columns(text=("1", "2"), label="0", header=False)


# ---- reading files


def test_empty_texts_and_other_encodings_are_refused_with_their_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("sentence,label\ngood,1\n  ,0\nbad,0\n,1\n")
    with pytest.raises(BuildInputError, match=r"empty.csv:3: empty text \(columns \[0\]\); 2 row\(s\)"):
        read_table(empty)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tlabel\na\tb\t1\nc\t\t0\n")
    with pytest.raises(BuildInputError, match="pairs.tsv:3: empty text"):
        read_table(pairs)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("sentence,label\ngood,1\nun caf\u00e9,0\n".encode("latin-1"))
    with pytest.raises(BuildInputError, match=r"latin1.csv:3: not UTF-8 text \(byte 0xe9\): save the file as UTF-8"):
        read_table(latin1)


def test_headerless_file_names_its_first_row_and_says_how_to_name_columns(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "news.csv", news_rows(20))
    with pytest.raises(BuildInputError) as caught:
        read_table(path)
    message = str(caught.value)
    assert "the first row ['1', " in message and "names no text column and no label column" in message
    assert "--no-header" in message and "--text-column" in message and "--label-column" in message
    with pytest.raises(BuildInputError, match="say where the text and the label are"):
        read_table(path, columns=Columns(header=False))


def test_headerless_columns_by_position_join_title_and_description(tmp_path: Path) -> None:
    rows = news_rows(40)
    data = read_table(write_rows(tmp_path / "news.csv", rows), columns=NEWS)
    assert data.texts == [f"{r[1].strip()} {r[2].strip()}" for r in rows]
    assert data.label_names == ["1", "2", "3", "4"]
    assert [data.label_names[i] for i in data.labels] == [r[0] for r in rows]


def test_quoted_tsv_written_by_csv_writer_round_trips(tmp_path: Path) -> None:
    rows = news_rows(60)
    rows[7][2] = 'a "quoted" word,\tand a tab'
    rows[8][2] = '"starts with a quote" and goes on'
    path = write_rows(tmp_path / "news.tsv", rows, delimiter="\t", header=["class", "title", "description"])
    assert '"""starts' in path.read_text()  # the writer quoted it
    data = read_table(path, columns=Columns(text=("description",), label="class"))
    assert data.texts == [r[2].strip() for r in rows]
    assert not any('""' in t for t in data.texts)


def test_raw_glue_tsv_keeps_its_unbalanced_quotes(tmp_path: Path) -> None:
    path = tmp_path / "glue.tsv"
    path.write_text('\ufeffsentence\tlabel\n"the film" is fine\t1\nhe said "no\t0\nplain\t1\n', encoding="utf-8")
    data = read_table(path)
    assert data.texts == ['"the film" is fine', 'he said "no', "plain"]  # byte-order mark dropped, quotes kept
    strict = read_table(path, columns=Columns(quoting="none"))
    assert strict.texts == data.texts
    with pytest.raises(BuildInputError, match="--quoting none"):
        read_table(path, columns=Columns(quoting="csv"))


def test_named_columns_and_bad_column_names(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "named.csv", news_rows(10), header=["Class", "Title", "Description"])
    data = read_table(path, columns=Columns(text=("title", "Description"), label="class"))
    assert len(data) == 10 and data.label_names == ["1", "2", "3", "4"]
    by_position = read_table(path, columns=Columns(text=("1", "2"), label="0"))
    assert by_position.texts == data.texts
    with pytest.raises(BuildInputError, match="no column 'body'"):
        read_table(path, columns=Columns(text=("body",), label="class"))
    with pytest.raises(BuildInputError, match="out of range"):
        read_table(path, columns=Columns(text=("7",), label="class"))
    with pytest.raises(BuildInputError, match="both the label and a text column"):
        read_table(path, columns=Columns(text=("0",), label="class"))
    short = tmp_path / "short.csv"
    short.write_text("label,text\n1,fine\n2\n")
    with pytest.raises(BuildInputError, match=r"short.csv:3: 1 column"):
        read_table(short)


# ---- splits


def test_a_folder_with_train_and_test_is_used_as_given(tmp_path: Path) -> None:
    folder = tmp_path / "news"
    folder.mkdir()
    write_rows(folder / "train.csv", news_rows(40, seed=1))
    write_rows(folder / "test.csv", news_rows(12, seed=2))
    train, test = load_splits(folder, NEWS)
    assert (len(train), len(test)) == (40, 12)
    assert test.source == str(folder / "test.csv") and not test.portion
    write_rows(folder / "dev.csv", news_rows(8, seed=3))  # dev first: GLUE's test.tsv has no labels
    assert len(load_splits(folder, NEWS)[1]) == 8


def test_a_single_file_is_split_90_10_and_says_so(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "news.csv", news_rows(200))
    train, test = load_splits(path, NEWS)
    assert (len(train), len(test)) == (180, 20)
    assert train.describe() == f"{path} (90% of its 200 rows, seeded)"
    assert test.describe() == f"{path} (the other 10%, held out)"
    assert not set(train.texts) & set(test.texts)
    assert len(load_splits(path, NEWS, test_fraction=0.25)[1]) == 50


def test_calibration_size_is_the_profiles_capped_at_a_fifth_of_train() -> None:
    assert text_data.calibration_size(1500, 67349) == 1500
    assert text_data.calibration_size(1500, 6000) == 1200
    assert text_data.calibration_size(200, 400) == 80
    assert text_data.calibration_size(160, 400, max_share=0.4) == 160  # --calibration-fraction 0.4: its own cap


def test_calibration_fraction_holds_out_that_share(tmp_path: Path) -> None:
    train, _ = load_splits(write_rows(tmp_path / "news.csv", news_rows(500)), NEWS)
    fit, calib, _ = text_data.hold_out_calibration(train, round(0.4 * len(train)), seed=0, max_share=0.4)
    assert (len(calib), len(fit)) == (180, 270)
    assert not set(calib.texts) & set(fit.texts)


def test_calibration_samples_and_fraction_together_are_refused(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--data", str(tmp_path / "x.csv"), "--calibration-samples", "100",
                 "--calibration-fraction", "0.3"]) == 2
    assert "--calibration-samples or --calibration-fraction, not both" in capsys.readouterr().err


# ---- --labels


def _news_splits(tmp_path: Path) -> tuple[text_data.TextDataset, text_data.TextDataset]:
    rows = [[NEWS_CLASSES[r[0]], r[1], r[2]] for r in news_rows(80)]
    return load_splits(write_rows(tmp_path / "named.csv", rows), NEWS)


def test_labels_are_checked_against_the_data_never_renamed_by_position(tmp_path: Path) -> None:
    train, test = _news_splits(tmp_path)
    assert train.label_names == ["Business", "Sci/Tech", "Sports", "World"]  # sorted
    # the dataset's own class order: the classes take that order, each keeps its own name
    order = ["World", "Sports", "Business", "Sci/Tech"]
    train2, test2, names = name_labels(train, test, order)
    assert names == order
    for before, after in ((train, train2), (test, test2)):
        assert [after.label_names[i] for i in after.labels] == [before.label_names[i] for i in before.labels]
    with pytest.raises(BuildInputError) as caught:
        name_labels(train, test, ["World", "Sports", "Business", "Science"])
    message = str(caught.value)
    assert "['Business', 'Sci/Tech', 'Sports', 'World']" in message  # the data's labels
    assert "not in the data: ['Science']" in message and "not named: ['Sci/Tech']" in message
    with pytest.raises(BuildInputError, match="LABEL=NAME"):
        name_labels(train, test, ["a", "b", "c", "d"])  # four names for four sorted labels: refused


def test_labels_rename_with_label_equals_name_and_class_ids_in_order(tmp_path: Path) -> None:
    train, test = load_splits(write_rows(tmp_path / "news.csv", news_rows(80)), NEWS)
    spec = [f"{k}={v}" for k, v in NEWS_CLASSES.items()]
    train2, _, names = name_labels(train, test, spec)
    assert names == list(NEWS_CLASSES.values()) and train2.raw_labels == list(NEWS_CLASSES)
    assert [names[i] for i in train2.labels] == [NEWS_CLASSES[train.label_names[i]] for i in train.labels]
    with pytest.raises(BuildInputError, match=r"not in the data: \['5'\]"):
        name_labels(train, test, [*spec[:3], "5=Other"])
    # 1..4 are not class ids 0..K-1: plain names are refused, not mapped by position
    with pytest.raises(BuildInputError, match="1=NAME,2=NAME"):
        name_labels(train, test, list(NEWS_CLASSES.values()))
    zero = text_data.TextDataset(["a", "b"], np.array([0, 1]), ["0", "1"], "x", raw_labels=["0", "1"])
    _, _, named = name_labels(zero, zero, ["negative", "positive"])
    assert named == ["negative", "positive"]


# ---- no data at all


def test_failed_download_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(text_data, "DEFAULT_SST2", tmp_path / "no-shared" / "sst2")
    monkeypatch.setattr(text_data, "CACHE_DIR", tmp_path / "cache")

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(text_data.urllib.request, "urlopen", offline)
    with pytest.raises(BuildInputError, match="pass --data FILE.csv"):
        load_splits(None)
    capsys.readouterr()
    status = main(["build", "--backbone", str(tiny_checkpoint), "--profile", "tiny", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "Temporary failure in name resolution" in err and "--data" in err


# ---- the build on a news-topic CSV, with flags only


def test_build_reads_a_headerless_news_csv_with_flags_only(tiny_checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from shared.contract.manifest import load_manifest

    news = write_rows(tmp_path / "news.csv", news_rows(600))
    base = ["build", "--backbone", str(tiny_checkpoint), "--profile", "tiny", "--split-points", "1,2,3",
            "--max-length", "32", "--data", str(news)]
    assert main([*base, "--out", str(tmp_path / "refused")]) == 2
    assert "--no-header" in capsys.readouterr().err
    flags = ["--no-header", "--label-column", "0", "--text-column", "1,2",
             "--labels", ",".join(f"{k}={v}" for k, v in NEWS_CLASSES.items())]
    out = tmp_path / "news-model"
    assert main([*base, *flags, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"data: train 540 rows from {news} (90% of its 600 rows, seeded)" in printed
    assert "calibration: 108 held out of train (200 asked, capped at a fifth of train's 540 rows)" in printed
    assert f"test: 60 rows from {news} (the other 10%, held out)" in printed
    assert "classes: 1=World, 2=Sports, 3=Business, 4=Sci/Tech" in printed
    assert "one file: 10% of it is the test split" in printed
    assert f"trained on 432 sentences from {news} (90% of its 600 rows, seeded), calibrated on 108 held out " \
           f"of train, evaluated on the test split (60 from {news} (the other 10%, held out))" in printed
    assert "built in" in printed and " s on " not in printed
    assert "UNEXPECTED" not in printed
    manifest = load_manifest(out)
    assert manifest.labels == ["World", "Sports", "Business", "Sci/Tech"]
    report = json.loads((out / "report.json").read_text())
    assert report["data_labels"] == ["1", "2", "3", "4"]
    assert report["final_accuracy"] > 0.5  # four classes, learnable: training happened on the joined text
    assert (out / "test_logits.npz").is_file()

    # another dataset into the same folder is refused without --force
    other = write_rows(tmp_path / "other.csv", news_rows(300, seed=5))
    again = ["build", "--backbone", str(tiny_checkpoint), "--profile", "tiny", "--split-points", "1,2,3",
             "--max-length", "32", "--data", str(other), *flags, "--out", str(out)]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert "holds a model trained on other data" in err and "--force" in err and str(news) in err
    assert load_manifest(out).provenance.data == str(news)

    # the demo reads a file of the build's layout as the build did, and maps 1..4 to the model's names
    from shared.tools.demo import load_labeled

    texts, labels, _ = load_labeled(str(news), 10, manifest, out)
    rows = news_rows(600)[:10]
    assert list(texts) == [f"{r[1].strip()} {r[2].strip()}" for r in rows]
    assert [manifest.labels[i] for i in labels] == [NEWS_CLASSES[r[0]] for r in rows]


def test_build_flags_reach_the_config(tmp_path: Path) -> None:
    from shared.tools.build_command import default_out

    assert default_out("text", None) == Path("artifacts/default")
    assert default_out("text", "data/news.csv") == Path("artifacts/news")
    assert default_out("text", "/data/ag news/") == Path("artifacts/ag-news")
    assert default_out("text", "x/default.tsv") == Path("artifacts/default-data")
    assert default_out("image", None) == Path("artifacts/fashion-mnist")
    assert main(["build", "--data", "x.csv", "--test-fraction", "1.5"]) == 2


def test_a_bad_distillation_weight_is_refused_before_any_work(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    for weight in ("-1", "inf", "nan"):
        assert main(["build", "--distillation-weight", weight, "--out", str(tmp_path / "never")]) == 2
        assert "distillation_weight" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_build_help_names_the_data_flags_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--text-column", "--label-column", "--no-header", "--quoting", "--labels", "--test-fraction",
                 "--calibration-samples", "artifacts/<name of --data>", "(default: 0.1)", "(default: auto)"):
        assert flag in text, flag


# ---- progress off a terminal


def test_progress_off_a_terminal_is_a_line_every_interval() -> None:
    from shared.builder.train import LineProgress, progress

    stream = io.StringIO()
    bar = progress(500, stream=stream)
    assert isinstance(bar, LineProgress)
    bar.interval = 3600.0
    with bar:
        for _ in range(500):
            bar.set_postfix(loss="0.5")
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("train: 500/500 batches (100%)")


# ---- retune


def test_retune_writes_a_new_folder_with_manifest_and_report_together(tiny_artifacts: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from shared.contract.manifest import load_manifest

    source = tmp_path / "model"
    shutil.copytree(tiny_artifacts, source)
    before = (source / "manifest.json").read_text(), (source / "report.json").read_text()
    with pytest.raises(SystemExit):  # neither --out nor --in-place
        main(["retune", "--artifacts", str(source), "--policy", "p_tar"])
    out = tmp_path / "retuned"
    assert main(["retune", "--artifacts", str(source), "--out", str(out), "--policy", "p_tar", "--p-tar",
                 "0.99"]) == 0
    assert ((source / "manifest.json").read_text(), (source / "report.json").read_text()) == before
    manifest = load_manifest(out)
    report = json.loads((out / "report.json").read_text())
    assert report["policy"] == manifest.policy.model_dump()
    assert [e["threshold"] for e in report["exits"][:-1]] == [e.threshold for e in manifest.exits[:-1]]
    assert sum(e["exit_fraction"] for e in report["exits"]) == pytest.approx(1.0)
    assert report["retuned"] and "stale" not in report
    # the refreshed figures are the ones a build with these thresholds reports: same routing on the test logits
    from shared.contract.calibration import softmax
    from shared.contract.policy import route

    with np.load(out / "test_logits.npz") as data:
        probs = [softmax(data[f"exit{i}"], e.temperature) for i, e in enumerate(manifest.exits)]
        labels = data["labels"]
    r = route(probs, [e.threshold for e in manifest.exits[:-1]])
    assert report["system_accuracy"] == pytest.approx(float(np.mean(r.prediction == labels)), abs=1e-12)
    assert main(["retune", "--artifacts", str(source), "--out", str(out), "--policy", "p_tar"]) == 2
    assert "exists" in capsys.readouterr().err


def test_retune_help_shows_the_default_policy_and_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["retune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "DIMEE's operating point" in text and "--policy cost --max-drop 0.3 --delta 0.1" in text
    for flag in ("--out", "--in-place", "--layer-cost", "--hop-cost", "--p-tar", "--target", "(default: cost)",
                 "(default: artifacts/default)"):
        assert flag in text, flag


# ---- the demo's model path


def test_demo_names_the_path_it_looked_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere"
    assert main(["demo", "--artifacts", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{missing / 'manifest.json'} does not exist" in err and f"tierserve build --out {missing}" in err


def test_demo_default_falls_back_to_the_checkout(tiny_artifacts: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.tools import demo

    checkout = tmp_path / "checkout"
    shutil.copytree(tiny_artifacts, checkout / "artifacts" / "default")
    monkeypatch.setattr(text_data, "REPO_ROOT", checkout)
    monkeypatch.chdir(tmp_path)
    assert demo.find_artifacts(demo.DEFAULT_ARTIFACTS) == (checkout / "artifacts" / "default").resolve()
    shutil.rmtree(checkout)
    with pytest.raises(Exception, match=r"neither .*manifest.json nor .*manifest.json exists"):
        demo.find_artifacts(demo.DEFAULT_ARTIFACTS)


def test_demo_compares_with_the_report_only_on_the_whole_test_split(tmp_path: Path) -> None:
    from shared.tools.demo import _report_comparison

    data = tmp_path / "dev.tsv"
    report = {"system_accuracy": 0.89, "test_split": str(data), "exits": [{"tier": "mobile", "threshold": 0.9}],
              "provenance": {"test_samples": 872}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    results = {"samples": 872, "accuracy": 0.89, "thresholds": {"mobile": 0.9}}
    assert _report_comparison(tmp_path, str(data), {}, results)["equal"]
    limited = {**results, "samples": 64, "accuracy": 0.97}  # --limit 64: not the report's split
    assert not _report_comparison(tmp_path, str(data), {}, limited)["comparable"]


def test_retune_of_a_build_without_test_logits_marks_the_report_stale(tiny_artifacts: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_artifacts, old)
    (old / "test_logits.npz").unlink()  # a model built before the file existed
    built = json.loads((old / "report.json").read_text())
    assert main(["retune", "--artifacts", str(old), "--in-place", "--policy", "p_tar", "--p-tar", "0.99"]) == 0
    report = json.loads((old / "report.json").read_text())
    assert report["policy"]["p_tar"] == {"mobile": 0.99, "edge": 0.99}
    assert "rebuild to refresh" in report["stale"]
    assert report["system_accuracy"] == built["system_accuracy"]  # the build's, and marked so


def test_loading_a_backbone_with_a_pooler_prints_no_load_report(tmp_path: Path, capfd: pytest.CaptureFixture[str]
                                                                 ) -> None:
    """Checkpoints such as MiniLM carry pooler weights the early-exit model does not use: expected, not alarming."""
    from transformers import BertConfig, BertModel

    from shared.builder.model import load_encoder

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=True).save_pretrained(tmp_path)
    capfd.readouterr()
    model = load_encoder(str(tmp_path))
    out, err = capfd.readouterr()
    assert model.pooler is None
    assert "UNEXPECTED" not in out + err and "pooler" not in out + err and "LOAD REPORT" not in out + err


def test_image_labels_are_not_renamed_over_the_datas_own_names(tmp_path: Path) -> None:
    from shared.builder.build import BuildConfig, build
    from tests.tiny_images import make_npz_dataset

    data = make_npz_dataset(tmp_path / "npz", train=60, test=20)  # names class0..class2 in train.npz
    config = BuildConfig(family="image", data=str(data), profile="tiny", split_points=(1, 2, 3),
                         label_names=["class2", "class1", "class0"])
    with pytest.raises(BuildInputError, match=r"does not match the class names .*\['class0', 'class1', 'class2'\]"):
        build(config, tmp_path / "model")
