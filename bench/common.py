"""What the bench scripts share: data, the machine, tables, results JSON, tiers and their answers."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

import numpy as np

from shared.contract.manifest import TIERS, Manifest, load_manifest
from shared.serving.placement import usable_cpus

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
DEFAULT_ARTIFACTS = Path("artifacts/default")
NEVER = 2.0  # a per-request threshold above any confidence: that exit never answers
FORCE_CLOUD = {"mobile": NEVER, "edge": NEVER}


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS, help="built model (%(default)s)")
    parser.add_argument("--data", help="labeled .tsv/.csv or GLUE folder (default: SST-2 dev in ../shared/data)")
    parser.add_argument("--limit", type=int, help="use only the first N samples (quicker runs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (%(default)s)")
    return parser


def dev_set(manifest: Manifest, data: str | None = None, limit: int | None = None, artifacts: Path | None = None,
            pairs: bool = False) -> tuple[list[str] | np.ndarray, np.ndarray]:
    """Texts (an image model: images; with `pairs`, a pair model's (first, second) pairs) and labels (manifest
    label order) of the evaluation split: given `artifacts`, the test split of the data the model was built on,
    else SST-2 dev (Fashion-MNIST's test split for an image model)."""
    from shared.tools.demo import load_labeled

    if manifest.text_pairs and not pairs:
        raise ValueError("this benchmark measures single-text and image models; this one classifies sentence pairs")
    texts, labels, _ = load_labeled(data, limit, manifest, artifacts)
    return cast(list[str] | np.ndarray, texts), labels


def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(usable_cpus())
    return {"cpu": cpu, "cores": cores, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform()}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
        return "-" if value is None else str(value)

    cells = [list(headers)] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_result(out: Path, name: str, result: Mapping[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=_plain) + "\n")
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value)}")


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "mean": float(values.mean()), "n": len(values)}


@contextmanager
def tiers(artifacts: Path, flags: Mapping[str, Mapping[str, object]] | None = None) -> Iterator[Any]:
    """The three tiers as processes on 127.0.0.1 (shared.tools.processes), logs in a temporary folder."""
    from shared.tools.processes import running_tiers

    with running_tiers(artifacts, flags=flags or {}) as cluster:
        yield cluster


def classify_all(address: str, texts: Sequence[str] | Sequence[tuple[str, str]] | np.ndarray,
                 thresholds: Mapping[str, float] | None = None,
                 batch_size: int = 32) -> list[Any]:
    """Answers of the running tiers for every text (an image model's array, a pair model's pairs from dev_set),
    in order, `batch_size` per request."""
    from shared.client import TierClient

    answers: list[Any] = []
    with TierClient(address, timeout=300) as client:
        classify: Callable[..., list[Any]] = client.classify_images if isinstance(texts, np.ndarray) else \
            client.classify_pairs if len(texts) and isinstance(texts[0], tuple) else client.classify
        for start in range(0, len(texts), batch_size):
            answers += classify(texts[start:start + batch_size], thresholds)
    return answers


def exit_index(answers: Sequence[Any]) -> np.ndarray:
    return np.array([TIERS.index(a.tier) for a in answers])


def predictions(answers: Sequence[Any]) -> np.ndarray:
    return np.array([a.label_index for a in answers])


def exit_probabilities(address: str, texts: Sequence[str] | Sequence[tuple[str, str]] | np.ndarray
                       ) -> list[np.ndarray]:
    """Calibrated probabilities of every exit for every text, from the running tiers' answers:
    one pass answered at mobile (threshold 0), one at edge, one at cloud."""
    passes = [{"mobile": 0.0}, {"mobile": NEVER, "edge": 0.0}, FORCE_CLOUD]
    probs = []
    for tier, thresholds in zip(TIERS, passes, strict=True):
        answers = classify_all(address, texts, thresholds)
        assert all(a.tier == tier for a in answers), f"a pass meant for {tier} was answered elsewhere"
        probs.append(np.array([list(a.probabilities) for a in answers]))
    return probs


def uncalibrated(probs: list[np.ndarray], manifest: Manifest) -> list[np.ndarray]:
    """softmax(z) from softmax(z / T): softmax(T * log p), exact up to float rounding."""
    from shared.contract.calibration import softmax

    return [softmax(np.log(np.clip(p, 1e-300, None)) * e.temperature) for p, e in zip(probs, manifest.exits,
                                                                                         strict=True)]


def scrape(metrics_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A tier's Prometheus samples: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def load(artifacts: Path) -> Manifest:
    return load_manifest(artifacts)


def link_model_files(artifacts: Path, out: Path, manifest: Manifest) -> None:
    """Hard-link (or copy, across file systems) a build's slices and tokenizer into a variant folder."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for name in [s.file for s in manifest.slices] + [manifest.tokenizer_file]:
        if name and not (out / name).exists():
            try:
                os.link(artifacts / name, out / name)
            except OSError:
                shutil.copy2(artifacts / name, out / name)


def uncalibrated_artifact(artifacts: Path, out: Path) -> Path:
    """A copy of the build (slices hard-linked) whose exits all have temperature 1: the uncalibrated
    model. Thresholds stay the manifest's; benches pass their own per request."""
    from shared.contract.manifest import save_manifest

    manifest = load_manifest(artifacts)
    link_model_files(artifacts, out, manifest)
    for spec in manifest.exits:
        spec.temperature = 1.0
    save_manifest(manifest, out)
    return out


def calibration_probs(artifacts: Path, manifest: Manifest, calibrated: bool = True
                      ) -> tuple[list[np.ndarray], np.ndarray]:
    """The calibration split's probabilities per exit (the build's held-out logits), and its labels."""
    from shared.contract.calibration import softmax
    from shared.contract.manifest import load_calibration_logits

    logits, labels = load_calibration_logits(artifacts)
    temps = [e.temperature if calibrated else 1.0 for e in manifest.exits]
    return [softmax(z, t) for z, t in zip(logits, temps, strict=True)], labels


def stop_group(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM a server started with start_new_session=True (its whole process group), SIGKILL after `grace` s."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
