"""SOCKS 4 and 4a: CONNECT and BIND (profile 1). 4a names are resolved by the gateway.

SOCKS 4 has no user authentication (USERID is informational) and no reply codes beyond
granted / rejected: the session answers every failure with CD 91, the reason in the log.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from translator.net.addresses import IPAddress
from translator.wire import UNSPECIFIED_V4, Socks4Command, Socks4Reply, Socks4Request, Socks4Status

from .bind import expected_peers, open_listener
from .connect import open_destination
from .context import RequestContext
from .outcomes import AwaitPeer, Relay


async def serve_socks4(ctx: RequestContext, request: Socks4Request) -> Relay | AwaitPeer:
    if request.command == Socks4Command.CONNECT:
        sock, target, _ = await open_destination(ctx, request.address, request.port)
        return Relay(
            Socks4Reply(Socks4Status.GRANTED), sock, ("SOCKS4 CONNECT", target, request.port)
        )
    # DSTIP 0.0.0.0: any peer, as in SOCKS 5
    expected = await expected_peers(ctx, request.address, request.port)
    listener = open_listener(ctx, expected.addresses)
    first = Socks4Reply(
        Socks4Status.GRANTED, listener.port, _v4_or_unspecified(ctx, listener.address)
    )

    async def second(peer: IPAddress, port: int) -> Socks4Reply:
        return Socks4Reply(Socks4Status.GRANTED, port, _v4_or_unspecified(ctx, peer))

    return AwaitPeer(first, listener, expected, second, listener.close)


def _v4_or_unspecified(ctx: RequestContext, address: IPAddress) -> IPv4Address:
    """SOCKS 4 replies carry IPv4 only: fall back to our facing address, else 0.0.0.0."""
    if isinstance(address, IPv4Address) and not address.is_unspecified:
        return address
    facing = ctx.facing_ip
    return facing if isinstance(facing, IPv4Address) else UNSPECIFIED_V4
