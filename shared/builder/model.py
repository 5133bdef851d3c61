"""An early-exit BERT cut into three slices, each ending in an exit head.

Layers are called one by one with an explicitly built additive attention mask: exporting the
whole HF model gives wrong results at other sequence lengths (DESIGN.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertModel

from shared.contract.text import TOKEN_TYPE_IDS


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 1/0 mask -> [B, 1, 1, S] additive mask (0 where attended, dtype-min where padded)."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def model_inputs(tensors: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """EarlyExitBert's positional inputs from padded tensors: (input_ids, attention_mask[, token_type_ids])."""
    names = ["input_ids", "attention_mask", *([TOKEN_TYPE_IDS] if TOKEN_TYPE_IDS in tensors else [])]
    return tuple(torch.from_numpy(tensors[name]) for name in names)


class ExitHead(nn.Module):
    """Masked mean pooling over tokens, then a small MLP to class logits."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.out(self.dropout(torch.tanh(self.dense(pooled))))


class EarlyExitBert(nn.Module):
    """A BertModel's embeddings and layers with an exit head after each split point."""

    def __init__(self, encoder: BertModel, split_points: tuple[int, int, int], num_labels: int) -> None:
        super().__init__()
        self.config: BertConfig = encoder.config
        self.embeddings = encoder.embeddings
        self.layers = encoder.encoder.layer
        self.split_points = split_points
        self.heads = nn.ModuleList(ExitHead(self.config.hidden_size, num_labels) for _ in split_points)

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Run layers first..last (1-based, inclusive)."""
        mask = additive_mask(attention_mask, hidden.dtype)
        for layer in self.layers[first - 1 : last]:
            hidden = layer(hidden, mask)
        return hidden

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings; a single text is all segment 0, a pair's second text segment 1."""
        return self.embeddings(input_ids=input_ids,
                               token_type_ids=torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Logits of every exit, in order."""
        hidden = self.embed(input_ids, token_type_ids)
        logits, first = [], 1
        for head, last in zip(self.heads, self.split_points, strict=True):
            hidden = self.run_layers(hidden, attention_mask, first, last)
            logits.append(head(hidden, attention_mask))
            first = last + 1
        return logits

    def freeze_encoder(self) -> None:
        for module in (self.embeddings, self.layers):
            for p in module.parameters():
                p.requires_grad_(False)


class MobileSlice(nn.Module):
    """Embeddings + layers 1..m + exit 1: (input_ids, attention_mask) -> (logits, hidden), single texts."""

    def __init__(self, model: EarlyExitBert) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run(input_ids, attention_mask, None)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        hidden = m.run_layers(m.embed(input_ids, token_type_ids), attention_mask, 1, m.split_points[0])
        return m.heads[0](hidden, attention_mask), hidden


class PairMobileSlice(MobileSlice):
    """The mobile slice of a sentence-pair model: (input_ids, attention_mask, token_type_ids) -> (logits, hidden)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run(input_ids, attention_mask, token_type_ids)


class MiddleSlice(nn.Module):
    """Layers of exit `index` + its head: (hidden, attention_mask) -> (logits, hidden)."""

    def __init__(self, model: EarlyExitBert, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, i = self.model, self.index
        hidden = m.run_layers(hidden, attention_mask, m.split_points[i - 1] + 1, m.split_points[i])
        return m.heads[i](hidden, attention_mask), hidden


class LastSlice(MiddleSlice):
    """The last layers + final classifier: (hidden, attention_mask) -> logits."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden, attention_mask)[0]


def load_encoder(checkpoint: str, attn_implementation: str = "sdpa") -> BertModel:
    """The checkpoint's encoder without its pooler. transformers' own load report (a table that lists the
    unused pooler weights as UNEXPECTED) and its progress bar are silenced; weights that are missing, or
    unused ones other than the pooler's, are still reported, in one line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        loaded: Any = BertModel.from_pretrained(checkpoint, add_pooling_layer=False,
                                                attn_implementation=attn_implementation, output_loading_info=True)
        model: BertModel = loaded[0]
        info: dict[str, list[str]] = loaded[1]
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    unused = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(("pooler.", "bert.pooler.")))
    if missing or unused:
        print(f"backbone {checkpoint}: {len(missing)} weight(s) missing (initialised at random): {missing[:5]}; "
              f"{len(unused)} unused besides the pooler: {unused[:5]}", flush=True)
    return model


def tiny_encoder(vocab_size: int, num_layers: int = 3, hidden_size: int = 32, seed: int = 0) -> BertModel:
    """A randomly initialised small BERT, for tests."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, intermediate_size=hidden_size * 2, max_position_embeddings=128,
    )
    return BertModel(config, add_pooling_layer=False)
