"""Labeled datasets for the builder, the demo and bench/: GLUE-style TSV folders or text,label files.

Accepted:
- a folder with train.tsv and dev.tsv (GLUE SST-2 style: header `sentence<TAB>label`);
- a .tsv or .csv file with a text column (text, sentence or review) and a label column.
With no path, ../shared/data/sst2 beside the repo is used, else SST-2 is fetched from GLUE.
"""

from __future__ import annotations

import csv
import io
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import BuildInputError

TEXT_COLUMNS = ("sentence", "text", "review")
LABEL_COLUMNS = ("label", "labels")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SST2 = REPO_ROOT.parent / "shared" / "data" / "sst2"
GLUE_SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
CACHE_DIR = Path.home() / ".cache" / "tierserve" / "data"


@dataclass(frozen=True)
class TextDataset:
    texts: list[str]
    labels: np.ndarray  # int64 indices into label_names
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> TextDataset:
        return TextDataset([self.texts[i] for i in index], self.labels[index], self.label_names, self.source)


def read_table(path: Path, label_names: list[str] | None = None) -> TextDataset:
    """One TSV/CSV file with a header naming a text column and a label column."""
    if not path.is_file():
        raise BuildInputError(f"data file {path} does not exist")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # GLUE TSVs hold raw quotes
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        text_col = next((c for c in TEXT_COLUMNS if c in columns), None)
        label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
        if text_col is None or label_col is None:
            raise BuildInputError(
                f"{path}: columns {columns} lack a text column (one of {list(TEXT_COLUMNS)}) "
                f"or a label column (one of {list(LABEL_COLUMNS)})"
            )
        original = {c.strip().lower(): c for c in reader.fieldnames or []}
        texts, raw_labels = [], []
        for line, row in enumerate(reader, start=2):
            text, label = row.get(original[text_col]), row.get(original[label_col])
            if text is None or label is None or not label.strip():
                raise BuildInputError(f"{path}:{line}: row has no {text_col} or {label_col} value")
            texts.append(text.strip())
            raw_labels.append(label.strip())
    if not texts:
        raise BuildInputError(f"{path} has a header but no rows")
    names = label_names or sorted(set(raw_labels), key=_label_sort_key)
    unknown = sorted(set(raw_labels) - set(names))
    if unknown:
        raise BuildInputError(f"{path}: labels {unknown[:5]} do not occur in the training data {names}")
    index = {name: i for i, name in enumerate(names)}
    return TextDataset(texts, np.array([index[x] for x in raw_labels], dtype=np.int64), names, str(path))


def _label_sort_key(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def load_splits(path: str | Path | None = None) -> tuple[TextDataset, TextDataset]:
    """(train, test) from a GLUE-style folder, or from one file split 90/10 deterministically."""
    root = Path(path) if path is not None else _default_sst2()
    if root.is_dir():
        train_file, test_file = _split_file(root, "train"), _split_file(root, "dev", "test")
        train = read_table(train_file)
        test = read_table(test_file, train.label_names)
    elif root.is_file():
        whole = read_table(root)
        order = np.random.default_rng(0).permutation(len(whole))
        cut = int(len(whole) * 0.9)
        train, test = whole.subset(order[:cut]), whole.subset(order[cut:])
    else:
        raise BuildInputError(f"dataset {root} does not exist: give a GLUE-style folder or a .tsv/.csv file")
    if len(train.label_names) < 2:
        raise BuildInputError(f"{train.source} has only one class ({train.label_names}); need at least two")
    return train, test


def load_split(path: str | Path) -> TextDataset:
    """A single labeled file, or a folder's evaluation split (dev.tsv / test.tsv)."""
    root = Path(path)
    if root.is_dir():
        return load_splits(root)[1]
    return read_table(root)


def _split_file(folder: Path, *names: str) -> Path:
    for name in names:
        for ext in (".tsv", ".csv"):
            candidate = folder / f"{name}{ext}"
            if candidate.is_file():
                return candidate
    raise BuildInputError(f"{folder} has no {' or '.join(names)} .tsv/.csv file")


def _default_sst2() -> Path:
    if DEFAULT_SST2.is_dir():
        return DEFAULT_SST2
    target = CACHE_DIR / "SST-2"
    if not target.is_dir():
        print(f"SST-2 not found at {DEFAULT_SST2}; downloading {GLUE_SST2_URL}")
        with urllib.request.urlopen(GLUE_SST2_URL, timeout=60) as response:
            zipfile.ZipFile(io.BytesIO(response.read())).extractall(CACHE_DIR)
    return target


def hold_out_calibration(data: TextDataset, n: int, seed: int) -> tuple[TextDataset, TextDataset]:
    """(fit, calibration): `n` whole examples held out of `data`, and nothing of them left in fit.

    Some datasets (SST-2's train split) hold every phrase of each sentence as a row of its own.
    A random hold-out would then leak: the model trains on most phrases of the sentences it is
    calibrated on, and looks better calibrated than it is on unseen sentences. So calibration
    takes whole examples only (rows that are not a word span of another row), and every row
    that is a word span of a calibration example leaves the fit set. Plain datasets are unaffected.
    """
    norm = [" ".join(t.split()) for t in data.texts]
    corpus = "\n".join(f" {t} " for t in norm)
    order = np.random.default_rng(seed).permutation(len(data))
    n = min(n, max(1, len(data) // 5))
    chosen: list[int] = []
    for i in order:
        needle = f" {norm[i]} "
        first = corpus.find(needle)
        if norm[i] and corpus.find(needle, first + 1) < 0 and len(corpus) > 0:
            chosen.append(int(i))  # occurs once: its own row, a whole example
            if len(chosen) == n:
                break
    spans = set()
    for i in chosen:
        words = norm[i].split()
        spans.update(" ".join(words[a:b]) for a in range(len(words)) for b in range(a + 1, len(words) + 1))
    held = set(chosen)
    fit = np.array([i for i in range(len(data)) if i not in held and norm[i] not in spans], dtype=np.int64)
    return data.subset(fit), data.subset(np.array(chosen, dtype=np.int64))
