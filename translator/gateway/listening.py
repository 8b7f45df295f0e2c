"""The gateway's listening sockets: opened, adopted from systemd, changed on reload, and
accepted from without spinning when descriptors run out.

Kept listeners are never closed on reload (their backlog and running sessions are
untouched), new ones are bound before anything is committed, removed ones are closed.
Accepting (and resting when descriptors run out) is ``translator.net.accepting``'s.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable

from translator.config import Endpoint
from translator.net.accepting import PAUSE, Acceptor
from translator.ratelog import RateLimitedLog

log = logging.getLogger("socks64.server")

_BACKLOG = 1024

#: called with each accepted connection, its peer address and the listener's endpoint
#: (as text: "127.0.0.1:1080", "[::1]:1080")
OnAccept = Callable[[socket.socket, tuple[object, ...], str], None]


def listening_socket(endpoint: Endpoint, *, reuse_port: bool = False) -> socket.socket:
    """``reuse_port``: one of several copies (one per worker) the kernel balances over."""
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if endpoint.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
        _inherited_nodelay(sock)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {endpoint}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _inherited_nodelay(sock: socket.socket) -> bool:
    """TCP_NODELAY on a listener: Linux copies it to every connection accepted from it,
    which then needs no setsockopt of its own. False where it cannot be set."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def endpoint_of(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return Endpoint(str(host), int(port))


class Listeners:
    """Every listening socket, by the endpoint it was asked for."""

    def __init__(
        self, on_accept: OnAccept, on_pause: Callable[[str], None] = lambda reason: None
    ) -> None:
        self._on_accept = on_accept
        self._on_pause = on_pause
        self._by_request: dict[Endpoint, socket.socket] = {}
        self._adopted: list[socket.socket] = []  # from systemd: kept as long as we run
        self._acceptor = Acceptor(self._accepted, self._paused_by)
        self._pause_log = RateLimitedLog()
        self._labels: dict[int, str] = {}  # listener fd -> its endpoint as text
        # listener fds whose connections do not inherit TCP_NODELAY (adopted sockets
        # that refused it): theirs are set one by one
        self._no_nodelay: set[int] = set()

    @property
    def _paused(self) -> asyncio.TimerHandle | None:
        return self._acceptor.paused

    def _label(self, sock: socket.socket) -> str:
        label = self._labels[sock.fileno()] = str(endpoint_of(sock))
        return label

    @property
    def endpoints(self) -> list[Endpoint]:
        """The bound endpoints (real ports for port 0), adopted ones first."""
        return [endpoint_of(s) for s in [*self._adopted, *self._by_request.values()]]

    def adopt(self, sockets: Iterable[socket.socket]) -> None:
        """Serve sockets handed over by systemd (socket activation)."""
        for sock in sockets:
            sock.setblocking(False)
            if not _inherited_nodelay(sock):
                self._no_nodelay.add(sock.fileno())
            self._adopted.append(sock)
            self._acceptor.watch(sock)

    def open(self, wanted: Iterable[Endpoint]) -> tuple[list[Endpoint], list[Endpoint]]:
        """Make the listeners exactly ``wanted`` (plus adopted ones); returns (added,
        removed). Binds every new one first: when one fails, nothing has changed."""
        wanted = [e for e in dict.fromkeys(wanted) if not self._is_adopted(e)]
        new: dict[Endpoint, socket.socket] = {}
        try:
            for endpoint in wanted:
                if endpoint not in self._by_request:
                    new[endpoint] = listening_socket(endpoint)
        except BaseException:
            for sock in new.values():
                sock.close()
            raise
        removed = [e for e in self._by_request if e not in wanted]
        for endpoint in removed:
            self._close(self._by_request.pop(endpoint))
        for endpoint, sock in new.items():
            self._by_request[endpoint] = sock
            self._acceptor.watch(sock)
        return list(new), removed

    def close(self) -> None:
        self._acceptor.close()
        for sock in [*self._adopted, *self._by_request.values()]:
            self._close(sock)
        self._adopted.clear()
        self._by_request.clear()

    def _is_adopted(self, endpoint: Endpoint) -> bool:
        return any(endpoint_of(s) == endpoint for s in self._adopted)

    def _close(self, sock: socket.socket) -> None:
        self._acceptor.unwatch(sock)
        self._labels.pop(sock.fileno(), None)
        self._no_nodelay.discard(sock.fileno())
        sock.close()

    def _accepted(
        self, sock: socket.socket, peer: tuple[object, ...], listener: socket.socket
    ) -> None:
        """Every connection handed on has TCP_NODELAY: replies and small relayed writes
        go out at once (from the listener, or set here)."""
        fd = listener.fileno()
        if fd in self._no_nodelay:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                sock.close()  # reset already: as when the gateway set it itself
                return
        endpoint = self._labels.get(fd) or self._label(listener)
        self._on_accept(sock, peer, endpoint)

    def _paused_by(self, exc: OSError) -> None:
        self._on_pause(errno.errorcode.get(exc.errno or 0, "EMFILE"))
        self._pause_log(
            log, "cannot accept (%s): pausing accepts for %g s; serving who we have", exc, PAUSE
        )
