"""Text preprocessing of the entry tier: tokenise, truncate to the model's max length, pad per batch.

One home for tokenisation: the builder trains on exactly what the mobile tier computes online.
Sequences keep their real length: a batch is padded only to its longest sequence (pad id 0,
mask 0), never to a fixed size. A sentence pair is tokenised as the tokenizer pairs it
([CLS] first [SEP] second [SEP]) and carries token_type_ids (0 for the first text, 1 for the
second), which a pair model's mobile slice takes as a third input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from shared.contract.manifest import Manifest, verified_file
from shared.errors import ArtifactError
from shared.wire.codec import unpadded_mask

PAD_ID = 0


TOKEN_TYPE_IDS = "token_type_ids"


@dataclass(frozen=True)
class EncodedTexts:
    # input_ids, attention_mask (and token_type_ids for pairs): int64 [B, longest]; an unpadded mask is
    # shared and read-only (codec.unpadded_mask)
    tensors: dict[str, np.ndarray]
    truncated: np.ndarray  # bool [B]: the text was cut to max_length tokens
    lengths: np.ndarray  # int [B]: tokens per text after truncation


@dataclass(frozen=True)
class Tokens:
    """Unpadded token ids per sample; for sentence pairs also the token type ids (segment per token)."""

    ids: list[list[int]]
    type_ids: list[list[int]] | None
    truncated: np.ndarray  # bool [N]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: Sequence[int] | np.ndarray) -> Tokens:
        return Tokens([self.ids[i] for i in index],
                      None if self.type_ids is None else [self.type_ids[i] for i in index],
                      self.truncated[np.asarray(index, dtype=np.int64)])

    def padded(self) -> dict[str, np.ndarray]:
        """input_ids, attention_mask (and token_type_ids for pairs), right-padded to the longest: int64 [N, longest]."""
        input_ids, attention_mask = pad(self.ids)
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.type_ids is not None:
            tensors[TOKEN_TYPE_IDS] = pad(self.type_ids)[0]
        return tensors


class TextEncoder:
    def __init__(self, tokenizer_file: str | Path, max_length: int) -> None:
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ArtifactError(f"cannot load tokenizer {tokenizer_file}: {exc}") from exc
        self._setup(tokenizer, max_length)

    def _setup(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.max_length = max_length

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, max_length: int) -> TextEncoder:
        encoder = cls.__new__(cls)
        encoder._setup(tokenizer, max_length)
        return encoder

    @classmethod
    def for_manifest(cls, manifest: Manifest, folder: str | Path) -> TextEncoder:
        assert manifest.tokenizer_file is not None and manifest.max_length is not None
        path = verified_file(folder, manifest.tokenizer_file, manifest.tokenizer_sha256, "the tokenizer")
        return cls(path, manifest.max_length)

    def tokens(self, texts: Sequence[str], second_texts: Sequence[str] | None = None) -> Tokens:
        """Unpadded ids per text (or per pair, texts[i] with second_texts[i]), and which were truncated.

        A pair longer than max_length loses tokens from its longer text first (the tokenizer's
        longest_first), so both texts keep a part."""
        if second_texts is None:
            encodings = self.tokenizer.encode_batch(list(texts))
        else:  # strict: unequal counts raise ValueError
            encodings = self.tokenizer.encode_batch(list(zip(texts, second_texts, strict=True)))
        return Tokens([e.ids for e in encodings],
                      None if second_texts is None else [e.type_ids for e in encodings],
                      np.array([bool(e.overflowing) for e in encodings], dtype=bool))

    def encode(self, texts: Sequence[str], second_texts: Sequence[str] | None = None) -> EncodedTexts:
        tokens = self.tokens(texts, second_texts)
        lengths = [len(x) for x in tokens.ids]
        if lengths and min(lengths) == max(lengths):  # no padding (always so for one text): the shared mask
            tensors = {"input_ids": np.array(tokens.ids, dtype=np.int64),
                       "attention_mask": unpadded_mask((len(tokens), lengths[0]))}
            if tokens.type_ids is not None:
                tensors[TOKEN_TYPE_IDS] = np.array(tokens.type_ids, dtype=np.int64)
        else:
            tensors = tokens.padded()
        return EncodedTexts(tensors, tokens.truncated, np.array(lengths, dtype=np.int64))


def pad(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence: (input_ids, attention_mask), both int64 [B, longest]."""
    width = max((len(x) for x in ids), default=0)
    input_ids = np.full((len(ids), width), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask
