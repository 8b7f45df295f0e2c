"""Moving bytes between the client and its peer once a request has succeeded.

Half-close is passed through (EOF on one side becomes a FIN on the other, and the other
direction keeps flowing); a reset on either side ends both. A connection with no bytes in
either direction for ``idle_timeout`` seconds is closed. Back-pressure comes from
``drain()``: a client that never reads stops us reading from its peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 256 * 1024


@dataclass(slots=True)
class RelayStats:
    to_peer: int = 0
    to_client: int = 0
    idle_timeout: bool = False


class _Activity:
    __slots__ = ("clock", "last")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.last = clock()


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    activity: _Activity,
    stats: RelayStats,
    to_peer: bool,
) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        activity.last = activity.clock()
        if to_peer:
            stats.to_peer += len(data)
        else:
            stats.to_client += len(data)
        writer.write(data)
        await writer.drain()
        activity.last = activity.clock()
    if writer.can_write_eof() and not writer.is_closing():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def relay(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    peer: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    idle_timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> RelayStats:
    """Relay until both directions ended, one side failed, or the idle timeout hit."""
    stats = RelayStats()
    activity = _Activity(clock)
    pending = {
        asyncio.create_task(_pump(client[0], peer[1], activity, stats, True)),
        asyncio.create_task(_pump(peer[0], client[1], activity, stats, False)),
    }
    try:
        while pending:
            remaining = activity.last + idle_timeout - clock()
            if remaining <= 0:
                stats.idle_timeout = True
                break
            done, pending = await asyncio.wait(
                pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if any(not task.cancelled() and task.exception() is not None for task in done):
                break  # a reset or broken pipe on one side ends the session
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return stats
