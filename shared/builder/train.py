"""Joint training of the encoder and its exits (weighted sum of exit losses), or heads only.

`train_loop` is family-agnostic (it takes an epoch of batches); `train` feeds it text.

Batches are bucketed by length and padded per batch, which matters on CPU: SST-2 train
averages 13 tokens, so padding to a fixed length would waste most of the compute.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from shared.builder.model import EarlyExitBert, model_inputs
from shared.contract.text import Tokens


@dataclass(frozen=True)
class TrainSettings:
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 5e-5
    head_learning_rate: float = 1e-3
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01
    exit_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    # Weight of the early exits' KL divergence from the final exit's answer. The answer is detached: the
    # final head and the layers above the last early exit learn from the labels only (the layers the
    # exits share still get the students' gradient).
    distillation_weight: float = 0.0
    freeze_encoder: bool = False
    seed: int = 0


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, sort by length within windows of 50 batches, then shuffle the batches."""
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # (model inputs, target labels)


def train(model: EarlyExitBert, tokens: Tokens, labels: np.ndarray, settings: TrainSettings) -> dict[str, float]:
    """Train a text model in place on length-bucketed, per-batch padded batches; returns a summary."""
    lengths = np.array([len(x) for x in tokens.ids])

    def epoch(rng: np.random.Generator) -> Iterator[Batch]:
        for batch in length_bucketed_batches(lengths, settings.batch_size, rng):
            yield model_inputs(tokens.take(batch).padded()), torch.from_numpy(labels[batch])

    return train_loop(model, epoch, len(tokens), settings)


def train_loop(
    model: nn.Module, epoch: Callable[[np.random.Generator], Iterable[Batch]], samples_per_epoch: int,
    settings: TrainSettings,
) -> dict[str, float]:
    """Joint training of every exit (weighted sum of exit losses), any family, in place.

    epoch(rng) yields one epoch's batches; the model returns a list of exit logits and has `heads`
    (and `freeze_encoder()` when settings.freeze_encoder). Returns final loss, samples/s, seconds.
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    if settings.freeze_encoder:
        model.freeze_encoder()
    n_epochs = math.ceil(settings.epochs)
    per_epoch = math.ceil(samples_per_epoch / settings.batch_size)
    total_steps = max(1, int(per_epoch * settings.epochs))
    optimizer = _optimizer(model, settings)
    warmup = max(1, int(total_steps * settings.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )
    loss_fn = nn.CrossEntropyLoss()
    weights = settings.exit_weights
    model.train()
    step, seen, started, running = 0, 0, time.perf_counter(), float("nan")
    with progress(total_steps) as bar:
        for _ in range(n_epochs):
            for inputs, target in epoch(rng):
                if step >= total_steps:
                    break
                logits = model(*inputs)
                loss = sum(w * loss_fn(x, target) for w, x in zip(weights, logits, strict=True)) / sum(weights)
                if settings.distillation_weight:
                    loss = loss + settings.distillation_weight * distillation_loss(logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                step, seen = step + 1, seen + len(target)
                running = loss.item() if math.isnan(running) else 0.95 * running + 0.05 * loss.item()
                bar.set_postfix(loss=f"{running:.3f}", samples_s=f"{seen / (time.perf_counter() - started):.0f}",
                                refresh=False)
                bar.update(1)
    model.eval()
    seconds = time.perf_counter() - started
    return {"loss": running, "samples_per_second": seen / seconds, "seconds": seconds, "steps": step}


def distillation_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean KL(final || early exit) over the early exits, per sample, the final exit's answer detached
    (its head is not trained by its students); zero with a single exit."""
    if len(logits) < 2:
        return logits[0].new_zeros(())
    teacher = torch.softmax(logits[-1].detach(), dim=-1)
    losses = [nn.functional.kl_div(torch.log_softmax(x, dim=-1), teacher, reduction="batchmean") for x in logits[:-1]]
    return torch.stack(losses).mean()


class LineProgress:
    """Progress for a log that is not a terminal: one line at most every `interval` seconds and at the end
    (a tqdm bar there would write a line per refresh)."""

    def __init__(self, total: int, desc: str = "train", interval: float = 30.0, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.interval, self.stream = total, desc, interval, stream or sys.stderr
        self.n, self.postfix, self.started = 0, "", time.perf_counter()
        self.last = self.started

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval or self.n == self.total:
            self.last = now
            self.write(now)

    def set_postfix(self, refresh: bool = False, **values: str) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def write(self, now: float) -> None:
        share = 100.0 * self.n / max(1, self.total)
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} batches ({share:.0f}%), {now - self.started:.0f} s{tail}",
              file=self.stream, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def progress(total: int, desc: str = "train", stream: TextIO | None = None) -> tqdm | LineProgress:
    """A tqdm bar on a terminal, else a line every 30 s (logs, CI, `tierserve build > build.log`)."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, mininterval=2.0, file=stream)
    return LineProgress(total, desc, stream=stream)


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    head_params = [p for p in model.heads.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head_params}
    encoder_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head_params, "lr": settings.head_learning_rate}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": settings.learning_rate})
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)


@torch.no_grad()
def predict_logits(model: EarlyExitBert, tokens: Tokens, batch_size: int = 128) -> list[np.ndarray]:
    """Logits of every exit for every sample, in input order: a list (one per exit) of [N, C]."""
    model.eval()
    order = np.argsort([len(x) for x in tokens.ids], kind="stable")
    outputs: list[list[np.ndarray]] = [[] for _ in model.heads]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for store, logits in zip(outputs, model(*model_inputs(tokens.take(batch).padded())), strict=True):
            store.append(logits.float().numpy())
    inverse = np.argsort(order, kind="stable")
    return [np.concatenate(parts)[inverse] for parts in outputs]
