"""BIND and BIND+AA, with the PORT and MULTI flags (RFC 1928 section 4; profile 5, 6, 8).

The listener takes the family of DST (a name or ID: the family the policy picks first;
unspecified: dual-stack). The first reply gives the listening endpoint, the second the
peer that connected. With MULTI the first BIND holds the listener open; further BINDs
with MULTI from the same owner naming that endpoint's port each take one connection.
"""

from __future__ import annotations

import logging
from functools import partial
from ipaddress import IPv4Address, IPv6Address

from translator import policy as pol
from translator.net.addresses import IPAddress, local_address_toward
from translator.relay.listeners import BindListener
from translator.wire import (
    FLAG_BIND_MULTI,
    FLAG_BIND_PORT,
    UNSPECIFIED_ID,
    Address,
    Rep,
    Reply,
    Request,
)

from .context import RequestContext, announced, is_unspecified
from .outcomes import AwaitPeer, Hold

log = logging.getLogger("socks64.bind")


class Expected:
    """Which peers a BIND admits: DST's addresses, or anyone when DST is unspecified."""

    def __init__(self, ctx: RequestContext, addresses: list[IPAddress] | None) -> None:
        self.ctx = ctx
        self.addresses = addresses  # in resolution order: the listener's family follows it
        self._admitted = None if addresses is None else frozenset(addresses)

    def __call__(self, peer: IPAddress) -> bool:
        if self._admitted is not None and peer not in self._admitted:
            log.info("%s: BIND refused connection from unexpected %s", self.ctx.label, peer)
            return False
        decision = self.ctx.allows(pol.Command.BIND, peer)
        if not decision.allowed:
            log.info("%s: BIND peer %s denied (%s)", self.ctx.label, peer, decision.reason)
        return decision.allowed


async def expected_peers(ctx: RequestContext, address: Address, port: int) -> Expected:
    """Who may connect: DST's allowed addresses (an ID it names is pinned), or anyone."""
    if is_unspecified(address):
        ctx.require(pol.Command.BIND)
        return Expected(ctx, None)
    destination = await ctx.destination(address, port, pol.Command.BIND)
    return Expected(ctx, destination.addresses)


async def serve_bind(ctx: RequestContext, request: Request) -> AwaitPeer | Hold:
    multi = bool(request.flag & FLAG_BIND_MULTI)
    if multi:
        attached = ctx.services.multi.find(ctx.owner, request.port)
        if attached is not None and not is_unspecified(request.address):
            return AwaitPeer(
                await _first_reply(ctx, request, attached, request.flag & FLAG_BIND_MULTI),
                attached,
                attached.expected,
                partial(_second_reply, ctx, request),
            )  # the holding connection owns the listener: nothing to release
    expected = await expected_peers(ctx, request.address, request.port)
    listen_port = request.port if request.flag & FLAG_BIND_PORT else 0
    listener = open_listener(ctx, expected.addresses, listen_port)
    try:
        honoured = request.flag & (FLAG_BIND_PORT | FLAG_BIND_MULTI)
        first = await _first_reply(ctx, request, listener, honoured)
    except BaseException:
        listener.close()
        raise
    if multi:
        listener.expected = expected
        ctx.services.multi.add(listener)
        return Hold(first, lambda: ctx.services.multi.remove(listener))
    second = partial(_second_reply, ctx, request)
    return AwaitPeer(first, listener, expected, second, listener.close)


def open_listener(
    ctx: RequestContext, addresses: list[IPAddress] | None, port: int = 0
) -> BindListener:
    """Listen in the family of the expected peer (profile 6); dual-stack when unknown."""
    if addresses is None:
        # Unspecified peer: one dual-stack socket on every address.
        return BindListener.open(IPv6Address(0), port, ctx.owner, dual_stack=True)
    peer = ctx.order(addresses)[0]
    bind = ctx.config.bind
    configured = bind.address_v6 if peer.version == 6 else bind.address_v4
    if configured is not None:
        local: IPAddress = IPv6Address(configured) if peer.version == 6 else IPv4Address(configured)
    elif peer.version == ctx.facing_ip.version:
        local = ctx.facing_ip
    else:
        wildcard: IPAddress = IPv6Address(0) if peer.version == 6 else IPv4Address(0)
        local = local_address_toward(peer) or wildcard
    return BindListener.open(local, port, ctx.owner)


async def _first_reply(
    ctx: RequestContext, request: Request, listener: BindListener, honoured: int
) -> Reply:
    flag = ctx.reply_flag(request, honoured)
    if request.command.with_aa and is_unspecified(request.address):
        return Reply(Rep.SUCCEEDED, UNSPECIFIED_ID, listener.port, flag)
    address = listener.address
    if address.is_unspecified:
        address = ctx.facing_ip  # listening everywhere, so the facing address works
    address = announced(address, ctx.config.bind.announce_v4, ctx.config.bind.announce_v6)
    target = (await ctx.target_of(request.address))[0] if request.command.with_aa else None
    bound = await ctx.bound(request, address, target=target)
    return Reply(Rep.SUCCEEDED, bound, listener.port, flag)


async def _second_reply(
    ctx: RequestContext, request: Request, peer: IPAddress, port: int
) -> Reply:
    bound = await ctx.bound(request, peer)
    return Reply(Rep.SUCCEEDED, bound, port, ctx.reply_flag(request))
