"""A client connection as a raw non-blocking socket, without asyncio transports.

Owning the socket (rather than a StreamReader/Writer pair) is what lets the relay hand
the file descriptors to splice(2) and the event loop's reader/writer callbacks, and it
saves a protocol, a transport and two stream objects per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

_HIGH_WATER = 1 << 20  # bytes queued by write_nowait before callers should back off


class ChannelClosed(ConnectionError):
    """The peer closed or reset the connection."""


class Channel:
    """Async reads and writes on one connected non-blocking socket."""

    __slots__ = (
        "_backlog",
        "_deadline",
        "_drained",
        "_flushing",
        "_timer",
        "_waiter",
        "_want",
        "_watching",
        "closed",
        "loop",
        "sock",
    )

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.closed = False
        self._backlog = bytearray()  # write_nowait bytes the kernel did not take yet
        self._flushing = False
        self._drained: asyncio.Future[None] | None = None
        # recv_before: the reader registration kept between reads, the read waiting on
        # it, and one timer for the deadline those reads share.
        self._watching = False
        self._waiter: asyncio.Future[bytes] | None = None
        self._want = 0
        self._deadline = -1.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def peername(self) -> tuple[object, ...]:
        return self.sock.getpeername()  # type: ignore[no-any-return]

    @property
    def sockname(self) -> tuple[object, ...]:
        return self.sock.getsockname()  # type: ignore[no-any-return]

    def recv_ready(self, size: int = 65536) -> bytes | None:
        """Bytes already waiting in the kernel, without the event loop; None if none."""
        try:
            return self.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None

    async def recv_before(self, size: int, deadline: float) -> bytes:
        """Up to ``size`` bytes; b"" at end of stream; TimeoutError at ``deadline`` (loop
        time). Resets raise ChannelClosed.

        For the handshake's reads, one message after another: the loop keeps watching the
        socket between them (a new uvloop watch costs four epoll_ctl and an ioctl), and
        reads with the same deadline share one timer (asyncio.timeout per read costs a
        context manager, a task lookup and a timer each).
        """
        if deadline != self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._deadline = deadline
            self._timer = self.loop.call_at(deadline, self._expire)
        elif self._timer is None:  # this deadline has passed already
            raise TimeoutError
        waiter: asyncio.Future[bytes] = self.loop.create_future()
        self._waiter = waiter
        self._want = size
        if not self._watching:
            self._watching = True
            self.loop.add_reader(self.sock.fileno(), self._readable)
        try:
            return await waiter
        finally:
            self._waiter = None

    def _readable(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # Nobody reads now (a request is being served): stop watching, and the bytes
            # wait in the kernel, as they would have without the kept registration.
            self._unwatch()
            return
        try:
            data = self.sock.recv(self._want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            waiter.set_exception(ChannelClosed(str(exc)))
            return
        waiter.set_result(data)

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self.loop.remove_reader(self.sock.fileno())

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = -1.0

    async def recv(self, size: int = 65536) -> bytes:
        """Up to ``size`` bytes; b"" at end of stream. Resets raise ChannelClosed."""
        self._unwatch()  # the loop's sock_recv registers (and removes) its own reader
        try:
            return await self.loop.sock_recv(self.sock, size)
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(str(exc)) from None

    def send_now(self, data: bytes) -> bytes:
        """Send what the kernel takes at once; returns the rest (usually b"")."""
        if self._backlog:
            return data
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return data
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        return data[sent:]

    async def send_all(self, data: bytes) -> None:
        if self._backlog:
            self._backlog += data  # keep order behind queued datagrams
            await self._drain()
            return
        try:
            await self.loop.sock_sendall(self.sock, data)
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(str(exc)) from None

    def write_nowait(self, data: bytes) -> None:
        """Queue bytes without waiting (tunnelled datagrams); order is kept."""
        if self.closed:
            return
        if not self._backlog:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._backlog += data
        if not self._flushing:
            self._flushing = True
            self.loop.add_writer(self.sock.fileno(), self._flush)

    @property
    def queued(self) -> int:
        return len(self._backlog)

    @property
    def congested(self) -> bool:
        return len(self._backlog) > _HIGH_WATER

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self._backlog)
        except BlockingIOError:
            return
        except OSError:
            self._stop_flushing()
            self.close()
            return
        del self._backlog[:sent]
        if not self._backlog:
            self._stop_flushing()

    def _stop_flushing(self) -> None:
        if self._flushing:
            self._flushing = False
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.sock.fileno())
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def _drain(self) -> None:
        if self._backlog and not self.closed:
            self._drained = self.loop.create_future()
            await self._drained
        if self.closed:
            raise ChannelClosed("closed while sending")

    def detach(self) -> socket.socket:
        """Hand the socket over (to the relay); the channel forgets it."""
        self._stop_flushing()
        self._unwatch()
        self._disarm()
        self.closed = True
        return self.sock

    def hand_over(self) -> tuple[socket.socket, bool]:
        """``detach``, but a reader registration recv_before left on the loop stays, for
        the relay to take over (it replaces the callback: no epoll_ctl). Returns the
        socket and whether the loop still watches it for reading."""
        watched = self._watching
        self._watching = False
        self._stop_flushing()
        self._disarm()
        self.closed = True
        return self.sock, watched

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._stop_flushing()
            self._unwatch()
        self._disarm()
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
