"""Channel on a socketpair: reads, writes, the write queue's order and back-pressure,
end of stream, resets, and the hand-over to the relay."""

from __future__ import annotations

import asyncio
import socket

import pytest

from translator.relay.channel import Channel, ChannelClosed


def _channel(sock: socket.socket) -> Channel:
    return Channel(sock, asyncio.get_running_loop())


def _drain(sock: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


async def test_recv_ready_reads_without_the_loop_and_says_none_when_empty(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    assert channel.recv_ready() is None
    theirs.sendall(b"hello")
    assert channel.recv_ready() == b"hello"
    theirs.shutdown(socket.SHUT_WR)
    assert channel.recv_ready() == b""  # end of stream is b"", not None


async def test_recv_waits_for_data_then_returns_empty_at_end_of_stream(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    pending = asyncio.ensure_future(channel.recv())
    await asyncio.sleep(0.01)
    assert not pending.done()
    theirs.sendall(b"late")
    assert await asyncio.wait_for(pending, 5) == b"late"
    theirs.close()
    assert await asyncio.wait_for(channel.recv(), 5) == b""


async def test_a_reset_is_channel_closed() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    channel = _channel(server)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # linger 0: RST
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(channel.recv(), 5)
    finally:
        channel.close()


async def test_send_now_returns_what_the_kernel_did_not_take(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    assert channel.send_now(b"reply") == b""
    assert _drain(theirs, 5) == b"reply"
    big = b"x" * (8 << 20)
    rest = channel.send_now(big)
    assert 0 < len(rest) < len(big)  # the socket buffer filled
    await asyncio.gather(channel.send_all(rest), asyncio.to_thread(_drain, theirs, len(big)))


async def test_write_nowait_keeps_order_behind_a_backlog_and_flushes_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    frames = [bytes([i % 256]) * 300_000 for i in range(8)]
    for frame in frames:
        channel.write_nowait(frame)
    assert channel.queued > 0  # more than the kernel buffers at once
    total = sum(map(len, frames))
    received = await asyncio.wait_for(asyncio.to_thread(_drain, theirs, total), 10)
    assert received == b"".join(frames)
    assert channel.queued == 0


async def test_send_all_waits_behind_queued_datagrams(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    channel.write_nowait(b"a" * (4 << 20))
    assert channel.queued > 0
    reader = asyncio.to_thread(_drain, theirs, (4 << 20) + 5)
    _, received = await asyncio.wait_for(asyncio.gather(channel.send_all(b"reply"), reader), 10)
    assert received.endswith(b"reply") and received.count(b"reply") == 1


async def test_congested_past_the_high_water_mark(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    channel = _channel(ours)
    assert not channel.congested
    channel.write_nowait(b"z" * (4 << 20))  # nobody reads: the queue grows
    assert channel.congested
    channel.close()


async def test_write_nowait_to_a_closed_peer_closes_quietly(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    theirs.close()
    channel.write_nowait(b"x" * 100_000)  # EPIPE: no exception, the channel ends
    channel.write_nowait(b"more")
    assert channel.closed


async def test_detach_hands_the_socket_over_open(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    sock = channel.detach()
    assert sock is ours and sock.fileno() >= 0 and channel.closed
    sock.sendall(b"still mine")
    assert _drain(theirs, 10) == b"still mine"


async def test_close_twice_is_harmless(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    channel = _channel(ours)
    channel.close()
    channel.close()
    assert channel.closed and ours.fileno() == -1
