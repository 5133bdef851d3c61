"""A fresh build is readable by another user: the serving image runs as uid 10001 and bind-mounts
the model folder with the host's modes, so the builder must not pass on a 0700 temporary folder or
a strict umask (issue 21: every tier crash-looped on PermissionError in the compose stack)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY_LABELS


@pytest.fixture
def strict_umask() -> Iterator[None]:
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user can traverse (pytest's own tmp_path is 0700 and would hide the test)."""
    folder = Path(tempfile.mkdtemp(prefix="tierserve-perm-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder.parent)): stat.S_IMODE(p.stat().st_mode)
            for p in [folder, *sorted(folder.rglob("*"))]}


def test_fresh_build_under_a_strict_umask_is_readable_by_others(
        strict_umask: None, open_folder: Path, tiny_checkpoint: Path, tiny_data: Path) -> None:
    from shared.builder.build import BuildConfig, build

    config = BuildConfig(backbone=str(tiny_checkpoint), data=str(tiny_data), profile="tiny",
                         split_points=(1, 2, 3), label_names=TINY_LABELS, max_length=32, policy="p_tar",
                         p_tar=(0.8, 0.8))
    out = build(config, open_folder / "model")
    found = modes(out)
    assert {"model/manifest.json", "model/mobile.onnx", "model/edge.onnx", "model/cloud.onnx",
            "model/tokenizer.json"} <= set(found)
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o755 if (out.parent / name).is_dir() else 0o644)}
    assert not wrong, f"folders must be 0755 and files 0644: {wrong}"

    if os.geteuid() != 0 or shutil.which("su") is None:
        return  # the modes above are what another user needs; reading as one needs root
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return
    files = " ".join(f"'{p}'" for p in sorted(out.rglob("*")) if p.is_file())
    read = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"ls '{out}' >/dev/null && cat {files} >/dev/null"],
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, f"user nobody cannot read the build: {read.stderr}"
