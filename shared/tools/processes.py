"""Start and stop the three tiers as local processes (tests, demo, bench).

Each tier runs `python -m <tier>_node` in its own process group on a free 127.0.0.1 port, with
its log in a file. Stopping sends SIGTERM to the group, waits, then SIGKILLs what is left; on
Linux a tier also gets SIGTERM if the process that started it dies.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.client import health_status
from shared.contract.manifest import TIERS
from shared.serving.process import PARENT_PID_ENV
from shared.wire.tls import ClientTLS

REPO_ROOT = Path(__file__).resolve().parents[2]


_PORTS_BELOW_EPHEMERAL = 12000  # how many ports under the ephemeral range free_port picks from
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and that no outgoing connection will take before a tier binds it.

    The kernel's "any free port" comes from the ephemeral range, which outgoing connections also
    draw their source ports from: with many gRPC channels opening, one took such a port between
    this check and the tier's bind. So pick below that range, never the same port twice.
    """
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(max(1024, low - _PORTS_BELOW_EPHEMERAL), low)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # that range is full: any free port
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class TierProcess:
    tier: str
    address: str
    metrics_port: int
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> int:
        """SIGKILL the tier's process group (a crash: no graceful shutdown); the exit status."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the tier's process group, SIGKILL it after `timeout`; the exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def start_tier(tier: str, artifacts: str | Path, log_dir: Path, next_address: str | None = None,
               flags: Mapping[str, object] | None = None, env: Mapping[str, str] | None = None,
               address: str | None = None, metrics_port: int | None = None) -> TierProcess:
    """Launch one tier (not waiting for it). flags: extra settings, e.g. {"threshold": 0.9}.

    address, metrics_port: where to listen (a restart reuses them); default: free ports.
    """
    address = address or f"127.0.0.1:{free_port()}"
    metrics_port = metrics_port or free_port()
    argv = [sys.executable, "-m", f"{tier}_node", "--listen", address,
            "--artifacts", str(Path(artifacts).resolve()), "--metrics-port", str(metrics_port)]
    if next_address:
        argv += ["--next", next_address]
    for name, value in (flags or {}).items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    log_path = log_dir / f"{tier}.log"
    child_env = {**os.environ, **(env or {}), PARENT_PID_ENV: str(os.getpid())}
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:  # a restarted tier appends to its log
        process = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=child_env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    return TierProcess(tier, address, metrics_port, log_path, process)


def wait_until_serving(processes: Iterable[TierProcess], timeout: float = 60.0,
                       tls: ClientTLS | None = None) -> None:
    """Poll standard health until every tier is SERVING; raise with its log if one dies or hangs.

    tls: how to reach tiers that serve TLS (the same client credentials for every tier).
    """
    deadline = time.monotonic() + timeout
    waiting = list(processes)
    while waiting:
        for proc in list(waiting):
            if proc.process.poll() is not None:
                raise RuntimeError(
                    f"the {proc.tier} tier exited with status {proc.process.returncode}:\n"
                    f"{proc.log_tail()}")
            if health_status(proc.address, timeout=0.5, tls=tls) == "SERVING":
                waiting.remove(proc)
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(
                f"tiers {[p.tier for p in waiting]} not SERVING after {timeout:.0f}s:\n"
                + "\n".join(p.log_tail() for p in waiting))
        if waiting:
            time.sleep(0.1)


class TierCluster:
    """The three tiers, started together; use as a context manager so they are always stopped."""

    def __init__(self, artifacts: str | Path,
                 flags: Mapping[str, Mapping[str, object]] | None = None,
                 log_dir: str | Path | None = None, env: Mapping[str, str] | None = None,
                 health_tls: ClientTLS | None = None) -> None:
        self.artifacts = Path(artifacts)
        self.flags = flags or {}
        self.env = env
        self.health_tls = health_tls  # client credentials for health checks of TLS tiers
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="tierserve-logs-")
        self.log_dir = Path(log_dir or self._tmp.name)  # type: ignore[union-attr]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tiers: dict[str, TierProcess] = {}

    @property
    def entry_address(self) -> str:
        return self.tiers[TIERS[0]].address

    def start(self, timeout: float = 60.0) -> TierCluster:
        """Start cloud, edge, mobile (each pointing at the next) and wait until all are SERVING."""
        try:
            next_address = None
            for tier in reversed(TIERS):
                started = start_tier(tier, self.artifacts, self.log_dir, next_address,
                                     self.flags.get(tier), self.env)
                self.tiers[tier] = started
                next_address = started.address
            wait_until_serving(self.tiers.values(), timeout, self.health_tls)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, tier: str, timeout: float = 60.0, wait: bool = True) -> TierProcess:
        """Start `tier` again on its address (after kill() or stop()); wait until SERVING if asked."""
        old = self.tiers[tier]
        following = TIERS[TIERS.index(tier) + 1:]
        next_address = self.tiers[following[0]].address if following else None
        started = start_tier(tier, self.artifacts, self.log_dir, next_address, self.flags.get(tier),
                             self.env, address=old.address, metrics_port=old.metrics_port)
        self.tiers[tier] = started
        if wait:
            wait_until_serving([started], timeout, self.health_tls)
        return started

    def stop(self, timeout: float = 10.0) -> dict[str, int]:
        """Stop the entry tier first so no new work flows in; the exit status per tier."""
        statuses = {}
        for tier in TIERS:
            if tier in self.tiers:
                statuses[tier] = self.tiers[tier].stop(timeout)
        return statuses

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> TierCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running_tiers(artifacts: str | Path, **kwargs: object) -> Iterator[TierCluster]:
    """`with running_tiers(folder) as cluster: TierClient(cluster.entry_address)...`"""
    cluster = TierCluster(artifacts, **kwargs)  # type: ignore[arg-type]
    try:
        yield cluster.start()
    finally:
        cluster.close()
