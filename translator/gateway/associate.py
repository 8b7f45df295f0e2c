"""Dedicated ADDRESS ASSOCIATE, CMD X'08' (Kitamura; profile 5).

DST names the target; the low octet of DST.PORT (ADR.PREF) says in which form the client
wants it back: an ID, an IPv4 or IPv6 address (forward DNS delegation for names), or a
name (reverse DNS delegation for addresses). FLAG X'10' overrides ADR.PREF.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

from addrmap import Target
from translator import policy as pol
from translator.net.resolver import ResolveError, normalize_name
from translator.wire import FLAG_REAL_FAMILY, Address, AddressId, Atyp, Rep, Reply, Request

from .context import RequestContext
from .outcomes import NextRequest
from .replies import GatewayError


async def address_associate(ctx: RequestContext, request: Request) -> NextRequest:
    ctx.require(pol.Command.ASSOCIATE)
    target, _ = await ctx.target_of(request.address)
    if not isinstance(target, str):
        ctx.check(pol.Command.ASSOCIATE, target)
    preference = request.port & 0xFF
    flag = request.flag & FLAG_REAL_FAMILY
    if flag:
        bound: Address = await _reachable_address(ctx, target)
    elif preference in (0, Atyp.ADDRESS_ID):
        bound = AddressId(await ctx.ids.associate(ctx.owner, target))
    elif preference == Atyp.IPV4:
        bound = await _as_family(ctx, target, socket.AF_INET)
    elif preference == Atyp.IPV6:
        bound = await _as_family(ctx, target, socket.AF_INET6)
    elif preference == Atyp.DOMAIN:
        bound = await _as_name(ctx, target)
    else:
        raise GatewayError(Rep.ADDRESS_TYPE_NOT_SUPPORTED, f"ADR.PREF {preference:#04x}")
    return NextRequest(Reply(Rep.SUCCEEDED, bound, 0, flag))


async def _as_family(ctx: RequestContext, target: Target, family: int) -> Address:
    wanted = IPv4Address if family == socket.AF_INET else IPv6Address
    if isinstance(target, str):
        return (await ctx.services.resolver.resolve_family(target, family))[0]
    if not isinstance(target, wanted):
        other = 6 if wanted is IPv6Address else 4
        raise GatewayError(
            Rep.ADDRESS_TYPE_NOT_SUPPORTED,
            f"IPv{target.version} address {target} has no IPv{other} form",
        )
    return target


async def _as_name(ctx: RequestContext, target: Target) -> Address:
    if isinstance(target, str):
        return target
    name = await ctx.services.resolver.reverse(target)
    try:
        return normalize_name(name)
    except ResolveError:
        raise GatewayError(Rep.HOST_UNREACHABLE, f"PTR of {target} is not a usable name") from None


async def _reachable_address(ctx: RequestContext, target: Target) -> Address:
    """FLAG X'10': the address, in its own family, the gateway would connect to."""
    if not isinstance(target, str):
        return target
    return ctx.order(await ctx.services.resolver.resolve(target))[0]
