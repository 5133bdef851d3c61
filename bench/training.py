"""Training choices for the text model, judged by what the cost policy makes of them.

Each variant (one run per combination of --epochs, --train-samples, --learning-rate,
--exit-weights, the weights of the mobile, edge and cloud exits' losses, and --distillation-weight,
the early exits' KL toward the final exit's detached answer) trains the early-exit
model with the builder's own code (shared.builder: same split, sampling, seed and profile settings
as `tierserve build`), then:
- holds out --pool whole sentences of SST-2 train (as calibration is held out: none of their
  phrases trained on); the first --calibration of them are the calibration split, those after the
  largest --calibration a held-out check (one model judged at several calibration sizes is checked
  on the same sentences);
- fits the temperatures and chooses the cost-aware thresholds within --max-drop points on the
  calibration split only, with the default one-path search and the four-path family it replaced;
- measures accuracy by exit, and cost and drop at those thresholds, on SST-2 dev and on the held-out
  sentences; "ceiling" is the cheapest grid pair within budget chosen on dev itself (no policy can).

No tiers are started: the thresholds' routing is the tier rule (shared.contract.policy.route).
One variant takes about as long as a quick build's training (~3 min per pass over 20,000 sentences
on 2 cores).

    python -m bench.training --epochs 1 2 --out bench/results/training
    python -m bench.training --epochs 2 --exit-weights 2,1,1 --out bench/results/training/exit-weights
    python -m bench.training --epochs 1 --train-samples 40000 --out bench/results/training/more-data
    python -m bench.training --epochs 1 --train-samples 40000 --distillation-weight 0 1 --seed 3 \
        --out bench/results/training/distillation/seed3
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, machine, table, write_result
from bench.policy import FOUR_PATHS, uncorrected_cost_thresholds
from shared.builder.config import PROFILES
from shared.contract.calibration import calibrate_exit, softmax
from shared.contract.manifest import CostModel
from shared.contract.policy import cost_aware_thresholds, routed_figures


def train_variant(epochs: float, pool: int, train_samples: int, seed: int,
                  exit_weights: tuple[float, ...] = (1.0, 1.0, 1.0),
                  learning_rate: float | None = None, distillation_weight: float = 0.0) -> dict[str, Any]:
    """Train one model as the quick profile does (but `epochs`, `train_samples`, `exit_weights`, the
    weights of the exits' losses, and the encoder's `learning_rate`); logits of the held-out pool and
    of dev."""
    import torch

    from shared.builder.build import _text_encoder, resolve_backbone
    from shared.builder.config import PROFILES
    from shared.builder.model import EarlyExitBert, load_encoder
    from shared.builder.train import TrainSettings, predict_logits, train
    from shared.data.text import Columns, hold_out_calibration, load_splits

    profile = PROFILES["quick"]
    torch.manual_seed(seed)
    train_set, dev = load_splits(None, Columns())
    fit, held, _ = hold_out_calibration(train_set, pool, seed, max_share=0.5)
    fit = fit.subset(np.random.default_rng(seed + 1).permutation(len(fit))[:train_samples])
    checkpoint = resolve_backbone(None)
    encoder = _text_encoder(checkpoint, 128)
    model = EarlyExitBert(load_encoder(str(checkpoint)), (2, 4, 6), 2)
    settings = TrainSettings(epochs=epochs, batch_size=profile.batch_size,
                             learning_rate=learning_rate or profile.learning_rate,
                             head_learning_rate=profile.head_learning_rate, seed=seed, exit_weights=exit_weights,
                             distillation_weight=distillation_weight)
    started = time.perf_counter()
    summary = train(model, encoder.tokens(fit.texts), fit.labels, settings)
    return {"train_seconds": time.perf_counter() - started, "steps": summary["steps"],
            "pool": predict_logits(model, encoder.tokens(held.texts)), "pool_labels": held.labels,
            "dev": predict_logits(model, encoder.tokens(dev.texts)), "dev_labels": dev.labels}


def judge(trained: dict[str, Any], calibration: int, max_drop: float, checked_from: int | None = None
          ) -> dict[str, Any]:
    """Temperatures and thresholds from the first `calibration` pool sentences; figures on dev and on the
    pool's sentences from `checked_from` (default: all after the calibration split)."""
    checked_from = calibration if checked_from is None else checked_from
    points, cost = (2, 4, 6), CostModel()
    pool, labels = trained["pool"], trained["pool_labels"]
    temperatures = [calibrate_exit(z[:calibration], labels[:calibration]).temperature for z in pool]
    calib = [softmax(z[:calibration], t) for z, t in zip(pool, temperatures, strict=True)]
    splits = {"dev": ([softmax(z, t) for z, t in zip(trained["dev"], temperatures, strict=True)],
                      trained["dev_labels"]),
              "held_out": ([softmax(z[checked_from:], t) for z, t in zip(pool, temperatures, strict=True)],
                           labels[checked_from:])}
    choices = {
        "one path": cost_aware_thresholds(calib, labels[:calibration], points, cost, max_drop).thresholds,
        "four paths": cost_aware_thresholds(calib, labels[:calibration], points, cost, max_drop,
                                            exponents=FOUR_PATHS).thresholds,
        "ceiling (dev)": uncorrected_cost_thresholds(*splits["dev"], points, cost, max_drop),
    }
    result: dict[str, Any] = {"temperatures": temperatures}
    for split, (probs, y) in splits.items():
        if not len(y):
            continue
        result[split] = {name: routed_figures(probs, y, thresholds, points, cost) | {"thresholds": thresholds}
                         for name, thresholds in choices.items()}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, nargs="+", default=[1.0, 2.0], help="one variant per value")
    parser.add_argument("--exit-weights", nargs="+", default=["1,1,1"], metavar="W,W,W",
                        help="the exits' loss weights, mobile,edge,cloud: one variant per value and epochs")
    parser.add_argument("--pool", type=int, default=2500, help="whole train sentences held out (%(default)s)")
    parser.add_argument("--calibration", type=int, nargs="+", default=[1500],
                        help="of them, the calibration split: each size judges the same trained model")
    parser.add_argument("--train-samples", type=int, nargs="+", default=[20000],
                        help="rows of train (after the pool is held out): one variant per value")
    parser.add_argument("--learning-rate", type=float, nargs="+", default=[None],
                        help="the encoder's peak learning rate (default: the quick profile's): one variant per value")
    parser.add_argument("--distillation-weight", type=float, nargs="+", default=[None],
                        help="the early exits' KL weight toward the final exit's detached answer (default: the "
                        "quick profile's): one variant per value")
    parser.add_argument("--max-drop", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "training")
    args = parser.parse_args(argv)
    if not all(0 < c < args.pool for c in args.calibration):
        parser.error(f"--calibration {args.calibration} must each be between 0 and --pool {args.pool}")
    try:
        weights = [tuple(float(w) for w in item.split(",")) for item in args.exit_weights]
    except ValueError:
        parser.error(f"--exit-weights takes comma-separated numbers per exit, got {args.exit_weights}")
    if any(len(w) != 3 or min(w) < 0 or sum(w) == 0 for w in weights):
        parser.error(f"--exit-weights needs three non-negative weights, not all zero, got {args.exit_weights}")
    if any(lr is not None and lr <= 0 for lr in args.learning_rate):
        parser.error(f"--learning-rate must be positive, got {args.learning_rate}")
    if any(d is not None and not (math.isfinite(d) and d >= 0) for d in args.distillation_weight):
        parser.error(f"--distillation-weight must be a non-negative number, got {args.distillation_weight}")
    variants = []
    for epochs, samples, lr, exit_weights, distill in itertools.product(
            args.epochs, args.train_samples, args.learning_rate, weights, args.distillation_weight):
        lr = lr or PROFILES["quick"].learning_rate
        distill = PROFILES["quick"].distillation_weight if distill is None else distill
        print(f"training: {epochs:g} epoch(s) over {samples} sentences, learning rate {lr:g}, exit loss weights "
              f"{exit_weights}, distillation weight {distill:g}", flush=True)
        trained = train_variant(epochs, args.pool, samples, args.seed, exit_weights, lr, distill)
        accuracy = [float(np.mean(z.argmax(-1) == trained["dev_labels"])) for z in trained["dev"]]
        for calibration in args.calibration:
            judged = judge(trained, calibration, args.max_drop, checked_from=max(args.calibration))
            variants.append({"epochs": epochs, "train_samples": samples, "learning_rate": lr,
                             "exit_weights": list(exit_weights), "distillation_weight": distill,
                             "calibration": calibration,
                             "train_seconds": trained["train_seconds"], "dev_accuracy": accuracy, **judged})
    rows = []
    for v in variants:
        for split in ("dev", "held_out"):
            for name, f in v.get(split, {}).items():
                weights_text = ",".join(f"{w:g}" for w in v["exit_weights"])
                if v.get("distillation_weight"):
                    weights_text += f" +KL {v['distillation_weight']:g}"
                rows.append([v["epochs"], v["train_samples"], v["learning_rate"], weights_text, v["calibration"],
                             round(v["train_seconds"]),
                             " / ".join(f"{a:.3f}" for a in v["dev_accuracy"]),
                             split, name, f["relative_cost"], f["accuracy_drop_points"]])
    print(table(["epochs", "rows", "lr", "exit weights", "calib", "train s", "dev acc by exit", "split", "thresholds",
                 "cost", "drop pts"], rows))
    result = {"machine": machine(), "pool": args.pool, "calibration": args.calibration,
              "held_out_from": max(args.calibration),
              "max_drop_points": args.max_drop, "seed": args.seed,
              "variants": variants}
    print(f"wrote {write_result(args.out, 'training', result)}")


if __name__ == "__main__":
    main()
