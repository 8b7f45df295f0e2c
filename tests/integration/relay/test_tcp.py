"""The relay on real sockets: bytes intact in both directions, half-close passed through,
resets and idle connections ended, in copy mode and in splice mode."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket

import pytest

from translator.relay.tcp import SPLICE_AFTER, SocketRelay

pytestmark = pytest.mark.parametrize("splice", [False, True], ids=["copy", "splice"])


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (splice needs real sockets, not AF_UNIX)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    for sock in (outer, inner):
        sock.setblocking(False)
    return outer, inner


async def send_all(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def read_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while chunk := await loop.sock_recv(sock, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_bulk_both_ways_with_half_close(splice: bool) -> None:
    client, client_inner = pair()
    peer_inner, peer = pair()
    relay = SocketRelay(client_inner, peer_inner, idle_timeout=30, splice=splice)
    done = relay.start(to_peer=b"early:")
    up = os.urandom(3 * SPLICE_AFTER + 12345)  # long enough to switch to splice
    down = os.urandom(5 * SPLICE_AFTER + 99)

    async def client_side() -> bytes:
        await send_all(client, up)
        client.shutdown(socket.SHUT_WR)  # half-close: we still read the answer
        return await read_to_eof(client)

    async def peer_side() -> bytes:
        received = await read_to_eof(peer)  # ends when the client's FIN is passed on
        await send_all(peer, down)
        peer.shutdown(socket.SHUT_WR)
        return received

    async with asyncio.timeout(20):
        got_down, got_up = await asyncio.gather(client_side(), peer_side())
        stats = await done
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(b"early:" + up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert stats.to_peer == len(up) + 6 and stats.to_client == len(down)
    assert stats.spliced is splice
    client.close()
    peer.close()


async def test_reset_on_one_side_ends_both(splice: bool) -> None:
    client, client_inner = pair()
    peer_inner, peer = pair()
    relay = SocketRelay(client_inner, peer_inner, idle_timeout=30, splice=splice)
    done = relay.start()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()  # RST
    with contextlib.suppress(ConnectionError):
        await send_all(client, b"x" * 1000)
    async with asyncio.timeout(5):
        await done
        with contextlib.suppress(ConnectionResetError):  # a reset (bytes unread) ends it too
            assert await read_to_eof(client) == b""
    client.close()


async def test_idle_connection_is_closed(splice: bool) -> None:
    client, client_inner = pair()
    peer_inner, peer = pair()
    relay = SocketRelay(client_inner, peer_inner, idle_timeout=0.2, splice=splice)
    async with asyncio.timeout(5):
        stats = await relay.start()
        assert stats.idle_timeout
        assert await read_to_eof(client) == b""
    client.close()
    peer.close()


async def test_slow_reader_gets_everything(splice: bool) -> None:
    """Back-pressure: a client that reads late still receives every byte."""
    client, client_inner = pair()
    peer_inner, peer = pair()
    relay = SocketRelay(client_inner, peer_inner, idle_timeout=30, splice=splice)
    done = relay.start()
    payload = os.urandom(8 << 20)
    sender = asyncio.create_task(send_all(peer, payload))
    await asyncio.sleep(0.2)  # the client's buffers fill; the relay must stop reading
    async with asyncio.timeout(20):
        await sender
        peer.shutdown(socket.SHUT_WR)
        received = await asyncio.wait_for(read_to_eof_after_close(client), 20)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    client.close()
    relay.close()
    await done
    peer.close()


async def read_to_eof_after_close(sock: socket.socket) -> bytes:
    data = await read_to_eof(sock)
    sock.shutdown(socket.SHUT_WR)
    return data
