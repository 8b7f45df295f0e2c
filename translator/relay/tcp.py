"""Moving bytes between the client and its peer once a request has succeeded.

The relay works on the two raw sockets with the event loop's reader and writer
callbacks: no task, no stream object, no coroutine per chunk. A direction starts with
recv_into/send through one preallocated buffer; once it has carried ``SPLICE_AFTER``
bytes it switches to splice(2) through a pipe, so bulk data never enters Python.
Half-close passes through (EOF becomes shutdown(SHUT_WR) on the other side, and the
other direction keeps flowing); a reset on either side ends both. Back-pressure is
natural: a direction whose destination is full stops reading its source. A connection
silent in both directions for ``idle_timeout`` seconds is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 256 * 1024
SPLICE_AFTER = 256 * 1024  # short sessions never pay for a pipe
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_HAVE_SPLICE = hasattr(os, "splice")
# One copy buffer for every relay: the loop runs one callback at a time, and a callback
# never keeps bytes in it (what dst does not take is copied out to ``pending``).
_BUFFER = bytearray(CHUNK)
_VIEW = memoryview(_BUFFER)


def splice_enabled() -> bool:
    """splice(2) is used unless unavailable or switched off (SOCKS64_NO_FASTPATH=1)."""
    return _HAVE_SPLICE and os.environ.get("SOCKS64_NO_FASTPATH", "") not in ("1", "true")


@dataclass(slots=True)
class RelayStats:
    to_peer: int = 0
    to_client: int = 0
    idle_timeout: bool = False
    spliced: bool = False


class _Direction:
    __slots__ = (
        "dst",
        "dst_fd",
        "eof",
        "in_pipe",
        "moved",
        "pending",
        "pipe_r",
        "pipe_w",
        "reading",
        "src",
        "src_fd",
        "to_peer",
        "writing",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, to_peer: bool) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.to_peer = to_peer
        self.pending = b""  # bytes read but not yet accepted by dst (copy mode)
        self.in_pipe = 0  # bytes in the pipe (splice mode)
        self.pipe_r = -1
        self.pipe_w = -1
        self.moved = 0
        self.eof = False
        self.reading = False
        self.writing = False


class SocketRelay:
    """Relays two connected sockets until both directions end; await ``done``."""

    def __init__(
        self,
        client: socket.socket,
        peer: socket.socket,
        *,
        idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        splice: bool | None = None,
        stats: RelayStats | None = None,
        client_watched: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``client_watched``: the loop already has a reader registered for ``client`` (a
        Channel's, see Channel.hand_over); the relay takes it over instead of adding one."""
        self.loop = asyncio.get_running_loop() if loop is None else loop
        for sock in (client, peer):
            if sock.gettimeout() != 0.0:  # most come non-blocking: save the ioctl
                sock.setblocking(False)
        self.client = client
        self.peer = peer
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.splice = splice  # None: splice_enabled(), asked once a direction needs it
        self.stats = RelayStats() if stats is None else stats  # counted as bytes move
        self.done: asyncio.Future[RelayStats] = self.loop.create_future()
        self._last = clock()
        self._closed = False
        self._up = _Direction(client, peer, True)
        self._down = _Direction(peer, client, False)
        self._timer = self.loop.call_later(idle_timeout, self._check_idle)
        self._client_watched = client_watched

    def start(self, to_peer: bytes = b"", to_client: bytes = b"") -> asyncio.Future[RelayStats]:
        """Begin relaying; bytes already read from either side go first."""
        if self._client_watched:
            # Replacing the callback of a registration costs no syscall; a new one (after
            # a removal) costs uvloop four epoll_ctl and an ioctl.
            self._client_watched = False
            self._up.reading = True
            self.loop.add_reader(self._up.src_fd, self._readable, self._up)
        for direction, early in ((self._up, to_peer), (self._down, to_client)):
            if early:
                direction.pending = early
                self._count(direction, len(early))
                self._write_pending(direction)
                if direction.pending:  # nothing more is read until these are through
                    self._pause_reading(direction)
            else:
                self._resume_reading(direction)
        return self.done

    # -- loop callbacks ---------------------------------------------------------------

    def _readable(self, d: _Direction) -> None:
        if d.pipe_r >= 0:
            self._splice_in(d)
            return
        try:
            n = d.src.recv_into(_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish()
            return
        if n == 0:
            self._end_of_stream(d)
            return
        self._count(d, n)
        try:
            sent = d.dst.send(_VIEW[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._finish()
            return
        if sent < n:
            d.pending = bytes(_VIEW[sent:n])
            self._pause_reading(d)
            self._start_writing(d)
        elif d.moved >= SPLICE_AFTER and self._splicing():
            self._open_pipe(d)

    def _writable(self, d: _Direction) -> None:
        if d.pipe_r >= 0:
            self._splice_out(d)
            return
        self._write_pending(d)

    def _write_pending(self, d: _Direction) -> None:
        try:
            sent = d.dst.send(d.pending)
        except (BlockingIOError, InterruptedError):
            self._start_writing(d)
            return
        except OSError:
            self._finish()
            return
        d.pending = d.pending[sent:]
        if d.pending:
            self._start_writing(d)
            return
        self._stop_writing(d)
        if d.eof:
            self._shut_down(d)
        else:
            self._resume_reading(d)

    # -- splice mode --------------------------------------------------------------------

    def _splicing(self) -> bool:
        # Decided when first needed: most sessions never move SPLICE_AFTER bytes, and the
        # environment lookup would be paid by every one of them.
        if self.splice is None:
            self.splice = splice_enabled()
        return self.splice

    def _open_pipe(self, d: _Direction) -> None:
        try:
            d.pipe_r, d.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # no pipe to spare: copying works too
        with contextlib.suppress(OSError):
            fcntl.fcntl(d.pipe_w, _F_SETPIPE_SZ, _PIPE_SIZE)
        self.stats.spliced = True

    def _splice_in(self, d: _Direction) -> None:
        try:
            n = os.splice(d.src_fd, d.pipe_w, _PIPE_SIZE, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish()
            return
        if n == 0:
            self._end_of_stream(d)
            return
        d.in_pipe += n
        self._count(d, n)
        self._splice_out(d)

    def _splice_out(self, d: _Direction) -> None:
        while d.in_pipe:
            try:
                n = os.splice(d.pipe_r, d.dst_fd, d.in_pipe, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                self._pause_reading(d)
                self._start_writing(d)
                return
            except OSError:
                self._finish()
                return
            d.in_pipe -= n
        self._stop_writing(d)
        if d.eof:
            self._shut_down(d)
        else:
            self._resume_reading(d)

    # -- state ------------------------------------------------------------------------

    def _count(self, d: _Direction, n: int) -> None:
        d.moved += n
        self._last = self.clock()
        if d.to_peer:
            self.stats.to_peer += n
        else:
            self.stats.to_client += n

    def _end_of_stream(self, d: _Direction) -> None:
        d.eof = True
        self._pause_reading(d)
        if not d.pending and not d.in_pipe:
            self._shut_down(d)

    def _shut_down(self, d: _Direction) -> None:
        try:  # noqa: SIM105 - contextlib.suppress costs an object and two calls here
            d.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self._up.eof and self._down.eof and self._flushed():
            self._finish()

    def _flushed(self) -> bool:
        return not (
            self._up.pending or self._down.pending or self._up.in_pipe or self._down.in_pipe
        )

    def _resume_reading(self, d: _Direction) -> None:
        if not d.reading and not d.eof and not self._closed:
            d.reading = True
            self.loop.add_reader(d.src_fd, self._readable, d)

    def _pause_reading(self, d: _Direction) -> None:
        if d.reading:
            d.reading = False
            self.loop.remove_reader(d.src_fd)

    def _start_writing(self, d: _Direction) -> None:
        if not d.writing and not self._closed:
            d.writing = True
            self.loop.add_writer(d.dst_fd, self._writable, d)

    def _stop_writing(self, d: _Direction) -> None:
        if d.writing:
            d.writing = False
            self.loop.remove_writer(d.dst_fd)

    def _check_idle(self) -> None:
        remaining = self._last + self.idle_timeout - self.clock()
        if remaining > 0:
            self._timer = self.loop.call_later(remaining, self._check_idle)
            return
        self.stats.idle_timeout = True
        self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        if self._client_watched:  # never started: the inherited registration goes too
            self._client_watched = False
            self.loop.remove_reader(self._up.src_fd)
        for d in (self._up, self._down):
            self._pause_reading(d)
            self._stop_writing(d)
        self._closed = True
        self._timer.cancel()
        for d in (self._up, self._down):
            for fd in (d.pipe_r, d.pipe_w):
                if fd >= 0:
                    os.close(fd)
            d.pipe_r = d.pipe_w = -1
        self.client.close()
        self.peer.close()
        if not self.done.done():
            self.done.set_result(self.stats)

    def close(self) -> None:
        """End the relay now (gateway shutdown, cancelled session)."""
        self._finish()


async def relay(
    client: socket.socket,
    peer: socket.socket,
    *,
    idle_timeout: float,
    clock: Callable[[], float] = time.monotonic,
    to_peer: bytes = b"",
    stats: RelayStats | None = None,
    client_watched: bool = False,
    loop: asyncio.AbstractEventLoop | None = None,
) -> RelayStats:
    """Relay until both directions ended, one side failed, or the idle timeout hit.
    Both sockets are closed when it returns, also when the caller is cancelled; ``stats``,
    when given, is counted into as the bytes move (so a cancelled caller still has them).
    ``client_watched``: see SocketRelay."""
    try:
        runner = SocketRelay(
            client,
            peer,
            idle_timeout=idle_timeout,
            clock=clock,
            stats=stats,
            client_watched=client_watched,
            loop=loop,
        )
    except BaseException:
        if client_watched:  # a loop registration holds the socket open: drop it
            with contextlib.suppress(Exception):
                (loop or asyncio.get_running_loop()).remove_reader(client.fileno())
        raise
    try:
        # If our caller is cancelled the future is too; close() below copes with that.
        return await runner.start(to_peer=to_peer)
    finally:
        runner.close()
