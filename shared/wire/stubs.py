"""Generating the gRPC stubs of proto/*.proto into shared/wire/gen/ when missing or stale.

proto/inference/grpc_service.proto (the Open Inference Protocol) is generated alongside; its stubs
are loaded only on demand by `inference_stubs()`, see there.

Stubs are tied to the installed protobuf version, so they are built here, not committed:
`python -m shared.wire.stubs` regenerates them; importing shared.wire.rpc does so when needed.
The include mapping `-Ishared/wire/gen=proto` makes the generated code import
`from shared.wire.gen import tierserve_pb2`.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILE = PROTO_DIR / "tierserve.proto"
INFERENCE_PROTO_FILE = PROTO_DIR / "inference" / "grpc_service.proto"
PROTO_FILES = (PROTO_FILE, INFERENCE_PROTO_FILE)
GEN_DIR = REPO_ROOT / "shared" / "wire" / "gen"
# generated files, relative to GEN_DIR, per .proto (which lies at the same relative place in proto/)
GENERATED = tuple(
    str(proto.relative_to(PROTO_DIR).with_suffix("")) + suffix
    for proto in PROTO_FILES for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def stale() -> bool:
    if not PROTO_FILE.is_file():
        return False  # an installed copy without the protos: use what was generated at build time
    proto_mtime = max(proto.stat().st_mtime for proto in PROTO_FILES)
    for name in GENERATED:
        path = GEN_DIR / name
        if not path.is_file() or path.stat().st_mtime < proto_mtime:
            return True
    return False


def generate() -> None:
    """Run protoc into a temporary folder, then move the files into shared/gen/."""
    from grpc_tools import protoc

    GEN_DIR.mkdir(exist_ok=True)
    # several tier processes may import this at once: one generates, the others wait and reuse
    with open(GEN_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stale():
            return
        with tempfile.TemporaryDirectory(dir=GEN_DIR) as tmp:
            well_known = Path(protoc.__file__).parent / "_proto"
            status = protoc.main([
                "grpc_tools.protoc",
                f"-Ishared/wire/gen={PROTO_DIR}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *(f"shared/wire/gen/{proto.relative_to(PROTO_DIR)}" for proto in PROTO_FILES),
            ])
            if status != 0:
                raise RuntimeError(f"protoc failed ({status}) on {', '.join(map(str, PROTO_FILES))}")
            for name in GENERATED:
                (GEN_DIR / name).parent.mkdir(exist_ok=True)
                os.replace(Path(tmp) / "shared" / "wire" / "gen" / name, GEN_DIR / name)
        for name in GENERATED:  # every generated folder is a package
            (GEN_DIR / name).parent.joinpath("__init__.py").touch()


def inference_stubs() -> tuple[ModuleType, ModuleType]:
    """The Open Inference Protocol stubs (package `inference`): grpc_service_pb2 and _pb2_grpc.

    Loaded on demand only, by the entry tier's server: their messages share full names with
    tritonclient's own copy of the protocol, so the two cannot be imported in one process
    (protobuf refuses duplicate symbols in its default descriptor pool).
    """
    if stale():
        generate()
    return (importlib.import_module("shared.wire.gen.inference.grpc_service_pb2"),
            importlib.import_module("shared.wire.gen.inference.grpc_service_pb2_grpc"))


if __name__ == "__main__":
    shutil.rmtree(GEN_DIR / "__pycache__", ignore_errors=True)
    shutil.rmtree(GEN_DIR / "inference" / "__pycache__", ignore_errors=True)
    for name in GENERATED:
        (GEN_DIR / name).unlink(missing_ok=True)
    generate()
    print(f"generated {', '.join(GENERATED)} in {GEN_DIR}", file=sys.stderr)
