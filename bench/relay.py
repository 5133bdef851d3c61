"""The floor of this stack: three Python processes that run the same slices and pass raw bytes on.

Each relay process runs its slice with tierserve's thread settings (shared.serving.runner.SliceRunner) on
a grpc.aio server under uvloop, as the tiers do, and forwards the next slice's inputs on one open
grpc.aio stream as raw bytes: no protobuf messages, no codec, no checks, no metrics, no exits.
The client sends the tokenised text on an open blocking stream and reads the answer (the last
slice's logits and the three slices' onnxruntime seconds) itself. bench.overhead measures it
beside the tiers: what is left between this relay and the tiers is tierserve's own per-request
work; what is left between the relay and the in-process chain is Python, gRPC and the processes.
"""

from __future__ import annotations

import os
import queue
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from shared.contract.manifest import TIERS, Manifest, verified_slice_path
from shared.contract.text import TextEncoder
from shared.serving.placement import parse_cpu_list, pin_process
from shared.serving.process import PARENT_PID_ENV, exit_with_parent

METHOD = "/relay.Relay/Stream"
_DTYPES = [np.dtype(np.float32), np.dtype(np.int64)]  # what the slices take and give


def pack(arrays: Sequence[np.ndarray]) -> bytes:
    """Arrays as bytes: per array its dtype, rank, shape, then its values (native order)."""
    parts = [struct.pack("<B", len(arrays))]
    for array in arrays:
        parts += [struct.pack(f"<BB{array.ndim}I", _DTYPES.index(array.dtype), array.ndim, *array.shape),
                  np.ascontiguousarray(array).tobytes()]
    return b"".join(parts)


def unpack(data: bytes) -> list[np.ndarray]:
    (count,), offset, arrays = struct.unpack_from("<B", data), 1, []
    for _ in range(count):
        kind, ndim = struct.unpack_from("<BB", data, offset)
        shape = struct.unpack_from(f"<{ndim}I", data, offset + 2)
        offset += 2 + 4 * ndim
        dtype = _DTYPES[kind]
        size = int(np.prod(shape))
        arrays.append(np.frombuffer(data, dtype, size, offset).reshape(shape))
        offset += size * dtype.itemsize
    return arrays


def serve(artifacts: Path, tier: str, port: int, next_port: int) -> None:
    """One relay process: run the tier's slice on what arrives, forward or answer (uvloop)."""
    exit_with_parent()  # as a tier does: no relay outlives a bench that was killed
    import grpc
    import uvloop

    from shared.contract.manifest import load_manifest
    from shared.serving.runner import SliceRunner
    from shared.wire.rpc import channel_options, server_options

    manifest = load_manifest(artifacts)
    spec = manifest.slice(tier)  # type: ignore[arg-type]
    runner = SliceRunner(verified_slice_path(artifacts, spec), spec)
    position = TIERS.index(tier)  # type: ignore[arg-type]
    next_inputs = manifest.slices[position + 1].inputs if next_port else []

    async def main() -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{next_port}", channel_options()) if next_port else None
        forward = None

        async def relay(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
            nonlocal forward
            async for request in requests:
                feed = dict(zip(spec.inputs, unpack(request), strict=True))
                result = runner.run_sync(feed)
                if channel is None:
                    yield pack([result.outputs["logits"], np.array([[result.compute_seconds]], np.float32)])
                    continue
                if forward is None:
                    forward = channel.stream_stream(METHOD)()
                sources = {**feed, **result.outputs}
                await forward.write(pack([sources[spec.forwards.get(name, name)] for name in next_inputs]))
                logits, seconds = unpack(await forward.read())
                yield pack([logits, seconds + np.float32(result.compute_seconds)])

        server = grpc.aio.server(options=server_options())
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            METHOD.split("/")[1], {METHOD.split("/")[2]: grpc.stream_stream_rpc_method_handler(relay)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


class Relay:
    """The three relay processes on 127.0.0.1, placed on `cpus` (tier -> CPU list) when given."""

    def __init__(self, artifacts: Path, manifest: Manifest, cpus: Mapping[str, str] | None = None) -> None:
        import grpc

        from shared.tools.processes import free_port
        from shared.wire.rpc import channel_options

        self.manifest = manifest
        ports = [free_port() for _ in TIERS]
        self.processes: list[subprocess.Popen] = []
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        try:
            for i, tier in enumerate(TIERS):
                next_port = ports[i + 1] if i + 1 < len(TIERS) else 0
                self.processes.append(subprocess.Popen([sys.executable, "-m", "bench.relay", str(artifacts), tier,
                                                        str(ports[i]), str(next_port)], env=env))
                if cpus and tier in cpus:
                    pin_process(parse_cpu_list(cpus[tier]), self.processes[-1].pid)
            for port in reversed(ports):  # each listens once its slice is loaded: wait for all three
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    grpc.channel_ready_future(channel).result(timeout=120)
        except BaseException:  # none left running behind a failed start
            self._stop_processes()
            raise
        self.channel = grpc.insecure_channel(f"127.0.0.1:{ports[0]}", channel_options())
        self.requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.responses = self.channel.stream_stream(METHOD)(iter(self.requests.get, None))

    def call(self, feed: Mapping[str, np.ndarray]) -> tuple[np.ndarray, float]:
        """The last slice's logits for the first slice's inputs, and the slices' onnxruntime seconds."""
        self.requests.put(pack([feed[name] for name in self.manifest.slices[0].inputs]))
        logits, seconds = unpack(next(self.responses))
        return logits, float(seconds.sum())

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()
        self._stop_processes()

    def _stop_processes(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(10)


def latencies(relay: Relay, encoder: TextEncoder, texts: Sequence[str]) -> tuple[list[float], list[float]]:
    """Seconds per text through the relay (tokenising included, as in the chain and the tiers),
    and the slices' onnxruntime seconds."""
    seconds, compute = [], []
    for text in texts:
        started = time.perf_counter()
        _, spent = relay.call(encoder.encode([text]).tensors)
        seconds.append(time.perf_counter() - started)
        compute.append(spent)
    return seconds, compute


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
