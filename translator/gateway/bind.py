"""BIND and BIND+AA, with the PORT and MULTI flags (RFC 1928 section 4; profile 5, 6, 8).

The listener takes the family of DST (a name or ID: the family the policy picks first;
unspecified: dual-stack). The first reply gives the listening endpoint, the second the
peer that connected. With MULTI the first BIND holds the listener open; further BINDs
with MULTI from the same owner naming that endpoint's port each take one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

from translator import policy as pol
from translator.net.addresses import (
    IPAddress,
    in_client_family,
    is_unspecified,
    local_address_toward,
)
from translator.net.happy_eyeballs import order_addresses
from translator.relay.listeners import BindListener
from translator.wire import (
    FLAG_BIND_MULTI,
    FLAG_BIND_PORT,
    FLAG_REAL_FAMILY,
    UNSPECIFIED_ID,
    Address,
    AddressId,
    Phase,
    Rep,
    Reply,
    Request,
)

from .replies import GatewayError
from .session import ClientGone

if TYPE_CHECKING:
    from collections.abc import Callable

    from .session import Session

log = logging.getLogger("socks64.bind")


class Expected:
    """Which peers a BIND admits: DST's addresses, or anyone when DST is unspecified."""

    def __init__(self, session: Session, addresses: list[IPAddress] | None) -> None:
        self.session = session
        self.addresses = None if addresses is None else frozenset(addresses)

    def __call__(self, peer: IPAddress) -> bool:
        if self.addresses is not None and peer not in self.addresses:
            log.info("%s: BIND refused connection from unexpected %s", self.session.label, peer)
            return False
        decision = self.session.gw.config.policy.check(
            client=self.session.client_ip,
            user=self.session.user,
            command=pol.Command.BIND,
            address=peer,
        )
        if not decision.allowed:
            log.info("%s: BIND peer %s denied (%s)", self.session.label, peer, decision.reason)
        return decision.allowed


async def serve_bind(session: Session, request: Request) -> None:
    gw = session.gw
    if request.flag & FLAG_BIND_MULTI:
        attached = gw.multi.find(session.owner, request.port)
        if attached is not None and not is_unspecified(request.address):
            await _serve_attached(session, request, attached)
            return
    if is_unspecified(request.address):
        if not gw.config.policy.may_allow(
            client=session.client_ip, user=session.user, command=pol.Command.BIND
        ):
            raise GatewayError(Rep.NOT_ALLOWED, "no rule allows BIND for this client")
        expected = Expected(session, None)
        listener = open_listener(session, None, _listen_port(request))
    else:
        _, addresses, realid = await session.destination(
            request.address, request.port, pol.Command.BIND
        )
        if realid is not None:
            session.pin(realid)
        expected = Expected(session, addresses)
        listener = open_listener(session, addresses, _listen_port(request))
    try:
        honoured = request.flag & (FLAG_BIND_PORT | FLAG_BIND_MULTI)
        await session.send(
            session.conn.send_reply(
                _first_reply(session, request, listener, honoured),
                then=Phase.HOLD if request.flag & FLAG_BIND_MULTI else Phase.BIND_WAIT,
            )
        )
        if request.flag & FLAG_BIND_MULTI:
            listener.expected = expected
            gw.multi.add(listener)
            await _hold(session)
            return
        await _accept_and_relay(session, request, listener, expected)
    finally:
        gw.multi.remove(listener)


def _listen_port(request: Request) -> int:
    return request.port if request.flag & FLAG_BIND_PORT else 0


def open_listener(
    session: Session, addresses: list[IPAddress] | None, port: int = 0
) -> BindListener:
    """Listen in the family of the expected peer (profile 6); dual-stack when unknown."""
    config = session.gw.config
    if addresses is None:
        # Unspecified peer: one dual-stack socket on every address.
        return BindListener.open(IPv6Address(0), port, session.owner, dual_stack=True)
    peer = order_addresses(addresses, config.resolver.prefer_family)[0]
    configured = config.bind.address_v6 if peer.version == 6 else config.bind.address_v4
    if configured is not None:
        local: IPAddress = IPv6Address(configured) if peer.version == 6 else IPv4Address(configured)
    elif peer.version == session.facing_ip.version:
        local = session.facing_ip
    else:
        wildcard: IPAddress = IPv6Address(0) if peer.version == 6 else IPv4Address(0)
        local = local_address_toward(peer) or wildcard
    return BindListener.open(local, port, session.owner)


def _first_reply(
    session: Session, request: Request, listener: BindListener, honoured: int
) -> Reply:
    flag = session.reply_flag(request, honoured)
    if request.command.with_aa:
        bound: Address = UNSPECIFIED_ID
        if not is_unspecified(request.address):
            target, _ = session.target_of(request.address)
            bound = AddressId(session.gw.table.associate(session.owner, target))
            session.pin(bound.realid)
        return Reply(Rep.SUCCEEDED, bound, listener.port, flag)
    address = listener.address
    if address.is_unspecified:
        address = session.facing_ip  # listening everywhere, so the facing address works
    bound = in_client_family(address, session.facing_ip, real_family=bool(flag & FLAG_REAL_FAMILY))
    return Reply(Rep.SUCCEEDED, bound, listener.port, flag)


async def _hold(session: Session) -> None:
    """A MULTI holding connection just keeps the listener until the client closes."""
    with contextlib.suppress(ConnectionError):
        while await session.channel.recv(4096):
            pass


async def _serve_attached(session: Session, request: Request, listener: BindListener) -> None:
    honoured = request.flag & FLAG_BIND_MULTI
    await session.send(
        session.conn.send_reply(
            _first_reply(session, request, listener, honoured), then=Phase.BIND_WAIT
        )
    )
    await _accept_and_relay(session, request, listener, listener.expected)


async def _accept_and_relay(
    session: Session,
    request: Request,
    listener: BindListener,
    expected: Callable[[IPAddress], bool],
) -> None:
    sock, peer_ip, peer_port = await accept_while_client_waits(session, listener, expected)
    try:
        if request.command.with_aa:
            realid = session.gw.table.associate(session.owner, peer_ip)
            session.pin(realid)
            bound: Address = AddressId(realid)
        else:
            bound = in_client_family(
                peer_ip, session.facing_ip, real_family=bool(request.flag & FLAG_REAL_FAMILY)
            )
        reply = Reply(Rep.SUCCEEDED, bound, peer_port, session.reply_flag(request))
    except BaseException:
        sock.close()
        raise
    await session.relay_after(session.conn.send_reply(reply, then=Phase.RELAY), sock)


async def accept_while_client_waits(
    session: Session, listener: BindListener, expected: Callable[[IPAddress], bool]
) -> tuple[socket.socket, IPAddress, int]:
    """Accept the peer, giving up when the client leaves or bind_accept runs out."""
    accept = asyncio.ensure_future(listener.accept(expected))
    watch: asyncio.Future[bytes] = asyncio.ensure_future(session.channel.recv(65536))
    handed_over = False
    try:
        async with asyncio.timeout(session.gw.config.timeouts.bind_accept):
            while True:
                await asyncio.wait((accept, watch), return_when=asyncio.FIRST_COMPLETED)
                if accept.done():
                    handed_over = True
                    return accept.result()
                data = watch.result()
                if not data:
                    raise ClientGone("closed by client while BIND waited")
                session.conn.receive_data(data)  # early payload, forwarded after the reply
                watch = asyncio.ensure_future(session.channel.recv(65536))
    finally:
        watch.cancel()
        if not handed_over:
            accept.cancel()
            with contextlib.suppress(BaseException):
                await accept
            if accept.done() and not accept.cancelled() and accept.exception() is None:
                accept.result()[0].close()  # accepted just as we gave up
        with contextlib.suppress(BaseException):
            await watch
