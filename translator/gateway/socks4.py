"""SOCKS 4 and 4a: CONNECT and BIND (profile 1). 4a names are resolved by the gateway.

SOCKS 4 has no user authentication (USERID is informational) and no reply codes beyond
granted / rejected, so every failure is CD 91 with the reason in the log.
"""

from __future__ import annotations

import contextlib
import logging
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from addrmap import AddrMapError
from translator import policy as pol
from translator.net.addresses import IPAddress, is_unspecified
from translator.net.resolver import ResolveError
from translator.wire import (
    UNSPECIFIED_V4,
    Phase,
    Rep,
    Socks4Command,
    Socks4Reply,
    Socks4Request,
    Socks4Status,
)

from .bind import Expected, accept_while_client_waits, open_listener
from .connect import open_destination
from .replies import GatewayError, describe
from .session import ClientGone

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("socks64.socks4")


def _v4_or_unspecified(address: IPAddress, session: Session) -> IPv4Address:
    """SOCKS 4 replies carry IPv4 only: fall back to our facing address, else 0.0.0.0."""
    if isinstance(address, IPv4Address) and not address.is_unspecified:
        return address
    facing = session.facing_ip
    return facing if isinstance(facing, IPv4Address) else UNSPECIFIED_V4


async def serve_socks4(session: Session, request: Socks4Request) -> None:
    try:
        if request.command == Socks4Command.CONNECT:
            await _connect(session, request)
        else:
            await _bind(session, request)
    except (GatewayError, OSError, ResolveError, AddrMapError) as exc:
        log.info(
            "%s: SOCKS4 %s %s:%d: %s -> rejected",
            session.label,
            request.command.name,
            request.address,
            request.port,
            describe(exc),
        )
        with contextlib.suppress(ClientGone, TimeoutError):
            await session.send(session.conn.send_error(Rep.GENERAL_FAILURE))


async def _connect(session: Session, request: Socks4Request) -> None:
    sock, _, _ = await open_destination(session, request.address, request.port)
    granted = Socks4Reply(Socks4Status.GRANTED)
    await session.relay_after(session.conn.send_socks4_reply(granted, then=Phase.RELAY), sock)


async def _bind(session: Session, request: Socks4Request) -> None:
    addresses: list[IPAddress] | None = None  # DSTIP 0.0.0.0: any peer, as in SOCKS 5
    if not is_unspecified(request.address):
        _, addresses, _ = await session.destination(request.address, request.port, pol.Command.BIND)
    listener = open_listener(session, addresses)
    try:
        first = Socks4Reply(
            Socks4Status.GRANTED, listener.port, _v4_or_unspecified(listener.address, session)
        )
        await session.send(session.conn.send_socks4_reply(first, then=Phase.BIND_WAIT))
        sock, peer_ip, peer_port = await accept_while_client_waits(
            session, listener, Expected(session, addresses)
        )
    finally:
        listener.close()
    second = Socks4Reply(Socks4Status.GRANTED, peer_port, _v4_or_unspecified(peer_ip, session))
    await session.relay_after(session.conn.send_socks4_reply(second, then=Phase.RELAY), sock)
