"""CONNECT and CONNECT+AA (RFC 1928 section 4; profile 5 and 6)."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address
from typing import NamedTuple

from addrmap import Target
from translator import policy as pol
from translator.net.addresses import sockaddr_ip
from translator.wire import Address, Rep, Reply, Request

from .context import RequestContext
from .outcomes import Relay


class Outbound(NamedTuple):
    sock: socket.socket  # connected, non-blocking; the caller owns it
    target: Target
    realid: int | None  # the REALID the request named, if it named one


async def open_destination(ctx: RequestContext, address: Address, port: int) -> Outbound:
    """Resolve, check against the policy, and connect with Happy Eyeballs."""
    destination = await ctx.destination(address, port, pol.Command.CONNECT)
    sock = await ctx.services.connect(destination.addresses, port)
    return Outbound(sock, destination.target, destination.realid)


async def serve_connect(ctx: RequestContext, request: Request) -> Relay:
    port = request.port
    destination = await ctx.destination(request.address, port, pol.Command.CONNECT)
    addresses = destination.addresses
    sock = await ctx.services.connect(addresses, port)
    target = destination.target
    try:
        local = sock.getsockname()
        realid = destination.realid
        bound = await ctx.bound(request, sockaddr_ip(local), target=target, realid=realid)
        reply = Reply(Rep.SUCCEEDED, bound, int(local[1]), ctx.reply_flag(request))
    except BaseException:
        sock.close()
        raise
    # One candidate is the one connected to: its IPv4 text is what getpeername() would
    # give, without the syscall (IPv6 text may differ in form: that one asks the socket).
    only = addresses[0] if len(addresses) == 1 else None
    reached = only if isinstance(only, IPv4Address) else None
    return Relay(reply, sock, ("CONNECT", target, port), reached)
