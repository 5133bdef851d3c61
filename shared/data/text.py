"""Labeled text datasets for the builder, the demo and bench/: any delimited file, or a folder of splits.

Accepted by `load_splits`:
- a folder with train.{tsv,csv} and an evaluation split, dev.{tsv,csv} or else test.{tsv,csv}
  (dev first: GLUE's own test.tsv has no labels);
- one .tsv or .csv file, split 90/10 (seeded; `TEST_FRACTION`) into train and test, which the
  build prints.
Each file has a header naming a text column (sentence, text or review), or a pair of them
(sentence1 + sentence2, #1 String + #2 String, question + sentence, question1 + question2,
premise + hypothesis: GLUE's layouts), and a label column (label, labels or Quality), or its
columns are named by a `Columns`: by header name or 0-based position, several text columns joined
with a space (title + description), a second text for sentence pairs, or no header at all
(`--no-header`).
Quoting follows Python's csv module (a TSV written by csv.writer round-trips); a file that only
parses as raw text (GLUE's TSVs hold unbalanced quotes) is read without quote handling.
With no path, ../shared/data/sst2 beside the repo is used, else SST-2 is fetched from GLUE, and a
failed fetch says how to pass --data.

Sentence pairs are a second text of their own (`TextDataset.second_texts` beside `texts`), never a
separator convention: the tokenizer pairs them.
"""

from __future__ import annotations

import csv
import io
import re
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from shared.errors import BuildInputError

TEXT_COLUMNS = ("sentence", "text", "review")
# header names of sentence-pair datasets (GLUE: RTE, WNLI; MRPC; QNLI; QQP; MNLI-style), looked for first
PAIR_COLUMNS = (("sentence1", "sentence2"), ("#1 string", "#2 string"), ("question", "sentence"),
                ("question1", "question2"), ("premise", "hypothesis"))
LABEL_COLUMNS = ("label", "labels", "quality")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SST2 = REPO_ROOT.parent / "shared" / "data" / "sst2"
GLUE_SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
CACHE_DIR = Path.home() / ".cache" / "tierserve" / "data"
TEST_FRACTION = 0.1  # a single file: this share of its rows (seeded) is the test split
SPLIT_SEED = 0
CALIBRATION_SHARE = 0.2  # a calibration count takes at most this share of train, so training keeps most of it
Quoting = Literal["auto", "csv", "none"]

@dataclass(frozen=True)
class Columns:
    """Which columns of a delimited file hold the text and the label, and how to read it.

    `text`: header names or 0-based positions; several are joined with a space (empty: a pair of
    PAIR_COLUMNS, else the first of TEXT_COLUMNS in the header). `second_text`: the same for the
    second text of a sentence pair (empty: single texts, unless the header names a pair and `text` is
    not given). `label`: a name or position (None: the first of LABEL_COLUMNS).
    `header`: whether the first row names the columns. `quoting`: csv (Python's csv module, quotes
    doubled), none (raw text), auto (csv unless the file parses only as raw text).
    """

    text: tuple[str, ...] = ()
    label: str | None = None
    header: bool = True
    quoting: Quoting = "auto"
    second_text: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextDataset:
    texts: list[str]
    labels: np.ndarray  # int64 indices into label_names
    label_names: list[str]
    source: str  # the file read
    portion: str = ""  # which part of `source` this is, when not all of it (a single file's split)
    raw_labels: list[str] = field(default_factory=list)  # the label strings as in the file, per class
    second_texts: list[str] | None = None  # sentence pairs: the second text of each pair

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray, portion: str | None = None) -> TextDataset:
        second = None if self.second_texts is None else [self.second_texts[i] for i in index]
        return replace(self, texts=[self.texts[i] for i in index], labels=self.labels[index], second_texts=second,
                       portion=self.portion if portion is None else portion)

    def describe(self) -> str:
        return f"{self.source} ({self.portion})" if self.portion else self.source


def read_table(path: Path, label_names: list[str] | None = None, columns: Columns | None = None) -> TextDataset:
    """One delimited file -> texts and labels. Classes are the file's label strings, sorted (numbers
    numerically), unless `label_names` gives the classes (then every label must be one of them)."""
    columns = columns or Columns()
    path = Path(path)
    if not path.is_file():
        raise BuildInputError(f"data file {path} does not exist")
    rows = _read_rows(path, columns.quoting)
    if not rows:
        raise BuildInputError(f"{path} is empty")
    first_line, first = rows[0]
    body = rows[1:] if columns.header else rows
    text_at, second_at, label_at = _resolve_columns(path, first if columns.header else None, first, columns)
    needed = max([*text_at, *second_at, label_at]) + 1
    texts, seconds, raw = [], [], []
    for line, row in body:
        if len(row) < needed:
            where = f"text in {list(text_at)}" + (f", second text in {list(second_at)}" if second_at else "")
            raise BuildInputError(
                f"{path}:{line}: {len(row)} column(s), need {needed} ({where}, label in {label_at}); row: {_show(row)}")
        label = row[label_at].strip()
        if not label:
            raise BuildInputError(f"{path}:{line}: empty label (column {label_at})")
        texts.append(_joined(row, text_at))
        if second_at:
            seconds.append(_joined(row, second_at))
        if not texts[-1] or (second_at and not seconds[-1]):  # the tiers refuse an empty text: no model learns one
            empty = sum(not _joined(other, text_at) or bool(second_at) and not _joined(other, second_at)
                        for _, other in body if len(other) >= needed)
            raise BuildInputError(f"{path}:{line}: empty text (columns {list(text_at) + list(second_at)}); {empty} "
                                  "row(s) of the file have none: remove them")
        raw.append(label)
    if not texts:
        raise BuildInputError(f"{path} has a header but no rows")
    names = label_names or sorted(set(raw), key=_label_sort_key)
    unknown = sorted(set(raw) - set(names), key=_label_sort_key)
    if unknown:
        raise BuildInputError(f"{path}: labels {unknown[:5]} do not occur in the training data {names}")
    index = {name: i for i, name in enumerate(names)}
    return TextDataset(texts, np.array([index[x] for x in raw], dtype=np.int64), list(names), str(path),
                       raw_labels=list(names), second_texts=seconds if second_at else None)


def _joined(row: Sequence[str], columns: Sequence[int]) -> str:
    """A row's text from its text columns, stripped and joined by spaces ("" if all are empty)."""
    return " ".join(part for part in (row[i].strip() for i in columns) if part)


def _read_rows(path: Path, quoting: Quoting) -> list[tuple[int, list[str]]]:
    """Non-empty rows with their line numbers. auto: csv quoting, unless that fails (an unbalanced quote)
    or gives rows of uneven width where raw reading gives even ones."""
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (GLUE's MRPC) is not part of a column
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise BuildInputError(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}): save the file as "
                              "UTF-8") from None
    if quoting != "auto":
        return _parse(path, text, delimiter, quoting)
    try:
        quoted = _parse(path, text, delimiter, "csv")
    except BuildInputError:
        return _parse(path, text, delimiter, "none")
    if len({len(r) for _, r in quoted}) > 1:
        raw = _parse(path, text, delimiter, "none")
        if len({len(r) for _, r in raw}) == 1:
            return raw
    return quoted


def _parse(path: Path, text: str, delimiter: str, quoting: Quoting) -> list[tuple[int, list[str]]]:
    if quoting == "none":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise BuildInputError(f"{path}:{reader.line_num}: {exc} (try --quoting none for raw text)") from exc
    return rows


def _resolve_columns(path: Path, header: list[str] | None, first: list[str], columns: Columns
                     ) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Positions of the text column(s), the second text's column(s) (empty: single texts) and the label."""
    names = [c.strip().lower() for c in header] if header is not None else None
    if columns.second_text and not columns.text:
        raise BuildInputError(f"{path}: --second-text-column needs --text-column too (the first text of each pair)")
    if names is not None and (not columns.text or columns.label is None):
        auto_pair = next((pair for pair in PAIR_COLUMNS if all(c in names for c in pair)), None)
        auto_text = next((c for c in TEXT_COLUMNS if c in names), None)
        auto_label = next((c for c in LABEL_COLUMNS if c in names), None)
        missing = [what for what, found, given in (("text", auto_pair or auto_text, columns.text),
                                                   ("label", auto_label, columns.label)) if not given and not found]
        if missing:
            raise BuildInputError(
                f"{path}: the first row {_show(first)} names no {' and no '.join(m + ' column' for m in missing)} "
                f"(text: one of {list(TEXT_COLUMNS)}, or a pair such as {' + '.join(PAIR_COLUMNS[0])}; label: one "
                f"of {list(LABEL_COLUMNS)}). If that row is data, the file has no header: pass --no-header with "
                f"--text-column and --label-column as 0-based positions (e.g. --no-header --label-column 0 "
                f"--text-column 1,2 joins columns 1 and 2; add --second-text-column for sentence pairs). If it is "
                f"a header, name its columns: --text-column NAME[,NAME] [--second-text-column NAME] "
                f"--label-column NAME")
        if columns.text:
            text_spec, second_spec = columns.text, columns.second_text
        elif auto_pair is not None:
            text_spec, second_spec = (auto_pair[0],), (auto_pair[1],)
        else:
            text_spec, second_spec = (auto_text,), ()
        label_spec = columns.label or auto_label
    else:
        if not columns.text or columns.label is None:
            raise BuildInputError(
                f"{path}: without a header, say where the text and the label are: --text-column and "
                f"--label-column as 0-based positions (the first row has {len(first)} columns: "
                f"{', '.join(f'{i}={_clip(c)!r}' for i, c in enumerate(first))})")
        text_spec, second_spec, label_spec = columns.text, columns.second_text, columns.label
    width = len(first)
    text_at = tuple(_position(path, c, names, width) for c in text_spec)
    second_at = tuple(_position(path, c, names, width) for c in second_spec)
    label_at = _position(path, str(label_spec), names, width)
    if label_at in text_at + second_at:
        raise BuildInputError(f"{path}: column {label_at} is both the label and a text column")
    if set(text_at) & set(second_at):
        both = sorted(set(text_at) & set(second_at))
        raise BuildInputError(f"{path}: column(s) {both} are in both texts of the pair")
    return text_at, second_at, label_at


def _position(path: Path, spec: str | None, names: list[str] | None, width: int) -> int:
    key = str(spec).strip().lower()
    if names is not None and key in names:
        return names.index(key)
    if re.fullmatch(r"\d+", key):
        if int(key) >= width:
            raise BuildInputError(f"{path}: column {key} is out of range: the rows have {width} columns "
                                  f"(0-{width - 1})")
        return int(key)
    known = f"the header has {names}" if names is not None else "without a header, columns are 0-based positions"
    raise BuildInputError(f"{path}: no column {spec!r}: {known}")


def _clip(text: str, n: int = 32) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _show(row: Sequence[str]) -> str:
    return "[" + ", ".join(repr(_clip(c)) for c in row) + "]"


def _label_sort_key(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def load_splits(path: str | Path | None = None, columns: Columns | None = None,
                test_fraction: float = TEST_FRACTION) -> tuple[TextDataset, TextDataset]:
    """(train, test) from a folder (train.* and dev.* or test.*), or from one file split by `test_fraction`."""
    root = Path(path) if path is not None else _default_sst2()
    if root.is_dir():
        train_file, test_file = _split_file(root, "train"), _split_file(root, "dev", "test")
        train = read_table(train_file, columns=columns)
        test = read_table(test_file, train.label_names, columns)
        if (train.second_texts is None) != (test.second_texts is None):
            kinds = {d.source: "sentence pairs" if d.second_texts is not None else "single texts"
                     for d in (train, test)}
            raise BuildInputError(f"the splits hold different inputs: {kinds}; name the columns with --text-column "
                                  "and --second-text-column")
    elif root.is_file():
        whole = read_table(root, columns=columns)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(whole))
        cut = len(whole) - max(1, round(len(whole) * test_fraction))
        if cut < 2:
            raise BuildInputError(f"{root} has {len(whole)} rows: too few to split into train and test")
        train = whole.subset(order[:cut], f"{100 - round(100 * test_fraction)}% of its {len(whole)} rows, seeded")
        test = whole.subset(order[cut:], f"the other {round(100 * test_fraction)}%, held out")
    else:
        raise BuildInputError(f"dataset {root} does not exist: give a folder with train.* and dev.* or test.*, "
                              f"or one .tsv/.csv file")
    if len(train.label_names) < 2:
        raise BuildInputError(f"{train.source} has only one class ({train.label_names}); need at least two")
    return train, test


def load_split(path: str | Path, columns: Columns | None = None) -> TextDataset:
    """A single labeled file, or a folder's evaluation split (dev.* / test.*)."""
    root = Path(path)
    if root.is_dir():
        return load_splits(root, columns)[1]
    return read_table(root, columns=columns)


def _split_file(folder: Path, *names: str) -> Path:
    for name in names:
        for ext in (".tsv", ".csv"):
            candidate = folder / f"{name}{ext}"
            if candidate.is_file():
                return candidate
    raise BuildInputError(f"{folder} has no {' or '.join(names)} .tsv/.csv file (a folder needs train.* and "
                          f"dev.* or test.*)")


def name_labels(train: TextDataset, test: TextDataset, requested: list[str] | None
                ) -> tuple[TextDataset, TextDataset, list[str]]:
    """Apply --labels: (train, test, class names), classes in the order asked for.

    Each entry is a label as the data spells it (`World`), or `LABEL=NAME` to rename one (`1=World`).
    Every label of the data must be named once, and nothing else: a mismatch is an error that lists
    both. Labels that are the class ids 0..K-1 themselves may be named in that order (`negative,positive`
    for 0 and 1). Never renamed by position otherwise: sorted labels are not the dataset's class order.
    """
    found = train.label_names
    if not requested:
        return train, test, found
    pairs = [entry.partition("=") for entry in requested]
    renamed = [sep for _, sep, _ in pairs]
    if all(renamed):
        raw, names = [r.strip() for r, _, _ in pairs], [n.strip() for _, _, n in pairs]
    elif any(renamed):
        raise BuildInputError(f"--labels {','.join(requested)}: give every label as LABEL=NAME, or none")
    elif sorted(found, key=_label_sort_key) == [str(i) for i in range(len(found))] and \
            len(requested) == len(found) and not set(requested) & set(found):
        raw, names = [str(i) for i in range(len(found))], list(requested)  # class ids: 0 is the first name
    else:
        raw = names = [r.strip() for r in requested]
    missing = [x for x in found if x not in raw]
    unknown = [x for x in raw if x not in found]
    if missing or unknown or len(set(raw)) != len(raw):
        example = ",".join(f"{x}=NAME" for x in found[:4]) + (",..." if len(found) > 4 else "")
        raise BuildInputError(
            f"--labels {','.join(requested)} does not match the labels in {train.source}: {found}"
            + (f"; not in the data: {unknown}" if unknown else "")
            + (f"; not named: {missing}" if missing else "")
            + (f"; named twice: {sorted({x for x in raw if raw.count(x) > 1})}" if len(set(raw)) != len(raw) else "")
            + ". Give the data's labels in the class order you want, or rename them with LABEL=NAME: "
            f"--labels {example}")
    order = {label: i for i, label in enumerate(raw)}
    to_new = np.array([order[label] for label in found], dtype=np.int64)

    def relabel(d: TextDataset) -> TextDataset:
        return replace(d, labels=to_new[d.labels], label_names=list(names), raw_labels=list(raw))

    return relabel(train), relabel(test), list(names)


def _default_sst2() -> Path:
    if DEFAULT_SST2.is_dir():
        return DEFAULT_SST2
    target = CACHE_DIR / "SST-2"
    if not target.is_dir():
        print(f"SST-2 not found at {DEFAULT_SST2}; downloading {GLUE_SST2_URL}", flush=True)
        try:
            with urllib.request.urlopen(GLUE_SST2_URL, timeout=60) as response:
                zipfile.ZipFile(io.BytesIO(response.read())).extractall(CACHE_DIR)
        except (urllib.error.URLError, OSError, zipfile.BadZipFile) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise BuildInputError(
                f"no dataset given, SST-2 is not at {DEFAULT_SST2} and the download from {GLUE_SST2_URL} "
                f"failed ({reason}): pass --data FILE.csv|FILE.tsv, or a folder with train.* and dev.*") from None
    return target


def hold_out_calibration(data: TextDataset, n: int, seed: int, max_share: float = CALIBRATION_SHARE,
                         holdout: int = 0) -> tuple[TextDataset, TextDataset, TextDataset]:
    """(fit, calibration, holdout): `n` whole examples held out of `data` for calibration, `holdout` more
    for an evaluation that neither training nor calibration sees, and nothing of either left in fit.

    `n` is capped at `max_share` of `data` (calibration_size; a fifth unless --calibration-fraction
    says otherwise), so that training keeps most of a small set.
    Some datasets (SST-2's train split) hold every phrase of each sentence as a row of its own.
    A random hold-out would then leak: the model trains on most phrases of the sentences it is
    calibrated on, and looks better calibrated than it is on unseen sentences. So calibration
    takes whole examples only (rows that are not a word span of another row), and every row
    that is a word span of a calibration example leaves the fit set. Plain datasets are unaffected.
    """
    texts = data.texts if data.second_texts is None else \
        [f"{a} \u2016 {b}" for a, b in zip(data.texts, data.second_texts, strict=True)]  # a pair is one example
    norm = [" ".join(t.split()) for t in texts]
    corpus = "\n".join(f" {t} " for t in norm)
    order = np.random.default_rng(seed).permutation(len(data))
    n = calibration_size(n, len(data), max_share)
    wanted = n + max(0, holdout)
    chosen: list[int] = []
    for i in order:
        needle = f" {norm[i]} "
        first = corpus.find(needle)
        if norm[i] and corpus.find(needle, first + 1) < 0 and len(corpus) > 0:
            chosen.append(int(i))  # occurs once: its own row, a whole example
            if len(chosen) == wanted:
                break
    held, spans = set(chosen), WordSpans([norm[i] for i in chosen])
    fit = np.array([i for i in range(len(data)) if i not in held and norm[i] not in spans], dtype=np.int64)
    calibration, held_out = np.array(chosen[:n], dtype=np.int64), np.array(chosen[n:], dtype=np.int64)
    return data.subset(fit, data.portion), data.subset(calibration, data.portion), data.subset(held_out, data.portion)


class WordSpans:
    """Whether a text is a word span of one of some texts (space-normalised): a search in the few of them
    that hold its rarest word, not a set of every span (cubic in a text's length: long reviews ran out of
    memory)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.padded = [f" {t} " for t in texts]
        self.holding: dict[str, list[int]] = {}
        for position, text in enumerate(texts):
            for word in set(text.split()):
                self.holding.setdefault(word, []).append(position)

    def __contains__(self, text: str) -> bool:
        words = set(text.split())
        if not words:
            return False
        candidates = min((self.holding.get(word, []) for word in words), key=len)
        needle = f" {text} "  # bounded by spaces: whole words, in order
        return any(needle in self.padded[c] for c in candidates)


def calibration_size(requested: int, train_rows: int, max_share: float = CALIBRATION_SHARE) -> int:
    """The calibration split's size: the profile's (1,500 for quick and full), capped at a fifth of train
    (`max_share`)."""
    return min(requested, max(1, int(train_rows * max_share)))
