"""Text preprocessing of the entry tier: tokenise, truncate to the model's max length, pad per batch.

One home for tokenisation: the builder trains on exactly what the mobile tier computes online.
Sequences keep their real length: a batch is padded only to its longest sequence (pad id 0,
mask 0), never to a fixed size.
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


@dataclass(frozen=True)
class EncodedTexts:
    # input_ids, attention_mask: int64 [B, longest]; an unpadded mask is shared and read-only (codec.unpadded_mask)
    tensors: dict[str, np.ndarray]
    truncated: np.ndarray  # bool [B]: the text was cut to max_length tokens
    lengths: np.ndarray  # int [B]: tokens per text after truncation


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

    def token_ids(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Unpadded ids per text, and which texts were truncated."""
        encodings = self.tokenizer.encode_batch(list(texts))
        return [e.ids for e in encodings], np.array([bool(e.overflowing) for e in encodings], dtype=bool)

    def encode(self, texts: Sequence[str]) -> EncodedTexts:
        ids, truncated = self.token_ids(texts)
        lengths = [len(x) for x in ids]
        if lengths and min(lengths) == max(lengths):  # no padding (always so for one text): the shared mask
            input_ids, attention_mask = np.array(ids, dtype=np.int64), unpadded_mask((len(ids), lengths[0]))
        else:
            input_ids, attention_mask = pad(ids)
        return EncodedTexts({"input_ids": input_ids, "attention_mask": attention_mask}, truncated,
                            np.array(lengths, dtype=np.int64))


def pad(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence: (input_ids, attention_mask), both int64 [B, longest]."""
    width = max((len(x) for x in ids), default=0)
    input_ids = np.full((len(ids), width), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask
