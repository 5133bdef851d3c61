"""A tier process's tie to the process that started it (shared.tools.processes.start_tier)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "TIERSERVE_PARENT_PID"


def exit_with_parent() -> None:
    """In a tier started by start_tier: get SIGTERM when the starting process dies (Linux).

    Done in the child at startup rather than in a preexec_fn, which is unsafe in a parent with
    threads (gRPC's).
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
