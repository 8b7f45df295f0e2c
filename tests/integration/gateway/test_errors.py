"""Every reply code provoked on loopback, and hostile or broken clients.

Traffic stays on loopback: REP 3 and the connect timeout use ``outbound.interface: lo``,
so an attempt toward a documentation address is refused or dropped inside ``lo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

import pytest

from tests.conftest import GatewayFactory, RunningGateway

GREETING = b"\x05\x01\x00"


def connect_request(host: bytes, port: int, cmd: int = 1, flag: int = 0) -> bytes:
    return bytes((5, cmd, flag)) + host + struct.pack("!H", port)


def name(text: bytes) -> bytes:
    return bytes((3, len(text))) + text


V4_LOOPBACK = b"\x01\x7f\x00\x00\x01"


async def exchange(gateway: RunningGateway, *chunks: bytes, source: str | None = None) -> bytes:
    """Send the chunks, then read everything until the gateway closes (5 s at most)."""
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port, local_addr=local)
    try:
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 8)
    except ConnectionResetError:
        return b""  # closed with our bytes unread: a reset is a close too
    finally:
        writer.close()


async def reply_code(gateway: RunningGateway, request: bytes, **kw: str) -> int:
    answer = await exchange(gateway, GREETING, request, **kw)
    assert answer[:2] == b"\x05\x00", answer
    assert answer[2:4] == b"\x05" + answer[3:4] and len(answer) >= 10, answer
    return answer[3]


@pytest.fixture
async def strict_gateway(make_gateway: GatewayFactory) -> RunningGateway:
    """Only 127.0.0.1 may connect; port 9 is denied; one ID per owner."""
    return await make_gateway(
        policy={
            "rules": [
                {"action": "deny", "ports": [9], "comment": "discard is off limits"},
                {"action": "allow", "clients": ["127.0.0.1/32", "::1/128"]},
            ]
        },
        addrmap={"per_owner": 1},
    )


@pytest.fixture
async def lo_gateway(make_gateway: GatewayFactory) -> RunningGateway:
    return await make_gateway(outbound={"interface": "lo"}, timeouts={"connect": 0.5})


async def test_rep1_general_failure_when_the_id_quota_is_full(
    strict_gateway: RunningGateway,
) -> None:
    first = connect_request(name(b"web4.test"), 0x0008, cmd=8)
    second = connect_request(name(b"web6.test"), 0x0008, cmd=8)
    answer = await exchange(strict_gateway, GREETING, first, second)
    # The first ADDRESS ASSOCIATE succeeds with an ID, the second hits the quota.
    assert answer[2:6] == b"\x05\x00\x00\x08"
    assert answer[12:14] == b"\x05\x01"


async def test_rep2_denied_destination_and_client(
    strict_gateway: RunningGateway, echo_server: dict[str, int]
) -> None:
    assert await reply_code(strict_gateway, connect_request(V4_LOOPBACK, 9)) == 2
    allowed = connect_request(V4_LOOPBACK, echo_server["v4"])
    assert await reply_code(strict_gateway, allowed, source="127.0.0.3") == 2


async def test_rep3_network_unreachable(lo_gateway: RunningGateway) -> None:
    doc_v6 = b"\x04" + bytes.fromhex("20010db8000000000000000000000077")
    assert await reply_code(lo_gateway, connect_request(doc_v6, 80)) == 3


async def test_rep4_host_unreachable_for_unknown_name(gateway: RunningGateway) -> None:
    assert await reply_code(gateway, connect_request(name(b"nowhere.test"), 80)) == 4


async def test_rep5_connection_refused(gateway: RunningGateway) -> None:
    assert await reply_code(gateway, connect_request(V4_LOOPBACK, 1)) == 5


async def test_rep6_connect_timeout(lo_gateway: RunningGateway) -> None:
    blackholed = b"\x01" + bytes((198, 51, 100, 77))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await reply_code(lo_gateway, connect_request(blackholed, 80)) == 6
    assert loop.time() - started < 3


async def test_rep6_bind_waits_no_longer_than_bind_accept(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(timeouts={"bind_accept": 0.3})
    answer = await exchange(gateway, GREETING, connect_request(V4_LOOPBACK, 0, cmd=2))
    assert answer[2:4] == b"\x05\x00"  # first reply: listening
    assert answer[12:14] == b"\x05\x06"  # second reply: nobody came


@pytest.mark.parametrize("cmd", [0x00, 0x04, 0x05, 0x0C, 0xFF])
async def test_rep7_unknown_command(gateway: RunningGateway, cmd: int) -> None:
    assert await reply_code(gateway, connect_request(V4_LOOPBACK, 80, cmd=cmd)) == 7


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0x09, 0xFF])
async def test_rep8_unknown_address_type(gateway: RunningGateway, atyp: int) -> None:
    assert await reply_code(gateway, b"\x05\x01\x00" + bytes((atyp,)) + b"\x00" * 8) == 8


@pytest.mark.parametrize(
    "address",
    [
        b"\x03\x00",  # empty name
        name(b"web4\x00.test"),  # NUL in a name
        name(b"web4\x07.test"),  # control character
        name("wéb.test".encode()),  # not ASCII
        b"\x08\x01\x00\x00\x01",  # ADDRESS ID with CLASS 1
        b"\x08\x00\x12\x34\x56",  # an ID nobody associated
    ],
)
async def test_rep9_invalid_address(gateway: RunningGateway, address: bytes) -> None:
    assert await reply_code(gateway, connect_request(address, 80)) == 9


async def test_unknown_flag_bits_are_not_echoed(
    gateway: RunningGateway, echo_server: dict[str, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
    writer.write(GREETING + connect_request(V4_LOOPBACK, echo_server["v4"], flag=0x90))
    answer = await asyncio.wait_for(reader.readexactly(12), 5)
    assert answer[2:6] == b"\x05\x00\x10\x01"  # X'10' echoed (honoured), X'80' dropped
    writer.close()


# --- broken and hostile clients --------------------------------------------------------


async def test_wrong_version_is_closed_without_reply(gateway: RunningGateway) -> None:
    assert await exchange(gateway, b"\x07\x01\x00") == b""


async def test_no_methods_gets_no_acceptable(gateway: RunningGateway) -> None:
    assert await exchange(gateway, b"\x05\x00") == b"\x05\xff"


async def test_unacceptable_method_only(gateway: RunningGateway) -> None:
    assert await exchange(gateway, b"\x05\x01\x02") == b"\x05\xff"


async def test_socks6_gets_version_mismatch(gateway: RunningGateway) -> None:
    assert await exchange(gateway, b"\x06\x00\x00\x00") == b"\x06"


async def test_truncated_request_then_close(gateway: RunningGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
    writer.write(GREETING + b"\x05\x01\x00\x03\x10web")
    await writer.drain()
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.close()
    await writer.wait_closed()
    await sessions_drained(gateway)


async def test_stalled_client_is_cut_at_the_handshake_timeout(
    make_gateway: GatewayFactory, echo_server: dict[str, int]
) -> None:
    gateway = await make_gateway(timeouts={"handshake": 0.4})
    loop = asyncio.get_running_loop()
    started = loop.time()
    stalled = asyncio.create_task(exchange(gateway, GREETING, b"\x05\x01\x00\x03\x20web"))
    # Meanwhile somebody else is served at once.
    request = connect_request(V4_LOOPBACK, echo_server["v4"])
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
    writer.write(GREETING + request + b"ping")
    assert (await asyncio.wait_for(reader.readexactly(16), 2))[-4:] == b"ping"
    writer.close()
    assert await stalled == b"\x05\x00"  # method reply, then closed: no request reply
    assert 0.3 < loop.time() - started < 3


async def test_endless_field_is_cut_and_others_are_served(
    gateway: RunningGateway, echo_server: dict[str, int]
) -> None:
    # A SOCKS 4 USERID that never ends: the gateway must not buffer it without bound.
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
    writer.write(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300_000)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) in (b"", b"\x00\x5b" + b"\x00" * 6)
    writer.close()
    request = connect_request(V4_LOOPBACK, echo_server["v4"])
    assert (await exchange_echo(gateway, request, b"next"))[-4:] == b"next"
    await sessions_drained(gateway)


async def sessions_drained(gateway: RunningGateway) -> None:
    async with asyncio.timeout(2):
        while gateway.gateway.active_sessions:
            await asyncio.sleep(0.01)


async def exchange_echo(gateway: RunningGateway, request: bytes, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
    writer.write(GREETING + request + payload)
    try:
        return await asyncio.wait_for(reader.readexactly(12 + len(payload)), 3)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_client_that_never_reads_does_not_block_others(
    gateway: RunningGateway, echo_server: dict[str, int]
) -> None:
    request = connect_request(V4_LOOPBACK, echo_server["v4"])
    hog_reader, hog_writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
    hog_writer.write(GREETING + request)
    await hog_reader.readexactly(12)
    chunk = b"z" * 65536
    for _ in range(64):  # 4 MiB echoed back at a client that reads nothing
        hog_writer.write(chunk)
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
        writer.write(GREETING + request + b"fine")
        assert (await asyncio.wait_for(reader.readexactly(16), 3))[-4:] == b"fine"
        writer.close()
    hog_writer.transport.abort()


async def test_client_limit(make_gateway: GatewayFactory, echo_server: dict[str, int]) -> None:
    gateway = await make_gateway(limits={"max_clients": 2})
    held = [await asyncio.open_connection("127.0.0.1", gateway.v4.port) for _ in range(2)]
    for reader, writer in held:
        writer.write(GREETING)
        assert await reader.readexactly(2) == b"\x05\x00"
    assert await exchange(gateway, GREETING) == b""  # third one: closed at once
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    request = connect_request(V4_LOOPBACK, echo_server["v4"])
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
    writer.write(GREETING + request + b"room")
    assert (await asyncio.wait_for(reader.readexactly(16), 3))[-4:] == b"room"
    writer.close()


async def test_each_failure_is_logged_once_with_client_and_reason(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="socks64")
    await reply_code(gateway, connect_request(V4_LOOPBACK, 1))
    await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("socks64")]
    assert len(lines) == 1, lines
    assert "127.0.0.1:" in lines[0] and "ECONNREFUSED" in lines[0] and "REP 5" in lines[0]
