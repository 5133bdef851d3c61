"""`tierserve demo`: the three tiers as local processes, a labeled set through the mobile tier.

Two passes over the data: in batches (accuracy, exits per tier, throughput: the batch is split
per sample between the tiers), then one text per request (latency per exit tier, where a
sample's latency is its own). Prints a summary, writes it as JSON, stops the tiers. The tiers
are stopped on every way out: normal end, error, Ctrl-C, SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.contract.manifest import TIERS, Manifest, load_manifest
from shared.contract.policy import describe_policy, relative_cost
from shared.tools.arguments import threshold_argument

if TYPE_CHECKING:
    from shared.data.text import Columns

DEFAULT_ARTIFACTS = Path("artifacts/default")
DEFAULT_OUT = Path("artifacts/demo.json")


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="start the three tiers locally and send a labeled set through them",
        description="Start mobile, edge and cloud as separate processes on free 127.0.0.1 ports, "
                    "classify a labeled set through the mobile tier (the test split of the model's "
                    "data; SST-2 dev for the default model; or --data), print "
                    "accuracy, exits per tier and latency per exit tier, then stop the tiers. "
                    "It builds nothing: run `tierserve build` (make model) first.")
    p.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS,
                   help="the built model (default %(default)s: in the working directory, else in the source "
                        "checkout tierserve runs from)")
    p.add_argument("--data", help="labeled .tsv/.csv or GLUE-style folder, read as the build read its data "
                                  "(default: the test split of the data the model was built on; the SST-2 dev set "
                                  "in ../shared/data/sst2 for the default model)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per request, first pass (default: %(default)s)")
    p.add_argument("--latency-samples", type=int, default=None,
                   help="texts sent one per request for latency (default: all; 0: skip)")
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--threshold", action="append", default=[], metavar="TIER=VALUE",
                   help="per-request threshold override (default: the manifest's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results JSON (default %(default)s)")
    p.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from shared.errors import TierServeError

    try:
        thresholds = dict(threshold_argument(t) for t in args.threshold)
        args.artifacts = find_artifacts(args.artifacts)
        results = run_demo(args.artifacts, args.data, args.batch_size, args.latency_samples,
                           args.limit, thresholds, args.out)
    except (TierServeError, ValueError, RuntimeError, TimeoutError,
            argparse.ArgumentTypeError) as exc:
        print(f"tierserve demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tierserve demo: interrupted; tiers stopped", file=sys.stderr)
        return 130
    print(format_summary(results))
    print(f"results written to {args.out}")
    return 0


def find_artifacts(folder: Path) -> Path:
    """The model folder asked for. The default, artifacts/default, is looked for in the working directory, then in
    the source checkout this package runs from (so the demo finds `make model`'s build from anywhere); a folder
    given with --artifacts is taken as given. Missing: an error naming every path looked at."""
    from shared.contract.manifest import MANIFEST_FILE
    from shared.data.text import REPO_ROOT
    from shared.errors import ArtifactError

    looked = [folder.resolve()]
    if folder == DEFAULT_ARTIFACTS:
        looked.append((REPO_ROOT / DEFAULT_ARTIFACTS).resolve())
    for candidate in dict.fromkeys(looked):
        if (candidate / MANIFEST_FILE).is_file():
            if candidate != looked[0]:
                print(f"demo: no model at {looked[0]}; using {candidate}", flush=True)
            return candidate
    paths = [str(p / MANIFEST_FILE) for p in dict.fromkeys(looked)]
    where = f"neither {' nor '.join(paths)} exists" if len(paths) > 1 else f"{paths[0]} does not exist"
    raise ArtifactError(f"no model: {where}. Build one with `tierserve build --out {looked[0]}` (or `make model`), "
                        "or pass --artifacts FOLDER")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP raise KeyboardInterrupt, so the `finally` that stops the tiers runs."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _label_order(found: list[str], manifest: Manifest, artifacts: Path | None) -> list[int]:
    """The model's class index of each label the data spells: by name, by the build's own label strings
    (report.json's data_labels: a build with --labels 1=World), or, for labels 0..K-1, by class id. Never
    by position otherwise."""
    data_labels: list[str] | None = None
    if artifacts is not None:
        try:
            data_labels = json.loads((artifacts / "report.json").read_text()).get("data_labels")
        except (OSError, ValueError):
            data_labels = None
    for known in (data_labels, manifest.labels):
        if known and set(found) <= set(known):
            return [known.index(name) for name in found]
    ids = [str(i) for i in range(len(manifest.labels))]
    if set(found) <= set(ids):
        return [int(name) for name in found]  # class ids: 0 is the model's first class
    raise ValueError(f"the data's labels {found} are not the model's {manifest.labels}"
                     + (f" (as its training data spelled them: {data_labels})" if data_labels else ""))


def _build_config(artifacts: Path | None) -> dict[str, Any]:
    """The build's build_config.json ({} when there is none or it cannot be read)."""
    try:
        return dict(json.loads((artifacts / "build_config.json").read_text())) if artifacts is not None else {}
    except (OSError, ValueError):
        return {}


def _build_columns(config: dict[str, Any]) -> Columns:
    """How the build read its data files (--text-column, --label-column, --no-header, --quoting): the demo
    reads a file of the same layout the same way."""
    from shared.data.text import Columns

    return Columns(text=tuple(config.get("text_columns") or ()), label=config.get("label_column"),
                   header=config.get("header", True), quoting=config.get("quoting", "auto"),
                   second_text=tuple(config.get("second_text_columns") or ()))


Samples = list[str] | list[tuple[str, str]] | np.ndarray


def load_labeled(data: str | None, limit: int | None, manifest: Manifest, artifacts: Path | None = None
                 ) -> tuple[Samples, np.ndarray, str]:
    """Texts (a pair model: (first, second) pairs; an image model: images) and label indices in the manifest's
    label order, and the data's source. Without `data`: the test split of the data the model was built on,
    or SST-2 dev for the default model."""
    from shared.builder.config import HOLDOUT_FILE
    from shared.data.text import DEFAULT_SST2, Columns, load_split, load_splits

    if manifest.family == "image":
        return _load_labeled_images(data, limit, manifest)
    config = _build_config(artifacts)
    built_on = config.get("data") if config.get("family", "text") == "text" else None  # None: the default SST-2
    own_holdout = False
    if data is not None:
        # the build's own holdout.tsv has a header of its own (sentence, label), whatever the data's layout
        own_holdout = artifacts is not None and Path(data).resolve() == (artifacts / HOLDOUT_FILE).resolve()
        dataset = load_split(data, Columns() if own_holdout else _build_columns(config))
    elif built_on and Path(built_on).exists():
        dataset = load_splits(built_on, _build_columns(config), float(config.get("test_fraction", 0.1)))[1]
    elif (DEFAULT_SST2 / "dev.tsv").is_file():
        dataset = load_split(DEFAULT_SST2 / "dev.tsv")
    else:
        dataset = load_splits(None)[1]
    # the build's own holdout names classes as the model does; the data's spellings could be other classes' names
    order = _label_order(dataset.label_names, manifest, None if own_holdout else artifacts)
    labels = np.array(order)[dataset.labels]
    if manifest.text_pairs != (dataset.second_texts is not None):
        raise ValueError(f"{dataset.source} holds {'sentence pairs' if dataset.second_texts else 'single texts'}, "
                         f"the model classifies {'sentence pairs' if manifest.text_pairs else 'single texts'}")
    texts: Samples = dataset.texts if dataset.second_texts is None else \
        list(zip(dataset.texts, dataset.second_texts, strict=True))
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
    return texts, labels, dataset.source


def _load_labeled_images(data: str | None, limit: int | None, manifest: Manifest
                         ) -> tuple[np.ndarray, np.ndarray, str]:
    """The test split of an image dataset (default Fashion-MNIST's), uint8 [N, C, H, W]."""
    from shared.data.images import load_image_splits

    test = load_image_splits(data)[1]
    if len(test.label_names) > len(manifest.labels):
        raise ValueError(f"{test.source} has {len(test.label_names)} classes, the model {len(manifest.labels)}")
    return test.images[:limit], test.labels[:limit], test.source


def run_demo(artifacts: Path, data: str | None = None, batch_size: int = 32,
             latency_samples: int | None = None, limit: int | None = None,
             thresholds: dict[str, float] | None = None, out: Path | None = DEFAULT_OUT
             ) -> dict[str, Any]:
    from shared.client import TierClient
    from shared.tools.processes import TierCluster

    manifest = load_manifest(artifacts)
    texts, labels, source = load_labeled(data, limit, manifest, artifacts)
    thresholds = thresholds or {}
    print(f"demo: {len(texts)} samples from {source}; starting mobile, edge, cloud on "
          f"{artifacts}", flush=True)
    with _sigterm_as_interrupt():
        cluster = TierCluster(artifacts)
        try:
            cluster.start()
            print("demo: tiers SERVING at " + ", ".join(
                f"{t} {p.address}" for t, p in cluster.tiers.items()), flush=True)
            with TierClient(cluster.entry_address, timeout=120) as client:
                classify = (client.classify_images if manifest.family == "image" else
                            client.classify_pairs if manifest.text_pairs else client.classify)
                batched = _batched_pass(classify, texts, batch_size, thresholds)
                n_latency = len(texts) if latency_samples is None else min(latency_samples,
                                                                            len(texts))
                single = _single_pass(classify, texts[:n_latency], thresholds)
        finally:
            statuses = cluster.stop()
            cluster.close()
    results = _results(manifest, artifacts, source, labels, thresholds, batched, single)
    results["tier_exit_status"] = statuses
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _batched_pass(classify: Callable[..., list[Any]], texts: Samples, batch_size: int,
                  thresholds: dict[str, float]) -> dict[str, Any]:
    tiers, predictions, request_seconds = [], [], []
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        sent = time.perf_counter()
        answers = classify(texts[start:start + batch_size], thresholds)
        request_seconds.append(time.perf_counter() - sent)
        tiers += [a.tier for a in answers]
        predictions += [a.label_index for a in answers]
    return {"tiers": tiers, "predictions": np.array(predictions),
            "seconds": time.perf_counter() - started, "request_seconds": request_seconds,
            "batch_size": batch_size}


def _single_pass(classify: Callable[..., list[Any]], texts: Samples,
                 thresholds: dict[str, float]) -> dict[str, Any]:
    tiers, latency, predictions = [], [], []
    for i in range(len(texts)):
        sent = time.perf_counter()
        [answer] = classify(texts[i:i + 1], thresholds)
        latency.append(time.perf_counter() - sent)
        tiers.append(answer.tier)
        predictions.append(answer.label_index)
    return {"tiers": tiers, "latency": np.array(latency), "predictions": np.array(predictions)}


def _percentiles_ms(seconds: Any) -> dict[str, float] | None:
    values = np.asarray(seconds, dtype=float)
    if not len(values):
        return None
    return {"p50": float(np.percentile(values, 50) * 1e3),
            "p95": float(np.percentile(values, 95) * 1e3), "n": len(values)}


def _results(manifest: Manifest, artifacts: Path, source: str, labels: np.ndarray,
             thresholds: dict[str, float], batched: dict[str, Any], single: dict[str, Any]
             ) -> dict[str, Any]:
    n = len(labels)
    correct = batched["predictions"] == labels
    tiers = np.array(batched["tiers"])
    single_tiers = np.array(single["tiers"])
    exits = {}
    for tier in TIERS:
        here = tiers == tier
        exits[tier] = {
            "count": int(here.sum()), "fraction": float(here.mean()) if n else 0.0,
            "accuracy": float(correct[here].mean()) if here.any() else None,
            "latency_ms": _percentiles_ms(single["latency"][single_tiers == tier]),
        }
    effective = {t: thresholds.get(t, manifest.exit(t).threshold) for t in TIERS[:-1]}
    results: dict[str, Any] = {
        "artifacts": str(artifacts), "data": source, "samples": n,
        "thresholds": effective, "threshold_overrides": thresholds,
        # what the manifest's thresholds promise (overrides replace it)
        "policy": describe_policy(manifest.policy) if not thresholds else "thresholds overridden per request",
        "accuracy": float(correct.mean()) if n else None, "exits": exits,
        "relative_cost": relative_cost(np.array([exits[t]["fraction"] for t in TIERS]),
                                       manifest.split_points(), manifest.cost_model) if n else None,
        "latency_ms_all": _percentiles_ms(single["latency"]),
        "batched": {
            "batch_size": batched["batch_size"], "seconds": batched["seconds"],
            "samples_per_second": n / batched["seconds"] if batched["seconds"] else None,
            "request_ms": _percentiles_ms(batched["request_seconds"]),
        },
        "single_pass_agrees": bool(np.array_equal(
            single["predictions"], batched["predictions"][: len(single["predictions"])])),
    }
    results["builder_report"] = _report_comparison(artifacts, source, thresholds, results)
    return results


def _report_comparison(artifacts: Path, source: str, thresholds: dict[str, float],
                       results: dict[str, Any]) -> dict[str, Any] | None:
    """The builder's test-split accuracy at the manifest's thresholds, when it is the same data."""
    try:
        report = json.loads((artifacts / "report.json").read_text())
    except (OSError, ValueError):
        return None
    same_data = Path(str(report.get("test_split", ""))).resolve() == Path(source).resolve()
    # the manifest's thresholds may have been re-tuned since the build (tierserve retune)
    same_thresholds = all(e.get("threshold") == results["thresholds"].get(e.get("tier"))
                          for e in report.get("exits", [])[:-1])
    # and all of it (not --limit N)
    whole = results["samples"] == (report.get("provenance") or {}).get("test_samples", results["samples"])
    comparable = same_data and same_thresholds and whole and not thresholds and "system_accuracy" in report
    return {"system_accuracy": report.get("system_accuracy"), "test_split":
            report.get("test_split"), "comparable": comparable,
            "equal": comparable and abs(report["system_accuracy"] - results["accuracy"]) < 1e-9}


def format_summary(results: dict[str, Any]) -> str:
    fmt = results["thresholds"]
    lines = [
        f"{results['samples']} samples from {results['data']}; thresholds "
        + ", ".join(f"{t} {'never' if v > 1 else f'{v:.4f}'}" for t, v in fmt.items()),
        f"accuracy {results['accuracy']:.4f}; cost {results['relative_cost']:.3f} of cloud-only "
        "(shared.contract.policy cost model, from the exit shares)",
    ]
    if results.get("policy"):
        lines.insert(1, results["policy"] + " (`tierserve retune --policy p_tar` for targets per tier)")
    report = results.get("builder_report")
    if report and report["comparable"]:
        verdict = "equal" if report["equal"] else "DIFFERENT"
        lines.append(f"builder report accuracy {report['system_accuracy']:.4f} "
                     f"(same data, same thresholds): {verdict}")
    lines.append(f"{'exit tier':<10}{'samples':>8}{'share':>8}{'accuracy':>10}"
                 f"{'p50 ms':>9}{'p95 ms':>9}")
    for tier, e in results["exits"].items():
        acc = "-" if e["accuracy"] is None else f"{e['accuracy']:.4f}"
        lat = e["latency_ms"]
        p50, p95 = ("-", "-") if lat is None else (f"{lat['p50']:.2f}", f"{lat['p95']:.2f}")
        lines.append(f"{tier:<10}{e['count']:>8}{e['fraction']:>8.3f}{acc:>10}{p50:>9}{p95:>9}")
    b = results["batched"]
    lines.append(
        f"latency: one sample per request, end to end at the client. In batches of "
        f"{b['batch_size']}: {b['samples_per_second']:.0f} samples/s, request p50 "
        f"{b['request_ms']['p50']:.1f} ms, p95 {b['request_ms']['p95']:.1f} ms")
    return "\n".join(lines)
