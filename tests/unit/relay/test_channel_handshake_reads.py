"""Channel.recv_before (the handshake's reads) and the hand-over of its loop registration
to the relay: one registration and one timer for a session's handshake, the same answers
as a read under asyncio.timeout, and nothing left registered or open afterwards."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from translator.relay.channel import Channel, ChannelClosed
from translator.relay.tcp import relay


def _channel(sock: socket.socket) -> Channel:
    return Channel(sock, asyncio.get_running_loop())


def _deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_reads_one_message_after_another_on_one_registration(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    deadline = _deadline(5)
    first = asyncio.ensure_future(channel.recv_before(100, deadline))
    await asyncio.sleep(0.01)
    assert not first.done()
    theirs.sendall(b"greeting")
    assert await first == b"greeting"
    timer = channel._timer
    theirs.sendall(b"request")
    assert await channel.recv_before(100, deadline) == b"request"
    assert channel._timer is timer  # the same deadline: the same timer
    assert channel._watching  # still registered between the reads
    theirs.shutdown(socket.SHUT_WR)
    assert await channel.recv_before(100, deadline) == b""  # end of stream
    channel.close()
    assert not channel._watching
    assert channel._timer is None


async def test_a_read_past_its_deadline_times_out(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    channel = _channel(ours)
    deadline = _deadline(0.05)
    with pytest.raises(TimeoutError):
        await channel.recv_before(100, deadline)
    # the deadline has passed: the next read with it fails at once, not 0.05 s later
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(channel.recv_before(100, deadline), 0.02)
    channel.close()


async def test_a_deadline_that_passed_while_nobody_read_still_counts(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    deadline = _deadline(0.05)
    theirs.sendall(b"one")
    assert await channel.recv_before(100, deadline) == b"one"
    await asyncio.sleep(0.1)  # the timer fires while the session does something else
    theirs.sendall(b"two")
    with pytest.raises(TimeoutError):
        await channel.recv_before(100, deadline)
    assert await channel.recv_before(100, _deadline(5)) == b"two"  # a new deadline
    channel.close()


async def test_bytes_arriving_while_nobody_reads_wait_in_the_kernel(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    theirs.sendall(b"greeting")
    assert await channel.recv_before(100, _deadline(5)) == b"greeting"
    theirs.sendall(b"early")  # e.g. pipelined while the gateway connects
    await asyncio.sleep(0.05)
    assert not channel._watching  # stopped watching instead of spinning
    assert channel.recv_ready() == b"early"  # nothing was taken from the kernel
    channel.close()


async def test_a_reset_is_channel_closed() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    server.close()
    channel = _channel(accepted)
    reading = asyncio.ensure_future(channel.recv_before(100, _deadline(5)))
    await asyncio.sleep(0.01)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # linger 0: a reset
    with pytest.raises(ChannelClosed):
        await reading
    channel.close()


async def test_cancelled_read_leaves_nothing_registered(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    channel = _channel(ours)
    reading = asyncio.ensure_future(channel.recv_before(100, _deadline(5)))
    await asyncio.sleep(0.01)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    channel.close()
    assert ours.fileno() == -1  # really closed: no loop registration kept it open


async def test_plain_recv_after_recv_before_reads_on_its_own(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = _channel(ours)
    theirs.sendall(b"request")
    assert await channel.recv_before(100, _deadline(5)) == b"request"
    theirs.sendall(b"held")
    assert await asyncio.wait_for(channel.recv(100), 5) == b"held"
    assert not channel._watching
    channel.close()


@pytest.mark.parametrize("early", [b"", b"pipelined"])
async def test_the_relay_takes_over_the_registration(
    pair: tuple[socket.socket, socket.socket], early: bytes
) -> None:
    ours, theirs = pair
    peer_inner, peer_outer = socket.socketpair()
    peer_outer.settimeout(5)
    try:
        channel = _channel(ours)
        theirs.sendall(b"request")
        assert await channel.recv_before(100, _deadline(5)) == b"request"
        client, watched = channel.hand_over()
        assert watched and client is ours
        relaying = asyncio.ensure_future(
            relay(client, peer_inner, idle_timeout=30, to_peer=early, client_watched=True)
        )
        theirs.sendall(b"up")
        got = b""
        while len(got) < len(early) + 2:
            got += await asyncio.to_thread(peer_outer.recv, 100)
        assert got == early + b"up"
        peer_outer.sendall(b"down")
        assert await asyncio.to_thread(theirs.recv, 100) == b"down"
        theirs.shutdown(socket.SHUT_WR)
        peer_outer.shutdown(socket.SHUT_WR)
        stats = await asyncio.wait_for(relaying, 5)
        assert (stats.to_peer, stats.to_client) == (len(early) + 2, 4)
        assert ours.fileno() == -1 and peer_inner.fileno() == -1  # both really closed
        channel.close()  # the session's own close afterwards is harmless
    finally:
        peer_inner.close()
        peer_outer.close()


async def test_a_cancelled_relay_drops_the_registration_it_took_over(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    peer_inner, peer_outer = socket.socketpair()
    try:
        channel = _channel(ours)
        theirs.sendall(b"request")
        assert await channel.recv_before(100, _deadline(5)) == b"request"
        client, watched = channel.hand_over()
        relaying = asyncio.ensure_future(
            relay(client, peer_inner, idle_timeout=30, client_watched=watched)
        )
        await asyncio.sleep(0)  # started (a session awaits relay() directly: always started)
        relaying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await relaying
        assert ours.fileno() == -1 and peer_inner.fileno() == -1
    finally:
        peer_inner.close()
        peer_outer.close()
