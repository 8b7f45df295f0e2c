"""The Kitamura extensions through the project's own client: ADDRESS ASSOCIATE in every
ADR.PREF form, CONNECT by ID, CONNECT+AA, BIND (+AA, MULTI, PORT)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from tests.conftest import RunningGateway
from translator.client import SocksClient, SocksReplyError
from translator.wire import AddressId, Atyp, Rep

V4 = IPv4Address("127.0.0.1")
V6 = IPv6Address("::1")


async def control(gateway: RunningGateway, family: str = "v4", **kw: object) -> SocksClient:
    endpoint = gateway.v4 if family == "v4" else gateway.v6
    return await SocksClient.open(endpoint.host, endpoint.port, **kw)  # type: ignore[arg-type]


async def rep_of(awaitable: object) -> int:
    with pytest.raises(SocksReplyError) as caught:
        await awaitable  # type: ignore[misc]
    return caught.value.rep


@pytest.mark.parametrize(
    ("target", "pref", "expected"),
    [
        ("web4.test", Atyp.IPV4, V4),  # forward delegation, A
        ("dual.test", Atyp.IPV6, V6),  # forward delegation, AAAA
        ("Web6.Test", Atyp.DOMAIN, "web6.test"),  # a name comes back as itself (lower-cased)
        (V4, Atyp.IPV4, V4),
        (V6, Atyp.IPV6, V6),
        (V4, Atyp.DOMAIN, "web4.test"),  # reverse delegation, PTR
        (V6, Atyp.DOMAIN, "web6.test"),
    ],
)
async def test_associate_answers_in_the_preferred_form(
    gateway: RunningGateway, target: object, pref: int, expected: object
) -> None:
    async with await control(gateway) as client:
        assert await client.associate(target, pref) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "pref", "rep"),
    [
        (V6, Atyp.IPV4, Rep.ADDRESS_TYPE_NOT_SUPPORTED),  # no IPv4 form of an IPv6 literal
        (V4, Atyp.IPV6, Rep.ADDRESS_TYPE_NOT_SUPPORTED),
        ("web4.test", Atyp.IPV6, Rep.HOST_UNREACHABLE),  # no AAAA record
        ("web6.test", Atyp.IPV4, Rep.HOST_UNREACHABLE),  # no A record
        ("no-such.test", Atyp.IPV4, Rep.HOST_UNREACHABLE),  # NXDOMAIN
        (IPv4Address("127.0.0.9"), Atyp.DOMAIN, Rep.HOST_UNREACHABLE),  # no PTR
        ("web4.test", 0x05, Rep.ADDRESS_TYPE_NOT_SUPPORTED),  # no such ATYP
    ],
)
async def test_associate_failures(
    gateway: RunningGateway, target: object, pref: int, rep: int
) -> None:
    async with await control(gateway) as client:
        assert await rep_of(client.associate(target, pref)) == rep  # type: ignore[arg-type]


async def test_id_is_stable_reusable_and_resolvable(gateway: RunningGateway) -> None:
    async with await control(gateway) as client:
        first = await client.associate("dual.test")
        assert isinstance(first, AddressId) and first.realid != 0
        assert await client.associate("DUAL.test", 0x00) == first  # idempotent, ADR.PREF 0
        assert await client.associate(first, Atyp.ADDRESS_ID) == first
        assert await client.associate(first, Atyp.DOMAIN) == "dual.test"
        assert await client.associate(first, Atyp.IPV4) == V4
        assert await client.associate(first, Atyp.IPV6) == V6
        # FLAG X'10': the address the gateway would use, in its own family (prefer ipv6).
        assert await client.associate(first, Atyp.IPV4, real_family=True) == V6
        other = await client.associate("web4.test")
        assert other != first


async def test_ids_are_not_sequential(gateway: RunningGateway) -> None:
    async with await control(gateway) as client:
        ids = [
            (await client.associate(ip_address(f"127.0.0.{n}"))).realid  # type: ignore[union-attr]
            for n in range(10, 20)
        ]
    steps = {b - a for a, b in itertools.pairwise(ids)}
    assert len(set(ids)) == 10 and len(steps) > 1


async def test_connect_by_id_on_the_control_connection_and_another(
    gateway: RunningGateway, echo_server: dict[str, int]
) -> None:
    async with await control(gateway) as client:
        realid = await client.associate("web6.test")
        stream = await client.connect(realid, echo_server["v6"])
        stream.writer.write(b"by id")
        assert await asyncio.wait_for(stream.reader.readexactly(5), 5) == b"by id"
        # FLAG off: BND is in the client's family (our own IPv4 address), real port.
        assert stream.bound[0] == V4
    # The ID outlives the connection that created it.
    async with await control(gateway) as again:
        stream = await again.connect(realid, echo_server["v6"])
        stream.writer.write(b"again")
        assert await asyncio.wait_for(stream.reader.readexactly(5), 5) == b"again"


async def test_connect_reply_real_family_flag(
    gateway: RunningGateway, echo_server: dict[str, int]
) -> None:
    async with await control(gateway) as client:
        stream = await client.connect(V6, echo_server["v6"], real_family=True)
        assert stream.bound[0] == V6  # the outbound socket's own IPv6 address
        await stream.close()


async def test_another_owner_cannot_use_an_id(
    gateway: RunningGateway, echo_server: dict[str, int]
) -> None:
    async with await control(gateway) as client:
        realid = await client.associate("web4.test")
    # Same host, different source address: a different owner, so the ID is "unknown".
    stranger = await SocksClient.open("127.0.0.1", gateway.v4.port, local_addr=("127.0.0.2", 0))
    async with stranger:
        assert await rep_of(stranger.connect(realid, echo_server["v4"])) == Rep.INVALID_ADDRESS


async def test_unknown_and_unspecified_ids(gateway: RunningGateway) -> None:
    async with await control(gateway) as client:
        assert await rep_of(client.connect(AddressId(0xABCDEF), 80)) == Rep.INVALID_ADDRESS
    async with await control(gateway) as client:
        assert await rep_of(client.connect(AddressId(0), 80)) == Rep.INVALID_ADDRESS


async def test_connect_aa_returns_the_destination_id(
    gateway: RunningGateway, echo_server: dict[str, int]
) -> None:
    async with await control(gateway) as client:
        known = await client.associate("web6.test")
    async with await control(gateway) as client:
        stream = await client.connect("web6.test", echo_server["v6"], aa=True)
        assert stream.bound[0] == known
        stream.writer.write(b"aa")
        assert await asyncio.wait_for(stream.reader.readexactly(2), 5) == b"aa"
    async with await control(gateway) as client:
        stream = await client.connect(known, echo_server["v6"], aa=True)
        assert stream.bound[0] == known  # DST was an ID: the same ID comes back


async def _peer_connects(address: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(address, port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.readexactly(4), 5)
    writer.close()
    await writer.wait_closed()
    return data


async def test_bind_v6_peer_connects_back_to_v4_client(gateway: RunningGateway) -> None:
    async with await control(gateway) as client:
        listener = await client.bind(V6, 0, real_family=True)
        address, port = listener.bound
        assert address == V6 and port > 0  # listening in the peer's family
        peer = asyncio.create_task(_peer_connects("::1", port, b"from peer"))
        stream = await listener.accept(timeout=5)
        assert stream.peer is not None and stream.peer[0] == V6
        assert await asyncio.wait_for(stream.reader.readexactly(9), 5) == b"from peer"
        stream.writer.write(b"back")
        assert await peer == b"back"


async def test_bind_reply_in_client_family_by_default(gateway: RunningGateway) -> None:
    async with await control(gateway) as client:
        listener = await client.bind(V6, 0)
        assert listener.bound[0] == V4  # FLAG off: our own IPv4 address, the real port
        peer = asyncio.create_task(_peer_connects("::1", listener.bound[1], b"x"))
        stream = await listener.accept(timeout=5)
        assert stream.peer is not None and stream.peer[0] == V4
        stream.writer.write(b"done")
        assert await peer == b"done"


async def test_bind_aa_reports_ids(gateway: RunningGateway) -> None:
    async with await control(gateway) as client:
        listener = await client.bind(V4, 0, aa=True)
        expected_id = listener.bound[0]
        assert isinstance(expected_id, AddressId) and expected_id.realid != 0
        peer = asyncio.create_task(_peer_connects("127.0.0.1", listener.bound[1], b"x"))
        stream = await listener.accept(timeout=5)
        assert stream.peer is not None and stream.peer[0] == expected_id  # same host, same ID
        stream.writer.write(b"idid")
        assert await peer == b"idid"


async def test_bind_rejects_an_unexpected_peer(gateway: RunningGateway) -> None:
    async with await control(gateway) as client:
        listener = await client.bind(IPv4Address("127.0.0.1"), 0)
        port = listener.bound[1]
        # 127.0.0.2 is not the expected peer: its connection is closed, BIND keeps waiting.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.2", 0)
        )
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        peer = asyncio.create_task(_peer_connects("127.0.0.1", port, b"ok"))
        stream = await listener.accept(timeout=5)
        stream.writer.write(b"good")
        assert await peer == b"good"


async def test_bind_multi_with_two_peers(gateway: RunningGateway) -> None:
    holder = await control(gateway)
    async with holder:
        held = await holder.bind(IPv4Address(0), 0, multi=True)
        port = held.bound[1]
        streams = []
        for _ in range(2):
            attacher = await control(gateway)
            listener = await attacher.bind(held.bound[0], port, multi=True)
            assert listener.bound[1] == port
            peer = asyncio.create_task(_peer_connects("127.0.0.1", port, b"peer"))
            stream = await listener.accept(timeout=5)
            assert await stream.reader.readexactly(4) == b"peer"
            stream.writer.write(b"ack!")
            assert await peer == b"ack!"
            streams.append(stream)
        for stream in streams:
            await stream.close()
    # The listener closes with its holding connection.
    await asyncio.sleep(0.1)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_bind_port_flag_listens_where_asked_and_busy_is_general_failure(
    gateway: RunningGateway,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        wanted = probe.getsockname()[1]
    async with await control(gateway) as client:
        listener = await client.bind(V4, wanted, listen_port=True)
        assert listener.bound[1] == wanted
        async with await control(gateway) as second:
            rep = await rep_of(second.bind(V4, wanted, listen_port=True))
            assert rep == Rep.GENERAL_FAILURE


async def test_socks4_bind(gateway: RunningGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
    writer.write(b"\x04\x02\x00\x00\x7f\x00\x00\x01user\x00")  # BIND, expect 127.0.0.1
    first = await asyncio.wait_for(reader.readexactly(8), 5)
    assert first[:2] == b"\x00\x5a" and first[4:] == b"\x7f\x00\x00\x01"
    port = int.from_bytes(first[2:4], "big")
    peer = asyncio.create_task(_peer_connects("127.0.0.1", port, b"four"))
    second = await asyncio.wait_for(reader.readexactly(8), 5)
    assert second[:2] == b"\x00\x5a" and second[4:] == b"\x7f\x00\x00\x01"
    assert await reader.readexactly(4) == b"four"
    writer.write(b"back")
    assert await peer == b"back"
    writer.close()


async def test_socks4_failure_is_rejected(gateway: RunningGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
    writer.write(b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00")  # CONNECT to port 1: refused
    assert await asyncio.wait_for(reader.read(), 5) == b"\x00\x5b" + bytes(6)
    writer.close()
