"""setuptools hook: the gRPC stubs (shared/wire/gen, not committed) are generated from proto/ before the
packages are collected, so that a wheel or `pip install .` carries them. The generator is
shared/wire/stubs.py, loaded by path (the package's own imports need more than the build's environment);
grpcio-tools is a build requirement (pyproject.toml)."""

import importlib.util
from pathlib import Path

from setuptools import setup


def generate_stubs() -> None:
    path = Path(__file__).parent / "shared" / "wire" / "stubs.py"
    spec = importlib.util.spec_from_file_location("tierserve_stubs", path)
    assert spec is not None and spec.loader is not None
    stubs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stubs)
    if stubs.stale():
        stubs.generate()


generate_stubs()
setup()
