"""Logging a recurring condition without flooding the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """Log a recurring condition at most once per ``interval``, with a count of the rest."""

    def __init__(
        self,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        level: int = logging.WARNING,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.level = level
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, logger: logging.Logger, message: str, *args: object) -> None:
        now = self.clock()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" (and {self._suppressed} more)"
            self._suppressed = 0
        self._next = now + self.interval
        logger.log(self.level, message, *args)
