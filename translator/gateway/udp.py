"""UDP ASSOCIATE and UDP+AA on the TCP connection: the reply, then the UDP control
channel (VH-04; profile 7) or the TUNNEL framing, until the TCP connection ends.

The association, its sockets, its memberships and its IDs' pins end with the TCP
connection, or after ``udp.idle`` seconds without datagrams or requests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from translator import policy as pol
from translator.net.addresses import IPAddress, family_of, local_address_toward
from translator.net.resolver import ResolveError
from translator.relay.udp import UdpAssociation
from translator.wire import (
    FLAG_REAL_FAMILY,
    FLAG_UDP_INTERFACE_REQUEST,
    FLAG_UDP_TUNNEL,
    FLAG_UDP_USECLIENTSPORT,
    NEED_DATA,
    UNSPECIFIED_ID,
    UNSPECIFIED_V4,
    Address,
    AddressId,
    ControlRequest,
    ControlSub,
    MessageRejected,
    Phase,
    Rep,
    Reply,
    Request,
    TunnelDatagram,
    UdpDatagram,
)

from .replies import GatewayError, describe, rep_for
from .session import ClientGone

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("socks64.udp")


async def serve_udp(session: Session, request: Request) -> None:
    gw = session.gw
    if not gw.config.policy.may_allow(
        client=session.client_ip, user=session.user, command=pol.Command.UDP
    ):
        raise GatewayError(Rep.NOT_ALLOWED, "no rule allows UDP for this client")
    flag = request.flag
    tunnel = bool(flag & FLAG_UDP_TUNNEL)
    association = UdpAssociation(
        session,
        aa=request.command.with_aa,
        real_family=bool(flag & FLAG_REAL_FAMILY),
        client_port=request.port or None,
        tunnel=session.channel if tunnel else None,
    )
    gw.udp_associations.add(association)
    try:
        honoured = flag & (FLAG_REAL_FAMILY | FLAG_UDP_INTERFACE_REQUEST | FLAG_UDP_TUNNEL)
        wants_port = bool(flag & FLAG_UDP_USECLIENTSPORT and request.port)
        if wants_port and await association.try_client_port(request.port):
            honoured |= FLAG_UDP_USECLIENTSPORT
        if tunnel:
            bound: Address = UNSPECIFIED_V4
            port = 0
        else:
            bound, port = await association.open_relay()
        if request.command.with_aa:
            bound = UNSPECIFIED_ID
        then = Phase.TUNNEL if tunnel else Phase.UDP_CONTROL
        await session.send(
            session.conn.send_reply(Reply(Rep.SUCCEEDED, bound, port, honoured), then=then)
        )
        log.debug("%s: UDP association on port %d (flags %#04x)", session.label, port, honoured)
        await _serve_association(session, association)
    finally:
        gw.udp_associations.discard(association)
        association.close()
        stats = association.stats
        log.debug(
            "%s: UDP association ended: %d to peers, %d to client, %d dropped",
            session.label,
            stats.to_peers,
            stats.to_client,
            stats.dropped,
        )


async def _serve_association(session: Session, association: UdpAssociation) -> None:
    """Control requests and tunnelled datagrams until the client leaves or goes idle."""
    gw = session.gw
    idle = gw.config.udp.idle
    conn = session.conn
    while True:
        try:
            event = conn.next_event()
        except MessageRejected as exc:
            if exc.answer_owed:
                await _answer(session, Reply(exc.rep or Rep.GENERAL_FAILURE))
                log.info("%s: control request refused: %s", session.label, exc.reason)
            else:
                association.stats.dropped_malformed += 1
                association.stats.dropped += 1
            continue
        if isinstance(event, TunnelDatagram):
            association.client_datagram(event.datagram)
            continue
        if isinstance(event, ControlRequest):
            await _answer(session, await _control(session, association, event))
            continue
        assert event is NEED_DATA
        remaining = association.last_activity + idle - gw.clock()
        if remaining <= 0:
            log.info("%s: UDP association idle for %g s; closing", session.label, idle)
            return
        try:
            async with asyncio.timeout(remaining):
                data = await session.channel.recv(65536)
        except TimeoutError:
            continue  # datagrams may have kept it alive: re-check the idle clock
        except ConnectionError:
            return
        if not data:
            return  # the TCP connection ended, and the association with it
        conn.receive_data(data)


async def _answer(session: Session, reply: Reply) -> None:
    then = session.conn.phase if reply.rep == Rep.SUCCEEDED else None
    try:
        await session.send(session.conn.send_reply(reply, then=then))
    except TimeoutError:
        raise ClientGone("client does not read its control replies") from None


async def _control(session: Session, association: UdpAssociation, request: ControlRequest) -> Reply:
    try:
        if request.sub == ControlSub.INTERFACE_DATA:
            return await _interface_data(session, association, request)
        if request.sub == ControlSub.MULTICAST_JOIN:
            return await _join(session, association, request)
        return await _leave(session, association, request)
    except (GatewayError, OSError, ResolveError, LookupError) as exc:
        rep = Rep.NETWORK_UNREACHABLE if isinstance(exc, LookupError) else rep_for(exc)
        log.info(
            "%s: %s %s:%d: %s -> REP %d %s",
            session.label,
            request.sub.name,
            request.address,
            request.port,
            describe(exc),
            rep,
            rep.name,
        )
        return Reply(rep)


async def _addresses(session: Session, address: Address) -> list[IPAddress]:
    target, _ = session.target_of(address)
    if isinstance(target, str):
        return session.gw.order_addresses(await session.gw.resolver.resolve(target))
    return [target]


def _check(session: Session, command: pol.Command, address: IPAddress, port: int) -> None:
    decision = session.gw.config.policy.check(
        client=session.client_ip, user=session.user, command=command, address=address, port=port
    )
    if not decision.allowed:
        raise GatewayError(Rep.NOT_ALLOWED, f"denied by policy ({decision.reason})")


async def _interface_data(
    session: Session, association: UdpAssociation, request: ControlRequest
) -> Reply:
    """The external address and port the gateway uses toward a destination."""
    destination = (await _addresses(session, request.address))[0]
    _check(session, pol.Command.UDP, destination, request.port)
    transport = await association.outbound_socket(family_of(destination))
    port = int(transport.get_extra_info("sockname")[1])
    external = local_address_toward(destination)
    if external is None:
        raise GatewayError(Rep.NETWORK_UNREACHABLE, f"no route toward {destination}")
    association.announced.add((destination, request.port))
    association.name_peer(destination, request.port, request.address)
    return Reply(Rep.SUCCEEDED, external, port, request.flag & FLAG_REAL_FAMILY)


async def _join(session: Session, association: UdpAssociation, request: ControlRequest) -> Reply:
    candidates = await _addresses(session, request.address)
    group = next((a for a in candidates if a.is_multicast), None)
    if group is None:
        raise GatewayError(Rep.INVALID_ADDRESS, f"{request.address} is not a multicast group")
    _check(session, pol.Command.MULTICAST, group, request.port)
    key = (group, request.port)
    if key not in association.memberships:
        by_id = isinstance(request.address, AddressId)

        def deliver(data: bytes, source: IPAddress, port: int) -> None:
            rendered = association.render_source(source, port, by_id=by_id) or source
            association.to_client(UdpDatagram(rendered, port, data))

        association.memberships[key] = await session.gw.multicast.join(group, request.port, deliver)
    return Reply(Rep.SUCCEEDED, request.address, request.port)


async def _leave(session: Session, association: UdpAssociation, request: ControlRequest) -> Reply:
    candidates = await _addresses(session, request.address)
    for group in candidates:
        membership = association.memberships.pop((group, request.port), None)
        if membership is not None:
            session.gw.multicast.leave(membership)
            return Reply(Rep.SUCCEEDED, request.address, request.port)
    raise GatewayError(Rep.INVALID_ADDRESS, f"not a member of {request.address}:{request.port}")
