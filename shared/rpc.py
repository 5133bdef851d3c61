"""The generated gRPC stubs of proto/tierserve.proto, (re)generated when missing or stale.

proto/inference/grpc_service.proto (the Open Inference Protocol) is generated alongside; its stubs
are loaded only on demand by `inference_stubs()`, see there.

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
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILE = PROTO_DIR / "tierserve.proto"
INFERENCE_PROTO_FILE = PROTO_DIR / "inference" / "grpc_service.proto"
PROTO_FILES = (PROTO_FILE, INFERENCE_PROTO_FILE)
GEN_DIR = REPO_ROOT / "shared" / "gen"
# generated files, relative to GEN_DIR, per .proto (which lies at the same relative place in proto/)
GENERATED = tuple(
    str(proto.relative_to(PROTO_DIR).with_suffix("")) + suffix
    for proto in PROTO_FILES for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def _stale() -> bool:
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
        if not _stale():
            return
        with tempfile.TemporaryDirectory(dir=GEN_DIR) as tmp:
            well_known = Path(protoc.__file__).parent / "_proto"
            status = protoc.main([
                "grpc_tools.protoc",
                f"-Ishared/gen={PROTO_DIR}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *(f"shared/gen/{proto.relative_to(PROTO_DIR)}" for proto in PROTO_FILES),
            ])
            if status != 0:
                raise RuntimeError(f"protoc failed ({status}) on {', '.join(map(str, PROTO_FILES))}")
            for name in GENERATED:
                (GEN_DIR / name).parent.mkdir(exist_ok=True)
                os.replace(Path(tmp) / "shared" / "gen" / name, GEN_DIR / name)
        for name in GENERATED:  # every generated folder is a package
            (GEN_DIR / name).parent.joinpath("__init__.py").touch()


def _load() -> tuple[ModuleType, ModuleType]:
    if _stale():
        generate()
    pb2 = importlib.import_module("shared.gen.tierserve_pb2")
    pb2_grpc = importlib.import_module("shared.gen.tierserve_pb2_grpc")
    return pb2, pb2_grpc


def inference_stubs() -> tuple[ModuleType, ModuleType]:
    """The Open Inference Protocol stubs (package `inference`): grpc_service_pb2 and _pb2_grpc.

    Loaded on demand only, by the entry tier's server: their messages share full names with
    tritonclient's own copy of the protocol, so the two cannot be imported in one process
    (protobuf refuses duplicate symbols in its default descriptor pool).
    """
    if _stale():
        generate()
    return (importlib.import_module("shared.gen.inference.grpc_service_pb2"),
            importlib.import_module("shared.gen.inference.grpc_service_pb2_grpc"))


pb2, pb2_grpc = _load()
SERVICE_NAMES = tuple(s.full_name for s in pb2.DESCRIPTOR.services_by_name.values())
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def message_size_options(max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options limiting messages both ways (the servers' guard against oversize requests)."""
    return [("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes)]


def server_options(max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options of the tiers' servers: message size limits, no channelz call tracking (nothing
    serves it), no deadline-checking filter: a call's deadline still reaches the handler (the tier
    loop budgets its forward by it, calls on a stream time out on their own) and a caller past its
    deadline cancels the call. An ad hoc A/B on this project's VM: ~0.18 ms less per request
    forced through the three tiers."""
    return [*message_size_options(max_bytes), ("grpc.enable_channelz", 0), ("grpc.enable_deadline_checking", 0)]


def channel_options(max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options of tierserve's client channels (tier to tier, TierClient, AsyncTierClient):
    gRPC's minimal stack, without channelz and the optional filters (retries, deadlines, message
    size, census) that every message otherwise passes through on its way out and back (an ad hoc A/B on this
    project's VM: ~0.4 ms less per request forced through the three tiers). tierserve retries and
    keeps deadlines itself (shared.resilience, shared.streaming); the message size limits are then
    the servers' alone (an oversize request fails with the server's RESOURCE_EXHAUSTED), the
    client's own are not enforced. Servers keep their filters (server_options)."""
    return [*message_size_options(max_bytes), ("grpc.minimal_stack", 1), ("grpc.enable_channelz", 0)]


if __name__ == "__main__":
    shutil.rmtree(GEN_DIR / "__pycache__", ignore_errors=True)
    shutil.rmtree(GEN_DIR / "inference" / "__pycache__", ignore_errors=True)
    for stale in GENERATED:
        (GEN_DIR / stale).unlink(missing_ok=True)
    generate()
    print(f"generated {', '.join(GENERATED)} in {GEN_DIR}", file=sys.stderr)
