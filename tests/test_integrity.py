"""Artifacts are verified by hash at load: slices and tokenizer; nothing is unpickled."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shared.contract.manifest import load_manifest, verified_slice_path
from shared.contract.text import TextEncoder
from shared.errors import ArtifactError


@pytest.fixture
def copy(tiny_artifacts: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_artifacts, tmp_path / "model"))


def test_a_tampered_tokenizer_is_refused(copy: Path) -> None:
    manifest = load_manifest(copy)
    assert manifest.tokenizer_sha256, "the builder records the tokenizer's hash"
    TextEncoder.for_manifest(manifest, copy)
    tokenizer = copy / str(manifest.tokenizer_file)
    tokenizer.write_text(tokenizer.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    with pytest.raises(ArtifactError, match="tokenizer .* has sha256"):
        TextEncoder.for_manifest(manifest, copy)


def test_a_tampered_slice_is_refused(copy: Path) -> None:
    manifest = load_manifest(copy)
    spec = manifest.slice("edge")
    with open(copy / spec.file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="has sha256"):
        verified_slice_path(copy, spec)


def test_no_serving_code_unpickles() -> None:
    root = Path(__file__).resolve().parent.parent / "shared"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path
