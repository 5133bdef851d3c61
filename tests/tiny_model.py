"""A small randomly initialised BERT checkpoint and a generated labeled dataset, for fast tests.

Both are real inputs to the real builder: a checkpoint folder (config.json, weights,
tokenizer.json) and a GLUE-style folder (train.tsv, dev.tsv).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

POSITIVE = ["good", "great", "fine", "lovely", "superb", "charming", "bright", "warm"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "grim", "weak", "stale"]
NEUTRAL = [f"w{i}" for i in range(40)] + ["the", "a", "film", "movie", "plot", "story", "it", "is"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIALS + POSITIVE + NEGATIVE + NEUTRAL)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def make_checkpoint(folder: Path, num_layers: int = 3, hidden_size: int = 32) -> Path:
    """A random tiny BertModel saved as a Hugging Face checkpoint folder with its tokenizer."""
    from shared.builder.model import tiny_encoder

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = len(SPECIALS) + len(POSITIVE) + len(NEGATIVE) + len(NEUTRAL)
    tiny_encoder(vocab_size, num_layers=num_layers, hidden_size=hidden_size).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def sentence(rng: np.random.Generator, label: int, num_classes: int) -> str:
    """Neutral filler plus sentiment words; the majority sentiment decides, with a few ties flipped."""
    length = int(rng.integers(3, 30))
    words = list(rng.choice(NEUTRAL, size=length))
    lexicons = [POSITIVE, NEGATIVE, NEUTRAL[:8]][:num_classes] if num_classes <= 3 else None
    assert lexicons is not None, "up to 3 classes"
    strong = int(rng.integers(1, 4))
    weak = int(rng.integers(0, strong))  # fewer words of another class: later layers must count
    other = (label + 1) % num_classes
    for word in list(rng.choice(lexicons[label], size=strong)) + list(rng.choice(lexicons[other], size=weak)):
        words.insert(int(rng.integers(0, len(words) + 1)), str(word))
    return " ".join(words)


def make_dataset(folder: Path, num_classes: int = 2, train: int = 1200, dev: int = 300, seed: int = 0,
                 label_noise: float = 0.1) -> Path:
    """train.tsv and dev.tsv; a share of labels is flipped so that confidences spread out."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", train), ("dev", dev)):
        labels = rng.integers(0, num_classes, size=n)
        texts = [sentence(rng, int(y), num_classes) for y in labels]
        flip = rng.random(n) < label_noise
        labels[flip] = (labels[flip] + rng.integers(1, num_classes, size=int(flip.sum()))) % num_classes
        rows = [f"{text}\t{int(y)}" for text, y in zip(texts, labels, strict=True)]
        (folder / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


def make_pair_dataset(folder: Path, train: int = 1200, dev: int = 300, seed: int = 0) -> Path:
    """GLUE RTE's layout (index, sentence1, sentence2, label): the label is the sentiment of the second
    sentence, the first is a sentence of either sentiment, so only a model that reads the pair's second
    text as such can learn it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = ["entailment", "not_entailment"]
    for split, n in (("train", train), ("dev", dev)):
        rows = []
        for i in range(n):
            label = int(rng.integers(0, 2))
            first, second = sentence(rng, int(rng.integers(0, 2)), 2), sentence(rng, label, 2)
            rows.append(f"{i}\t{first}\t{second}\t{names[label]}")
        (folder / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    return folder
