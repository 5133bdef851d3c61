"""The generated gRPC stubs of proto/tierserve.proto, (re)generated when missing or stale.

Stubs are tied to the installed protobuf version, so they are built here, not committed:
`python -m shared.rpc` regenerates them; importing this module does so when needed.
The include mapping `-Ishared/gen=proto` makes the generated code import
`from shared.gen import tierserve_pb2`.
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

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILE = REPO_ROOT / "proto" / "tierserve.proto"
GEN_DIR = REPO_ROOT / "shared" / "gen"
GENERATED = ("tierserve_pb2.py", "tierserve_pb2.pyi", "tierserve_pb2_grpc.py")


def _stale() -> bool:
    if not PROTO_FILE.is_file():
        return False  # an installed copy without the proto: use what was generated at build time
    proto_mtime = PROTO_FILE.stat().st_mtime
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
        if not _stale():
            return
        with tempfile.TemporaryDirectory(dir=GEN_DIR) as tmp:
            well_known = Path(protoc.__file__).parent / "_proto"
            status = protoc.main([
                "grpc_tools.protoc",
                f"-Ishared/gen={PROTO_FILE.parent}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"shared/gen/{PROTO_FILE.name}",
            ])
            if status != 0:
                raise RuntimeError(f"protoc failed ({status}) on {PROTO_FILE}")
            for name in GENERATED:
                os.replace(Path(tmp) / "shared" / "gen" / name, GEN_DIR / name)
        (GEN_DIR / "__init__.py").touch()


def _load() -> tuple[ModuleType, ModuleType]:
    if _stale():
        generate()
    pb2 = importlib.import_module("shared.gen.tierserve_pb2")
    pb2_grpc = importlib.import_module("shared.gen.tierserve_pb2_grpc")
    return pb2, pb2_grpc


pb2, pb2_grpc = _load()
SERVICE_NAMES = tuple(s.full_name for s in pb2.DESCRIPTOR.services_by_name.values())
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def message_size_options(max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options limiting messages both ways; the same on servers and channels."""
    return [("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes)]


if __name__ == "__main__":
    shutil.rmtree(GEN_DIR / "__pycache__", ignore_errors=True)
    for stale in GENERATED:
        (GEN_DIR / stale).unlink(missing_ok=True)
    generate()
    print(f"generated {', '.join(GENERATED)} in {GEN_DIR}", file=sys.stderr)
