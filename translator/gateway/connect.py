"""CONNECT and CONNECT+AA (RFC 1928 section 4; profile 5 and 6)."""

from __future__ import annotations

import logging
import socket
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

from addrmap import Target
from translator import policy as pol
from translator.net.addresses import in_client_family, sockaddr_ip
from translator.net.happy_eyeballs import connect_happy, connect_socket
from translator.wire import FLAG_REAL_FAMILY, Address, AddressId, Phase, Rep, Reply, Request

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("socks64.connect")


class Outbound(NamedTuple):
    sock: socket.socket  # connected, non-blocking; the caller owns it
    target: Target
    realid: int | None  # the REALID the request named, if it named one


async def open_destination(session: Session, address: Address, port: int) -> Outbound:
    """Resolve, check against the policy, and connect with Happy Eyeballs."""
    config = session.gw.config
    target, addresses, realid = await session.destination(address, port, pol.Command.CONNECT)
    if realid is not None:
        session.pin(realid)
    sock = await connect_happy(
        addresses,
        port,
        prefer=config.resolver.prefer_family,
        delay=config.resolver.happy_eyeballs_delay,
        timeout=config.timeouts.connect,
        attempt=partial(connect_socket, interface=config.outbound.interface),
    )
    return Outbound(sock, target, realid)


async def serve_connect(session: Session, request: Request) -> None:
    sock, target, realid = await open_destination(session, request.address, request.port)
    try:
        local = sock.getsockname()
        if request.command.with_aa:
            if realid is None:
                realid = session.gw.table.associate(session.owner, target)
                session.pin(realid)
            bound: Address = AddressId(realid)
        else:
            bound = in_client_family(
                sockaddr_ip(local),
                session.facing_ip,
                real_family=bool(request.flag & FLAG_REAL_FAMILY),
            )
        reply = Reply(Rep.SUCCEEDED, bound, int(local[1]), session.reply_flag(request))
    except BaseException:
        sock.close()
        raise
    stats = await session.relay_after(session.conn.send_reply(reply, then=Phase.RELAY), sock)
    if log.isEnabledFor(logging.DEBUG):  # once per session: skip building the arguments
        log.debug(
            "%s: CONNECT %s:%d done, %d bytes up, %d down%s",
            session.label,
            target,
            request.port,
            stats.to_peer,
            stats.to_client,
            " (idle timeout)" if stats.idle_timeout else "",
        )
