"""Behind a NAT or on a virtual address: the replies name the announced address, while
the sockets still bind locally (udp.announce_v4/_v6, bind.announce_v4/_v6)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv6Address

from tests.conftest import GatewayFactory
from translator.client import SocksClient
from translator.wire import Command, Request

ANNOUNCED_V4 = IPv4Address("203.0.113.7")  # documentation range: never contacted here
ANNOUNCED_V6 = IPv6Address("2001:db8::7")


async def test_udp_associate_reply_names_the_announced_address(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(
        udp={"announce_v4": str(ANNOUNCED_V4), "announce_v6": str(ANNOUNCED_V6)}
    )
    for host, port, announced in (
        ("127.0.0.1", gateway.v4.port, ANNOUNCED_V4),
        ("::1", gateway.v6.port, ANNOUNCED_V6),
    ):
        async with await SocksClient.open(host, port) as client:
            # The raw request: a client library would send its datagrams to the announced
            # address, which is not on this machine.
            reply = await client.request(Request(Command.UDP_ASSOCIATE, IPv4Address(0), 0, 0))
            assert reply.address == announced and reply.port > 0
            (association,) = gateway.gateway.services.udp_associations
            local = association.relay_endpoint
            assert local is not None and local[0].is_loopback  # bound locally all the same
            assert local[1] == reply.port


async def test_bind_reply_names_the_announced_address_and_the_peer_still_connects(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(bind={"announce_v4": str(ANNOUNCED_V4)})
    async with await SocksClient.open("127.0.0.1", gateway.v4.port) as client:
        listener = await client.bind(IPv4Address("127.0.0.1"), 0)
        address, port = listener.bound
        assert address == ANNOUNCED_V4
        # The listener is local: the peer reaches it on loopback at the announced port.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            stream = await listener.accept(timeout=5)
            writer.write(b"hello")
            assert await asyncio.wait_for(stream.reader.readexactly(5), 5) == b"hello"
        finally:
            writer.close()


async def test_without_announce_the_local_address_is_named(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway()
    async with await SocksClient.open("127.0.0.1", gateway.v4.port) as client:
        reply = await client.request(Request(Command.UDP_ASSOCIATE, IPv4Address(0), 0, 0))
        assert reply.address == IPv4Address("127.0.0.1")
