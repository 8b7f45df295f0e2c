"""The TCP relay of a session with per-message protection (RFC 1961 section 5).

Client bytes arrive as wrapped messages and leave to the peer as plaintext; peer bytes
are wrapped, one message per read, on their way back. This is the copying path: splice
cannot apply a cipher. Level 0 sessions never come here, and keep the splice relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

from translator.relay.tcp import RelayStats
from translator.wire import Deframer, RemoteProtocolError

from .protection import MessageProtection, ProtectedChannel

_CLIENT_READ = 1 << 18  # several wrapped messages per read


async def relay_protected(
    client: socket.socket,
    peer: socket.socket,
    protection: MessageProtection,
    *,
    deframer: Deframer,
    idle_timeout: float,
    clock: Callable[[], float] = time.monotonic,
    to_peer: bytes = b"",
    stats: RelayStats | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> RelayStats:
    """Relay until both directions ended, one side failed, or the idle timeout hit; both
    sockets are closed when it returns. ``deframer`` holds what the session read of an
    incomplete message; ``to_peer``, plaintext the client pipelined. A message that does
    not unwrap raises RemoteProtocolError, after both sockets are closed."""
    loop = asyncio.get_running_loop() if loop is None else loop
    stats = RelayStats() if stats is None else stats
    last = [clock()]

    async def client_to_peer() -> None:
        if to_peer:
            await loop.sock_sendall(peer, to_peer)
            stats.to_peer += len(to_peer)
        while True:
            raw = await loop.sock_recv(client, _CLIENT_READ)
            if not raw:
                with contextlib.suppress(OSError):
                    peer.shutdown(socket.SHUT_WR)
                return
            last[0] = clock()
            plain = protection.open_all(deframer, raw)
            if plain:
                await loop.sock_sendall(peer, plain)
                stats.to_peer += len(plain)

    async def peer_to_client() -> None:
        size = protection.max_chunk
        while True:
            data = await loop.sock_recv(peer, size)
            if not data:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                return
            last[0] = clock()
            await loop.sock_sendall(client, protection.seal(data))
            stats.to_client += len(data)

    pumps = {loop.create_task(client_to_peer()), loop.create_task(peer_to_client())}
    try:
        while pumps:
            remaining = last[0] + idle_timeout - clock()
            if remaining <= 0:
                stats.idle_timeout = True
                return stats
            done, pumps = await asyncio.wait(
                pumps, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                error = task.exception()
                if isinstance(error, OSError):  # a reset or a closed socket ends both ways
                    return stats
                if error is not None:  # RemoteProtocolError: a message did not unwrap
                    raise error
        return stats
    finally:
        for task in pumps:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(BaseException):
                await task
        for sock in (client, peer):
            with contextlib.suppress(OSError):
                sock.close()


async def relay_channel(
    channel: ProtectedChannel,
    client: socket.socket,
    peer: socket.socket,
    *,
    watched: bool,
    idle_timeout: float,
    clock: Callable[[], float],
    to_peer: bytes,
    stats: RelayStats,
) -> str | None:
    """:func:`relay_protected` for a session's channel, once handed over (``watched``: the
    loop still watches the client for it). Returns why a message was refused, if one was."""
    if watched:  # the relay reads with the loop's own calls
        channel.loop.remove_reader(client.fileno())
    try:
        await relay_protected(
            client,
            peer,
            channel.protection,
            deframer=channel.deframer,
            idle_timeout=idle_timeout,
            clock=clock,
            to_peer=to_peer,
            stats=stats,
            loop=channel.loop,
        )
    except RemoteProtocolError as exc:
        return exc.reason
    return None
