"""UDP ASSOCIATE across families on loopback: what the client receives, byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv6Address

import pytest
import socks as pysocks

from tests.conftest import GatewayFactory, RunningGateway
from translator.client import SocksClient, SocksReplyError
from translator.client.udp import UdpSession
from translator.wire import (
    AddressId,
    ControlRequest,
    ControlSub,
    Rep,
    UdpDatagram,
)

V4 = IPv4Address("127.0.0.1")
V6 = IPv6Address("::1")


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.seen: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen.append((data, addr))
        assert self.transport is not None
        self.transport.sendto(b"echo:" + data, addr)


@pytest.fixture
async def udp_echo() -> AsyncIterator[dict[str, _Echo | int]]:
    """UDP echo servers on 127.0.0.1 and ::1 (prefix "echo:")."""
    loop = asyncio.get_running_loop()
    t4, p4 = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    t6, p6 = await loop.create_datagram_endpoint(_Echo, local_addr=("::1", 0))
    yield {
        "v4": t4.get_extra_info("sockname")[1],
        "v6": t6.get_extra_info("sockname")[1],
        "p4": p4,
        "p6": p6,
    }
    t4.close()
    t6.close()


async def associate(gateway: RunningGateway, family: str = "v4", **kw: object) -> UdpSession:
    endpoint = gateway.v4 if family == "v4" else gateway.v6
    client = await SocksClient.open(endpoint.host, endpoint.port)
    return await client.udp_associate(**kw)  # type: ignore[arg-type]


async def test_relay_endpoint_is_the_address_the_client_reached(gateway: RunningGateway) -> None:
    async with await associate(gateway) as udp:
        assert udp.reply.address == V4 and udp.reply.port > 0
    async with await associate(gateway, "v6") as udp:
        assert udp.reply.address == V6


@pytest.mark.parametrize(
    ("dest", "expected_source"),
    [
        (V6, V6),  # the same literal the client used
        ("web6.test", "web6.test"),  # the same name
        ("WEB6.test", "WEB6.test"),  # exactly as the client wrote it
    ],
)
async def test_v4_client_talks_to_v6_peer(
    gateway: RunningGateway, udp_echo: dict, dest: object, expected_source: object
) -> None:
    async with await associate(gateway) as udp:
        await udp.send(dest, udp_echo["v6"], b"hello")  # type: ignore[arg-type]
        got = await udp.recv()
        assert got == UdpDatagram(expected_source, udp_echo["v6"], b"echo:hello")  # type: ignore[arg-type]


async def test_id_destination(gateway: RunningGateway, udp_echo: dict) -> None:
    control = await SocksClient.open("127.0.0.1", gateway.v4.port)
    async with control:
        realid = await control.associate("web6.test")
    async with await associate(gateway) as udp:
        await udp.send(realid, udp_echo["v6"], b"by id")
        got = await udp.recv()
        assert got.address == realid and got.data == b"echo:by id"


async def test_same_family_and_real_family_show_real_sources(
    gateway: RunningGateway, udp_echo: dict
) -> None:
    async with await associate(gateway) as udp:
        await udp.send(V4, udp_echo["v4"], b"a")
        assert (await udp.recv()).address == V4
    async with await associate(gateway, real_family=True) as udp:
        await udp.send("web6.test", udp_echo["v6"], b"b")
        got = await udp.recv()
        assert got.address == V6 and udp.reply.flag & 0x10


async def test_udp_aa_renders_every_source_as_an_id(
    gateway: RunningGateway, udp_echo: dict
) -> None:
    async with await associate(gateway, aa=True) as udp:
        assert udp.reply.address == AddressId(0)
        await udp.send(V4, udp_echo["v4"], b"c")
        got = await udp.recv()
        assert isinstance(got.address, AddressId) and got.address.realid != 0
        # The ID names the peer: the client can send to it.
        await udp.send(got.address, udp_echo["v4"], b"d")
        assert (await udp.recv()).data == b"echo:d"


async def test_fragments_are_reassembled(gateway: RunningGateway, udp_echo: dict) -> None:
    async with await associate(gateway) as udp:
        await udp.send(V6, udp_echo["v6"], b"frag-one|", frag=1)
        await udp.send(V6, udp_echo["v6"], b"frag-two|", frag=2)
        await udp.send(V6, udp_echo["v6"], b"end", frag=0x83)
        got = await udp.recv()
        assert got.data == b"echo:frag-one|frag-two|end"
        assert udp_echo["p6"].seen[-1][0] == b"frag-one|frag-two|end"


async def test_out_of_order_fragments_are_dropped_then_traffic_continues(
    gateway: RunningGateway, udp_echo: dict
) -> None:
    async with await associate(gateway) as udp:
        await udp.send(V6, udp_echo["v6"], b"two", frag=2)
        await udp.send(V6, udp_echo["v6"], b"one", frag=1)
        await udp.send(V6, udp_echo["v6"], b"end", frag=0x83)  # 1 then 3: a gap, dropped
        await udp.send(V6, udp_echo["v6"], b"whole")
        assert (await udp.recv()).data == b"echo:whole"
        assert [data for data, _ in udp_echo["p6"].seen] == [b"whole"]


async def test_bad_datagrams_and_foreign_sources_are_dropped(
    gateway: RunningGateway, udp_echo: dict
) -> None:
    async with await associate(gateway) as udp:
        assert udp.relay is not None
        await udp.send_raw(b"\x00\x00")  # truncated
        await udp.send_raw(b"\x00\x00\x00\x07" + b"\x00" * 10)  # unknown ATYP
        await udp.send_raw(b"\x00\x00\x00\x08\x00\x99\x99\x99\x00\x35")  # unknown ID
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind(("127.0.0.2", 0))
            stranger.sendto(UdpDatagram(V4, udp_echo["v4"], b"x").encode(), udp.relay)
        await udp.send(V4, udp_echo["v4"], b"still fine")
        assert (await udp.recv()).data == b"echo:still fine"
        assert [data for data, _ in udp_echo["p4"].seen] == [b"still fine"]


async def test_tunnel_mode_carries_datagrams_and_control_on_tcp(
    gateway: RunningGateway, udp_echo: dict
) -> None:
    async with await associate(gateway, tunnel=True) as udp:
        assert udp.reply.flag & 0x20 and udp.reply.port == 0
        await udp.send("web6.test", udp_echo["v6"], b"tunnelled")
        assert await udp.recv() == UdpDatagram("web6.test", udp_echo["v6"], b"echo:tunnelled")
        address, port = await udp.interface_data(V6, udp_echo["v6"])
        assert address == V6 and port > 0


async def test_interface_data_lets_the_client_receive_first(gateway: RunningGateway) -> None:
    async with await associate(gateway, interface_request=True) as udp:
        assert udp.reply.flag & 0x01
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as peer:
            peer.bind(("::1", 0))
            peer_port = peer.getsockname()[1]
            address, port = await udp.interface_data(V6, peer_port)
            assert address == V6
            peer.sendto(b"you first", ("::1", port))
            got = await udp.recv()
            # The client named this peer by literal in INTERFACE DATA: that is its source.
            assert got == UdpDatagram(V6, peer_port, b"you first")


async def test_unnamed_peer_of_other_family_is_dropped_without_aa(
    gateway: RunningGateway,
) -> None:
    async with await associate(gateway, interface_request=True) as udp:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as peer:
            peer.bind(("::1", 0))
            _, port = await udp.interface_data(V6, 9)  # announces ::1 port 9, not this peer
            peer.sendto(b"who am i", ("::1", port))
            with pytest.raises(TimeoutError):
                await udp.recv(timeout=0.3)


async def test_control_errors_keep_the_association(
    make_gateway: GatewayFactory, udp_echo: dict
) -> None:
    gateway = await make_gateway(
        policy={
            "rules": [
                {"action": "deny", "commands": ["multicast"]},
                {"action": "allow", "clients": ["127.0.0.0/8", "::1/128"]},
            ]
        }
    )
    async with await associate(gateway, interface_request=True) as udp:
        with pytest.raises(SocksReplyError) as caught:
            await udp.join(V4, 5000)  # not a group
        assert caught.value.rep == Rep.INVALID_ADDRESS
        with pytest.raises(SocksReplyError) as caught:
            await udp.join(IPv4Address("239.1.2.3"), 5000)
        assert caught.value.rep == Rep.NOT_ALLOWED
        udp.client.writer.write(bytes.fromhex("00 42 00 01 7f000001 0035"))  # unknown SUB
        with pytest.raises(SocksReplyError) as caught:
            await udp.control(ControlRequest(ControlSub.INTERFACE_DATA, V4, 1), timeout=2)
        assert caught.value.rep == Rep.COMMAND_NOT_SUPPORTED
        # ... and the association still relays.
        await udp.send(V4, udp_echo["v4"], b"alive")
        assert (await udp.recv()).data == b"echo:alive"


async def test_policy_drops_denied_datagrams(make_gateway: GatewayFactory, udp_echo: dict) -> None:
    gateway = await make_gateway(
        policy={
            "rules": [
                {"action": "deny", "commands": ["udp"], "destinations": ["::1/128"]},
                {"action": "allow", "clients": ["127.0.0.0/8", "::1/128"]},
            ]
        }
    )
    async with await associate(gateway) as udp:
        await udp.send(V6, udp_echo["v6"], b"denied")
        await udp.send(V4, udp_echo["v4"], b"allowed")
        assert (await udp.recv()).data == b"echo:allowed"
        assert udp_echo["p6"].seen == []


async def test_association_ends_with_its_tcp_connection(gateway: RunningGateway) -> None:
    udp = await associate(gateway)
    relay_port = udp.reply.port
    await udp.close()
    async with asyncio.timeout(2):
        while True:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe,
                contextlib.suppress(OSError),
            ):
                probe.bind(("127.0.0.1", relay_port))
                return  # the relay socket is gone
            await asyncio.sleep(0.02)


async def test_pysocks_udp_client(gateway: RunningGateway, udp_echo: dict) -> None:
    def exchange() -> bytes:
        sock = pysocks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.set_proxy(pysocks.SOCKS5, "127.0.0.1", gateway.v4.port, rdns=True)
        sock.settimeout(5)
        try:
            sock.sendto(b"pysocks-udp", ("web6.test", udp_echo["v6"]))
            return sock.recv(100)
        finally:
            sock.close()

    assert await asyncio.to_thread(exchange) == b"echo:pysocks-udp"


async def test_peer_becomes_nameable_once_the_client_addresses_it(
    gateway: RunningGateway,
) -> None:
    async with await associate(gateway, interface_request=True) as udp:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as peer:
            peer.bind(("::1", 0))
            peer_port = peer.getsockname()[1]
            _, relay_port = await udp.interface_data(V6, 9)
            peer.sendto(b"too early", ("::1", relay_port))  # unnamed yet: dropped
            with pytest.raises(TimeoutError):
                await udp.recv(timeout=0.3)
            await udp.send(V6, peer_port, b"now I know you")
            peer.setblocking(False)
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(peer, 100), 5) == b"now I know you"
            peer.sendto(b"welcome", ("::1", relay_port))
            assert await udp.recv() == UdpDatagram(V6, peer_port, b"welcome")


async def test_a_stream_of_datagrams_arrives_intact_both_ways(
    gateway: RunningGateway, udp_echo: dict
) -> None:
    """The per-peer fast paths carry the same bytes as the first, slow, datagram."""
    for dest in ("web6.test", V6):
        async with await associate(gateway) as udp:
            sent = [f"{dest}-{n}".encode() * (n + 1) for n in range(40)]
            for payload in sent:
                await udp.send(dest, udp_echo["v6"], payload)
                got = await udp.recv()
                assert got == UdpDatagram(dest, udp_echo["v6"], b"echo:" + payload)


async def test_a_peer_keeps_the_first_name_the_client_gave_it(
    gateway: RunningGateway, udp_echo: dict
) -> None:
    async with await associate(gateway) as udp:
        await udp.send("web6.test", udp_echo["v6"], b"one")
        assert (await udp.recv()).address == "web6.test"
        await udp.send(V6, udp_echo["v6"], b"two")  # the same peer, by literal now
        assert (await udp.recv()).address == "web6.test"
