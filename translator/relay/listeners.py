"""BIND listeners (RFC 1928 section 4, profile 8), including MULTI shared listeners."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from addrmap import Owner
from translator.net.addresses import IPAddress, family_of, sockaddr_ip


class BindListener:
    """A listening socket whose connections are handed to BIND requests one by one."""

    def __init__(self, sock: socket.socket, owner: Owner) -> None:
        self.sock = sock
        self.owner = owner
        self.address = sockaddr_ip(sock.getsockname())
        self.port: int = sock.getsockname()[1]
        self._accept_lock = asyncio.Lock()
        self.closed = False
        # Which peers a MULTI listener admits, set by its holding BIND.
        self.expected: Callable[[IPAddress], bool] = lambda _peer: True

    @classmethod
    def open(
        cls, address: IPAddress, port: int, owner: Owner, *, dual_stack: bool = False
    ) -> BindListener:
        family = family_of(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
            sock.bind((address.compressed, port))
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock, owner)

    async def accept(
        self, accept_peer: Callable[[IPAddress], bool]
    ) -> tuple[socket.socket, IPAddress, int]:
        """The next connection whose peer ``accept_peer`` admits; others are closed."""
        loop = asyncio.get_running_loop()
        async with self._accept_lock:
            while True:
                conn, peer = await loop.sock_accept(self.sock)
                peer_ip = sockaddr_ip(peer)
                if accept_peer(peer_ip):
                    conn.setblocking(False)
                    return conn, peer_ip, int(peer[1])
                conn.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class MultiRegistry:
    """BIND MULTI listeners by (owner, port): the holding connection registers, others attach."""

    def __init__(self) -> None:
        self._listeners: dict[tuple[Owner, int], BindListener] = {}

    def add(self, listener: BindListener) -> None:
        self._listeners[(listener.owner, listener.port)] = listener

    def find(self, owner: Owner, port: int) -> BindListener | None:
        listener = self._listeners.get((owner, port))
        return None if listener is None or listener.closed else listener

    def remove(self, listener: BindListener) -> None:
        with contextlib.suppress(KeyError):
            if self._listeners[(listener.owner, listener.port)] is listener:
                del self._listeners[(listener.owner, listener.port)]
        listener.close()

    def close_all(self) -> None:
        for listener in list(self._listeners.values()):
            listener.close()
        self._listeners.clear()
