"""The control connection every client request rides on: a stream and its parse buffer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from translator.wire import Rep

T = TypeVar("T")


class SocksReplyError(Exception):
    """The gateway answered with a failure reply (``rep``) or refused the handshake."""

    def __init__(self, rep: int, message: str = "") -> None:
        name = Rep(rep).name if rep in Rep._value2member_map_ else str(rep)
        super().__init__(message or f"SOCKS reply {rep:#04x} {name}")
        self.rep = rep


class ControlConnection:
    """A TCP connection to the gateway that replies are read from, one message at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buffer = bytearray()
        #: the connection to the gateway itself (``writer`` is a local pipe under GSS-API
        #: protection) and, then, the protection and the tasks that apply it
        self.network = writer
        self.protection: Any = None
        self.pumps: tuple[asyncio.Task[None], ...] = ()
        self.inner_writer: asyncio.StreamWriter | None = None

    async def _read(self, decode: Callable[[bytearray], tuple[T, int] | None]) -> T:
        while True:
            got = decode(self._buffer)
            if got is not None:
                message, used = got
                del self._buffer[:used]
                return message
            data = await self.reader.read(4096)
            if not data:
                raise ConnectionError("gateway closed the connection")
            self._buffer += data

    async def close(self) -> None:
        writers = [self.writer]
        if self.pumps:
            for task in self.pumps:
                task.cancel()
            for task in self.pumps:
                with contextlib.suppress(BaseException):
                    await task
            assert self.inner_writer is not None
            writers += [self.inner_writer, self.network]
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
