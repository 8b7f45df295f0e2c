"""Accepting from listening sockets on the event loop, without spinning when descriptors
run out.

A loop reader callback takes up to ``batch`` connections per wake-up (no task per
accept). When ``accept`` fails for lack of descriptors or memory, every watched listener
rests for ``PAUSE`` seconds and then is watched again by itself: a readable listener that
cannot be drained would otherwise wake the loop on every turn (one core at 100 %). The
SOCKS listeners and the metrics endpoint both accept through this.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("socks64.accept")

PAUSE = 0.1  # seconds accepting rests after running out of descriptors
BATCH = 64  # connections taken per wake-up, so one listener cannot starve the loop
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: called with each accepted connection, its peer address and the listener it came from
OnAccept = Callable[[socket.socket, tuple[object, ...], socket.socket], None]


def _ignore(exc: OSError) -> None:
    return None


class Acceptor:
    """Watches listening sockets and hands each accepted connection to ``on_accept``;
    ``on_pause`` hears each exhaustion error that started a pause."""

    def __init__(self, on_accept: OnAccept, on_pause: Callable[[OSError], None] = _ignore) -> None:
        self._on_accept = on_accept
        self._on_pause = on_pause
        self._watched: dict[int, socket.socket] = {}
        self.paused: asyncio.TimerHandle | None = None  # the pending resume while resting

    def watch(self, sock: socket.socket) -> None:
        self._watched[sock.fileno()] = sock
        if self.paused is None:  # a resting acceptor starts watching when it resumes
            # socket.accept() turns the listener's family and type into enums for every
            # connection: they are read once here, as plain integers (unless accept is
            # not the socket module's own: then it is called as it is).
            kind = None
            if type(sock).accept is socket.socket.accept:
                kind = (int(sock.family), int(sock.type), sock.proto)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock, kind)

    def unwatch(self, sock: socket.socket) -> None:
        self._watched.pop(sock.fileno(), None)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(sock.fileno())

    def close(self) -> None:
        """Stop watching everything (the sockets stay open: their owner closes them)."""
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        for sock in list(self._watched.values()):
            self.unwatch(sock)

    def _accept(self, listener: socket.socket, kind: tuple[int, int, int] | None) -> None:
        # What socket.accept() does, less its enum conversions; its default-timeout rule
        # (a listener with a timeout passes blocking mode on) holds as there.
        blocking = socket.getdefaulttimeout() is None and bool(listener.gettimeout())
        for _ in range(BATCH):
            try:
                if kind is None:
                    sock, peer = listener.accept()
                else:
                    fd, peer = listener._accept()  # type: ignore[attr-defined]
                    sock = socket.socket(*kind, fileno=fd)
                    if blocking:
                        sock.setblocking(True)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in EXHAUSTED:
                    self._pause(exc)
                else:  # ECONNABORTED and friends: that one connection is gone
                    log.debug("accept failed: %s", exc)
                return
            self._on_accept(sock, peer, listener)

    def _pause(self, exc: OSError) -> None:
        self._on_pause(exc)
        loop = asyncio.get_running_loop()
        for fd in self._watched:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        self.paused = loop.call_later(PAUSE, self._resume)

    def _resume(self) -> None:
        self.paused = None
        for sock in list(self._watched.values()):
            self.watch(sock)
