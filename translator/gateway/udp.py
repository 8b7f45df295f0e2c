"""UDP ASSOCIATE and UDP+AA: the reply that opens an association, and the answers to
the control channel's requests (VH-04; profile 7) while it lasts.

The session runs the control channel (or the TUNNEL framing) until the TCP connection
ends or ``udp.idle`` passes without traffic; the association, its sockets, memberships
and ID pins end with it.
"""

from __future__ import annotations

from functools import partial

from translator import policy as pol
from translator.net.addresses import family_of, local_address_toward
from translator.relay.udp import UdpAssociation, UdpDeps
from translator.wire import (
    FLAG_REAL_FAMILY,
    FLAG_UDP_INTERFACE_REQUEST,
    FLAG_UDP_TUNNEL,
    FLAG_UDP_USECLIENTSPORT,
    UNSPECIFIED_ID,
    UNSPECIFIED_V4,
    Address,
    AddressId,
    ControlRequest,
    ControlSub,
    Phase,
    Rep,
    Reply,
    Request,
)

from .context import RequestContext, announced
from .outcomes import Associate
from .replies import GatewayError


def association_deps(ctx: RequestContext) -> UdpDeps:
    """What a new association gets; its peer caches are charged to its client's budget
    (``udp.max_peers_per_client``, under ``udp.max_peers_total``), the limits of the
    config it starts with."""
    services = ctx.services
    settings = ctx.config.udp
    budgets = services.peer_budgets
    budgets.configure(settings.max_peers_per_client, settings.max_peers_total)
    return UdpDeps(
        owner=ctx.owner,
        user=ctx.user,
        client_ip=ctx.client_ip,
        facing_ip=ctx.facing_ip,
        label=ctx.label,
        settings=settings,
        policy=ctx.config.policy,
        ids=services.ids,
        resolver=services.resolver,
        order=ctx.order,
        multicast=services.multicast,
        clock=services.clock,
        drop_log=services.udp_drop_log,
        peers=budgets.budget(ctx.client_ip.compressed),
        pool=services.pool,
        sealing=ctx.protection,
    )


async def serve_udp(ctx: RequestContext, request: Request) -> Associate:
    ctx.require(pol.Command.UDP)
    flag = request.flag
    tunnel = bool(flag & FLAG_UDP_TUNNEL)
    association = UdpAssociation(
        association_deps(ctx),
        aa=request.command.with_aa,
        real_family=bool(flag & FLAG_REAL_FAMILY),
        client_port=request.port or None,
    )
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
            udp = ctx.config.udp
            bound = announced(bound, udp.announce_v4, udp.announce_v6)
        if request.command.with_aa:
            bound = UNSPECIFIED_ID
    except BaseException:
        association.close()
        raise
    then = Phase.TUNNEL if tunnel else Phase.UDP_CONTROL
    return Associate(Reply(Rep.SUCCEEDED, bound, port, honoured), association, then)


async def control(
    ctx: RequestContext, association: UdpAssociation, request: ControlRequest
) -> Reply:
    """The answer to one control channel request; failures raise as any request's do."""
    if request.sub == ControlSub.INTERFACE_DATA:
        return await _interface_data(ctx, association, request)
    if request.sub == ControlSub.MULTICAST_JOIN:
        return await _join(ctx, association, request)
    return await _leave(ctx, association, request)


async def _interface_data(
    ctx: RequestContext, association: UdpAssociation, request: ControlRequest
) -> Reply:
    """The external address and port the gateway uses toward a destination."""
    destination = (await ctx.addresses_of(request.address))[0]
    ctx.check(pol.Command.UDP, destination, port=request.port)
    transport = await association.outbound_socket(family_of(destination))
    port = int(transport.get_extra_info("sockname")[1])
    external = local_address_toward(destination)
    if external is None:
        raise GatewayError(Rep.NETWORK_UNREACHABLE, f"no route toward {destination}")
    association.announced.add((destination, request.port))
    association.name_peer(destination, request.port, request.address)
    return Reply(Rep.SUCCEEDED, external, port, request.flag & FLAG_REAL_FAMILY)


async def _join(ctx: RequestContext, association: UdpAssociation, request: ControlRequest) -> Reply:
    candidates = await ctx.addresses_of(request.address)
    group = next((a for a in candidates if a.is_multicast), None)
    if group is None:
        raise GatewayError(Rep.INVALID_ADDRESS, f"{request.address} is not a multicast group")
    ctx.check(pol.Command.MULTICAST, group, port=request.port)
    key = (group, request.port)
    if key not in association.memberships:
        by_id = isinstance(request.address, AddressId)

        association.memberships[key] = await ctx.services.multicast.join(
            group, request.port, partial(association.deliver_group, by_id=by_id)
        )
    return Reply(Rep.SUCCEEDED, request.address, request.port)


async def _leave(
    ctx: RequestContext, association: UdpAssociation, request: ControlRequest
) -> Reply:
    for group in await ctx.addresses_of(request.address):
        membership = association.memberships.pop((group, request.port), None)
        if membership is not None:
            ctx.services.multicast.leave(membership)
            return Reply(Rep.SUCCEEDED, request.address, request.port)
    raise GatewayError(Rep.INVALID_ADDRESS, f"not a member of {request.address}:{request.port}")
