"""A minimal asyncio HTTP endpoint for ``GET /metrics`` (Prometheus text).

It runs on the gateway's event loop rather than in ``prometheus_client.start_http_server``'s
thread: the collectors (UDP totals, the ADDRESS ID table) read state that lives on the
loop, and scraping it from another thread would race it. Serving on the loop makes every
scrape a consistent snapshot. It accepts through ``accepting.Acceptor``, like the SOCKS
listeners: when descriptors run out it rests for a moment instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import Awaitable
from typing import Any, Final, Protocol

from .accepting import Acceptor


class Exposition(Protocol):
    """What the endpoint serves: ``translator.metrics.Metrics`` is one."""

    content_type: str

    def render(self) -> bytes | Awaitable[bytes]: ...


_HEADER_LIMIT: Final = 8192
_HEADER_TIMEOUT: Final = 5.0
_BODY_DISCARD_LIMIT: Final = 65536
_INDEX: Final = b"socks64 metrics exporter: see /metrics\n"
_TEXT: Final = "text/plain; charset=utf-8"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsServer:
    """A minimal HTTP/1.x server for ``GET /metrics`` that runs on the gateway's loop."""

    def __init__(self, metrics: Exposition, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host.removeprefix("[").removesuffix("]")
        self.port = port
        self._sock: socket.socket | None = None
        self._acceptor = Acceptor(self._accepted)
        self._bound: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._transports: set[asyncio.WriteTransport] = set()

    @property
    def endpoint(self) -> str:
        """``host:port`` (``[v6]:port``), the bound port once started."""
        host, port = self._bound or (self.host, self.port)
        return _format_endpoint(host, port)

    async def start(self) -> tuple[str, int]:
        """Bind and listen; returns the bound address (the real port when 0 was asked)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(64)
            sock.setblocking(False)
            name = sock.getsockname()
            self._acceptor.watch(sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._bound = (str(name[0]), int(name[1]))
        return self._bound

    def _accepted(
        self, conn: socket.socket, peer: tuple[object, ...], listener: socket.socket
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=_HEADER_LIMIT)
        except (OSError, asyncio.CancelledError):
            conn.close()
            return
        await self._handle(reader, writer)

    async def close(self) -> None:
        """Stop listening and abort scrapes in progress."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._acceptor.close()
        sock.close()
        for transport in list(self._transports):
            transport.abort()  # the handler sees EOF or a reset and returns
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one request and close; never raises, not even when cancelled."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._transports.add(writer.transport)
        try:
            try:
                async with asyncio.timeout(_HEADER_TIMEOUT):
                    version, status, content_type, body = await self._respond(reader)
            except _BadRequest as exc:
                version, status, content_type = "HTTP/1.0", exc.status, _TEXT
                body = f"{status} {_REASONS[status]}\n".encode()
            head = [
                f"{version} {status} {_REASONS[status]}",
                f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}",
                "Connection: close",
            ]
            if status == 405:
                head.append("Allow: GET")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), _HEADER_TIMEOUT)
        except Exception:
            pass  # a broken, silent or slow client; the next scrape is unaffected
        except asyncio.CancelledError:
            # Finish normally: this task only serves one connection, and Python 3.11's
            # streams log a cancelled client_connected_cb task as an error.
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._transports.discard(writer.transport)
            if task is not None:
                self._tasks.discard(task)

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, int, str, bytes]:
        """Read the request head (bounded) and pick version, status, content type and body."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(431) from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                raise  # connected and left without a word: nothing to answer
            raise _BadRequest(400) from None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400)
        method, target, version = parts
        version = "HTTP/1.0" if version == "HTTP/1.0" else "HTTP/1.1"
        status = 200
        if method != "GET":
            await self._discard_body(reader, lines[1:])
            status = 405
        else:
            path = target.split("?", 1)[0]
            if path == "/metrics":
                body = self.metrics.render()
                if inspect.isawaitable(body):  # the supervisor's: gathered from workers
                    body = await body
                return version, 200, self.metrics.content_type, body
            if path == "/":
                return version, 200, _TEXT, _INDEX
            status = 404
        return version, status, _TEXT, f"{status} {_REASONS[status]}\n".encode()

    @staticmethod
    async def _discard_body(reader: asyncio.StreamReader, headers: list[str]) -> None:
        """Read a small request body so closing does not reset the answer away."""
        for line in headers:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                with contextlib.suppress(ValueError, asyncio.IncompleteReadError):
                    length = int(value.strip())
                    if 0 < length <= _BODY_DISCARD_LIMIT:
                        await reader.readexactly(length)
                return
