"""Connections handed on by Listeners have TCP_NODELAY, inherited from the listener
(no setsockopt per connection), for opened and adopted listeners alike."""

from __future__ import annotations

import asyncio
import socket

from translator.config import Endpoint
from translator.gateway.listening import Listeners


async def _accept_one(listeners: Listeners, port: int) -> socket.socket:
    got: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
    listeners._on_accept = lambda sock, peer, endpoint: got.set_result(sock)
    client = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        return await asyncio.wait_for(got, 2)
    finally:
        client.close()


async def test_connections_of_opened_listeners_have_nodelay() -> None:
    listeners = Listeners(lambda *args: None)
    listeners.open([Endpoint("127.0.0.1", 0)])
    try:
        port = listeners.endpoints[0].port
        sock = await _accept_one(listeners, port)
        with sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listeners.close()


async def test_connections_of_adopted_listeners_have_nodelay() -> None:
    adopted = socket.create_server(("127.0.0.1", 0))
    assert not adopted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    listeners = Listeners(lambda *args: None)
    listeners.adopt([adopted])
    try:
        sock = await _accept_one(listeners, adopted.getsockname()[1])
        with sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listeners.close()
