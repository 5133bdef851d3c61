"""A wheel built from a fresh checkout (no generated stubs) carries the gRPC stubs: setup.py generates them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from shared.wire.stubs import GENERATED, REPO_ROOT


def test_a_wheel_from_a_fresh_checkout_carries_the_grpc_stubs(tmp_path: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    checkout = tmp_path / "checkout"
    for name in filter(None, files.decode().split("\0")):
        if (REPO_ROOT / name).is_file():  # tracked files only: what a clone has, shared/wire/gen not among them
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, checkout / name)
    assert not (checkout / "shared" / "wire" / "gen").exists()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheels"), str(checkout)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel, = (tmp_path / "wheels").glob("tierserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"shared/wire/gen/{name}" for name in GENERATED if name.endswith(".py")}
    assert wanted | {"shared/wire/gen/__init__.py", "shared/wire/gen/inference/__init__.py"} <= names
