"""Cooperative Ctrl-C / SIGTERM / SIGHUP while a lab is being built.

An asynchronous KeyboardInterrupt can land anywhere, including inside a finalizer or a
logging lock, where Python prints "Exception ignored" and carries on: `lab up` would then
finish and leave a lab nobody asked for. So during `up` a signal only sets a flag, and the
builder raises KeyboardInterrupt at its next checkpoint (after each saved build step),
where its cleanup is sure to run.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

_pending: int | None = None


def install() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into a flag for this process."""
    owner = os.getpid()

    def handler(signum: int, _frame: FrameType | None) -> None:
        global _pending
        if os.getpid() != owner:  # a forked pyroute2 helper: just go
            os._exit(128 + signum)
        _pending = signum

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def checkpoint() -> None:
    """Raise KeyboardInterrupt if a signal arrived since install()."""
    if _pending is not None:
        raise KeyboardInterrupt(f"signal {_pending}")
