"""CONNECT and CONNECT+AA (RFC 1928 section 4; profile 5 and 6)."""

from __future__ import annotations

import socket
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
    sock, target, realid = await open_destination(ctx, request.address, request.port)
    try:
        local = sock.getsockname()
        bound = await ctx.bound(request, sockaddr_ip(local), target=target, realid=realid)
        reply = Reply(Rep.SUCCEEDED, bound, int(local[1]), ctx.reply_flag(request))
    except BaseException:
        sock.close()
        raise
    return Relay(reply, sock, ("CONNECT", target, request.port))
