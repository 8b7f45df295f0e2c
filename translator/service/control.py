"""The link between the supervisor and one worker: messages over a Unix socketpair.

Each message is a 4-octet big-endian length and a pickle of ``(number, kind, payload)``.
A request has a number above 0 and gets one reply, ``(number, "ok" | "err", value)``; a
notice has number 0 and no reply. Both ends are the same program, started by root, and
the socketpair is reachable only by the two processes, so pickle is safe here and keeps
owners, addresses and metric families as they are.

Errors of the address table cross the link as data (their constructors take other
arguments than their message), and come out as the same exception types.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from addrmap import CapacityExceeded, InvalidTarget, LimitExceeded, PoolExhausted, QuotaExceeded

log = logging.getLogger("socks64.control")

Handler = Callable[[str, Any], Awaitable[Any]]

_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 64 << 20  # metric families of a busy worker stay far below this


class LinkClosed(ConnectionError):
    """The other end has gone (or the link was closed here)."""


class RemoteError(RuntimeError):
    """The other end failed to handle a request for a reason that has no local type."""


def _error_to_data(exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, LimitExceeded):
        return ("limit", exc.limit, exc.value, exc.owner)
    if isinstance(exc, InvalidTarget):
        return ("invalid", str(exc))
    return ("other", f"{type(exc).__name__}: {exc}")


def _error_from_data(data: tuple[Any, ...]) -> Exception:
    kind = data[0]
    if kind == "limit":
        _, limit, value, owner = data
        if limit == "per_owner_quota":
            return QuotaExceeded(value, owner)
        if limit == "pool":
            return PoolExhausted(value, owner)
        return CapacityExceeded(value, owner, limit=limit)
    if kind == "invalid":
        return InvalidTarget(data[1])
    return RemoteError(data[1])


class ControlLink:
    """One end of a supervisor-worker link."""

    def __init__(self, sock: socket.socket, handler: Handler | None = None) -> None:
        self._sock = sock
        self._handler = handler
        self._numbers = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()

    async def start(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._task = asyncio.create_task(self._read_loop())

    async def call(self, kind: str, payload: Any = None, *, wait: float = 5.0) -> Any:
        """Send a request and wait for its reply; raises LinkClosed, TimeoutError or the
        error the other end raised."""
        if self.closed.is_set() or self._writer is None:
            raise LinkClosed("control link closed")
        number = next(self._numbers)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        try:
            self._send(number, kind, payload)
            return await asyncio.wait_for(future, wait)
        finally:
            self._waiting.pop(number, None)

    def notify(self, kind: str, payload: Any = None) -> None:
        """Send a notice (no reply); dropped when the link is closed."""
        if not self.closed.is_set() and self._writer is not None:
            self._send(0, kind, payload)

    def _send(self, number: int, kind: str, payload: Any) -> None:
        assert self._writer is not None
        data = pickle.dumps((number, kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_HEADER.pack(len(data)) + data)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                header = await self._reader.readexactly(_HEADER.size)
                (size,) = _HEADER.unpack(header)
                if size > _MAX_MESSAGE:
                    raise ValueError(f"control message of {size} octets")
                number, kind, payload = pickle.loads(await self._reader.readexactly(size))
                if kind in ("ok", "err") and number in self._waiting:
                    future = self._waiting[number]
                    if not future.done():
                        if kind == "ok":
                            future.set_result(payload)
                        else:
                            future.set_exception(_error_from_data(payload))
                elif kind not in ("ok", "err"):
                    self._dispatch(number, kind, payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # a message we cannot read: the link is useless now
            log.exception("control link failed")
        finally:
            self._closed_now()

    def _dispatch(self, number: int, kind: str, payload: Any) -> None:
        if self._handler is None:
            return
        task = asyncio.create_task(self._handle(number, kind, payload))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, number: int, kind: str, payload: Any) -> None:
        assert self._handler is not None
        try:
            result = await self._handler(kind, payload)
        except Exception as exc:
            if number:
                self._reply(number, "err", _error_to_data(exc))
            else:
                log.exception("control notice %s failed", kind)
            return
        if number:
            self._reply(number, "ok", result)

    def _reply(self, number: int, kind: str, value: Any) -> None:
        if not self.closed.is_set() and self._writer is not None:
            self._send(number, kind, value)

    def _closed_now(self) -> None:
        self.closed.set()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(LinkClosed("control link closed"))
        self._waiting.clear()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._handlers):
            task.cancel()
        self._closed_now()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
