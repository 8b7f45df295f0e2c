"""Polling with an injectable clock: the lab waits for conditions, it never sleeps and hopes."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


def poll_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    clock: Clock | None = None,
    sleep: Callable[[float], None] | None = None,
) -> bool:
    """Call ``condition`` until it returns true or ``timeout`` seconds pass.

    Returns whether the condition became true. The interval grows gently (up to 0.5 s) so
    a slow start does not spin, and the last check happens at the deadline.
    """
    now = clock or time.monotonic
    pause = sleep or time.sleep
    deadline = now() + timeout
    delay = interval
    while True:
        if condition():
            return True
        remaining = deadline - now()
        if remaining <= 0:
            return False
        pause(min(delay, remaining))
        delay = min(delay * 1.5, 0.5)
