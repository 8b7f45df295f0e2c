"""DNS46 against a real dnsmasq upstream, queried over real UDP and TCP sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from addrmap import AddressTable, FakeIpPool
from tests.dnsserver import DnsServer
from translator.transparent import dns46
from translator.transparent.dns46 import Dns46, parse_nameserver

POOL = IPv4Network("198.18.0.0/15")
MANY = [f"2001:db8:1::{i:x}" for i in range(1, 41)]  # 40 AAAA: > 512 octets
ZONE: dict[str, Any] = {
    "a": {"v4.test": "192.0.2.1", "dual.test": "192.0.2.2"},
    "aaaa": {
        "v6.test": "2001:db8::6",
        "dual.test": "2001:db8::2",
        "short.test": "2001:db8::5",
        "other.test": "2001:db8::7",
        "third.test": "2001:db8::8",
        "many.test": MANY,
    },
    "cname": {"alias.test": "v6.test"},
    "ttl": 300,
    "ttls": {"short.test": 20},
}


@dataclass
class Running:
    server: Dns46
    pool: FakeIpPool
    port: int
    counts: Counter[str]

    async def udp(self, name: str, rdtype: str = "A", **kwargs: Any) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, **kwargs)
        return await dns.asyncquery.udp(query, "127.0.0.1", port=self.port, timeout=2)

    async def tcp(self, name: str, rdtype: str = "A") -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        return await dns.asyncquery.tcp(query, "127.0.0.1", port=self.port, timeout=2)


Factory = Callable[..., Awaitable[Running]]


@pytest.fixture
def upstream(dns_server_factory: Callable[..., DnsServer]) -> DnsServer:
    return dns_server_factory(**ZONE)


@pytest.fixture
async def make_dns46(upstream: DnsServer) -> AsyncIterator[Factory]:
    started: list[Dns46] = []

    async def make(*, network: IPv4Network = POOL, **overrides: Any) -> Running:
        pool = FakeIpPool(AddressTable(clock=time.monotonic), network, quarantine=3600)
        counts: Counter[str] = Counter()
        options: dict[str, Any] = {
            "upstreams": [(upstream.host, upstream.port)],
            "synthesize": "missing-a",
            "denied_answer": "refused",
            "may_use": lambda client: True,
            "max_ttl": 60,
            "timeout": 0.5,
            "count": lambda kind: counts.update([kind]),
        }
        server = Dns46(pool=pool, **{**options, **overrides})
        started.append(server)
        [(host, port)] = await server.start([("127.0.0.1", 0)])
        assert host == "127.0.0.1" and port > 0
        return Running(server, pool, port, counts)

    yield make
    for server in started:
        await server.close()


def addresses(response: dns.message.Message, rdtype: str = "A") -> list[str]:
    kind = dns.rdatatype.from_text(rdtype)
    return [rd.to_text() for rrset in response.answer if rrset.rdtype == kind for rd in rrset]


def ttl_of(response: dns.message.Message, rdtype: str = "A") -> int:
    kind = dns.rdatatype.from_text(rdtype)
    return next(rrset.ttl for rrset in response.answer if rrset.rdtype == kind)


def dead_port() -> int:
    """A loopback port nobody listens on (UDP nor TCP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.contextmanager
def blackhole() -> Iterator[socket.socket]:
    """An upstream that takes queries over UDP and TCP and never answers (its UDP socket)."""
    for _ in range(50):  # the UDP port may be taken for TCP: try another
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            udp.setblocking(False)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(udp.getsockname())
                except OSError:
                    continue
                tcp.listen()
                yield udp
                return
    raise AssertionError("no port free for both UDP and TCP")


async def until_received(hole: socket.socket) -> None:
    """Wait until a datagram has reached ``hole`` (at most 1 s)."""
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        try:
            hole.recv(512, socket.MSG_PEEK)
            return
        except BlockingIOError:
            await asyncio.sleep(0.01)
    raise AssertionError("no query reached the upstream")


async def raw_udp(port: int, payload: bytes, wait: float = 0.3) -> bytes | None:
    """Send one datagram; the reply, or None when none came within ``wait``."""
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    class Catch(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            replies.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Catch, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(payload)
        try:
            return await asyncio.wait_for(replies.get(), wait)
        except TimeoutError:
            return None
    finally:
        transport.close()


async def test_a_records_pass_through_with_their_ttl(make_dns46: Factory) -> None:
    dns46_ = await make_dns46()
    query = dns.message.make_query("v4.test", "A")
    response = await dns.asyncquery.udp(query, "127.0.0.1", port=dns46_.port, timeout=2)
    assert response.id == query.id
    assert addresses(response) == ["192.0.2.1"]
    assert ttl_of(response) == 300  # not capped: not synthesized
    assert addresses(await dns46_.udp("dual.test")) == ["192.0.2.2"]
    assert len(dns46_.pool) == 0
    assert dns46_.counts == {"forwarded": 2}


async def test_aaaa_only_name_gets_a_stable_pool_address(make_dns46: Factory) -> None:
    dns46_ = await make_dns46()
    first = await dns46_.udp("v6.test")
    [address] = addresses(first)
    assert IPv4Address(address) in POOL
    assert ttl_of(first) == 60  # 300 capped by max_ttl
    assert ttl_of(await dns46_.udp("short.test")) == 20  # below the cap: kept
    assert first.rcode() == dns.rcode.NOERROR and first.flags & dns.flags.RA
    second = await dns46_.tcp("V6.Test")
    assert addresses(second) == [address]
    assert dns46_.pool.name_of(IPv4Address(address)) == "v6.test"
    assert dns46_.counts == {"synthesized": 3}


async def test_cname_to_an_aaaa_only_name(make_dns46: Factory) -> None:
    dns46_ = await make_dns46()
    response = await dns46_.udp("alias.test")
    [address] = addresses(response)
    assert IPv4Address(address) in POOL
    assert [rrset.name.to_text() for rrset in response.answer] == ["alias.test."]
    assert dns46_.pool.name_of(IPv4Address(address)) == "alias.test"


async def test_nxdomain_is_forwarded(make_dns46: Factory, upstream: DnsServer) -> None:
    dns46_ = await make_dns46()
    response = await dns46_.udp("nope.test")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert not response.answer
    assert len(dns46_.pool) == 0
    assert ("A", "nope.test") in upstream.queries()
    assert dns46_.counts == {"forwarded": 1}


async def test_always_mode_maps_every_existing_name(make_dns46: Factory) -> None:
    dns46_ = await make_dns46(synthesize="always", max_ttl=600)
    [v4] = addresses(await dns46_.udp("v4.test"))
    [v6] = addresses(await dns46_.udp("v6.test"))
    assert IPv4Address(v4) in POOL and IPv4Address(v6) in POOL and v4 != v6
    assert ttl_of(await dns46_.udp("v4.test")) == 300  # record TTL below the cap
    assert (await dns46_.udp("nope.test")).rcode() == dns.rcode.NXDOMAIN
    assert dns46_.counts == {"synthesized": 3, "forwarded": 1}


async def test_aaaa_forwarded_in_missing_a_mode_empty_in_always(
    make_dns46: Factory, upstream: DnsServer
) -> None:
    missing_a = await make_dns46()
    assert addresses(await missing_a.udp("v6.test", "AAAA"), "AAAA") == ["2001:db8::6"]
    assert missing_a.counts == {"forwarded": 1}
    always = await make_dns46(synthesize="always")
    response = await always.udp("dual.test", "AAAA")
    assert response.rcode() == dns.rcode.NOERROR and not response.answer
    assert ("AAAA", "dual.test") not in upstream.queries()
    assert always.counts == {"empty": 1}


async def test_https_and_svcb_are_empty(make_dns46: Factory) -> None:
    dns46_ = await make_dns46()
    for rdtype in ("HTTPS", "SVCB"):
        response = await dns46_.udp("v6.test", rdtype)
        assert response.rcode() == dns.rcode.NOERROR and not response.answer
    assert dns46_.counts == {"empty": 2}


async def test_ptr_of_pool_and_other_addresses(make_dns46: Factory) -> None:
    dns46_ = await make_dns46()
    [address] = addresses(await dns46_.udp("v6.test"))
    bound = await dns46_.udp(dns.reversename.from_address(address).to_text(), "PTR")
    assert addresses(bound, "PTR") == ["v6.test."]
    assert ttl_of(bound, "PTR") == 60
    unbound = await dns46_.udp(dns.reversename.from_address("198.19.0.200").to_text(), "PTR")
    assert unbound.rcode() == dns.rcode.NXDOMAIN and not unbound.answer
    outside = await dns46_.udp(dns.reversename.from_address("192.0.2.1").to_text(), "PTR")
    assert addresses(outside, "PTR") == ["v4.test."]  # forwarded
    assert dns46_.counts == {"synthesized": 1, "ptr": 2, "forwarded": 1}


async def test_denied_client_gets_real_answers(make_dns46: Factory) -> None:
    seen: list[object] = []

    def deny(client: object) -> bool:
        seen.append(client)
        return False

    dns46_ = await make_dns46(denied_answer="real", may_use=deny, synthesize="always")
    assert addresses(await dns46_.udp("v4.test")) == ["192.0.2.1"]
    v6 = await dns46_.udp("v6.test")
    assert v6.rcode() == dns.rcode.NOERROR and not v6.answer
    assert addresses(await dns46_.udp("v6.test", "AAAA"), "AAAA") == ["2001:db8::6"]
    assert len(dns46_.pool) == 0
    assert seen[0] == IPv4Address("127.0.0.1")
    assert dns46_.counts == {"forwarded": 3}


async def test_denied_client_is_refused(make_dns46: Factory, upstream: DnsServer) -> None:
    dns46_ = await make_dns46(denied_answer="refused", may_use=lambda client: False)
    for rdtype in ("A", "HTTPS"):
        response = await dns46_.udp("v6.test", rdtype)
        assert response.rcode() == dns.rcode.REFUSED and not response.answer
    assert upstream.queries() == []
    assert len(dns46_.pool) == 0
    assert dns46_.counts == {"refused": 2}


async def test_dead_upstreams_give_servfail_within_the_timeout(make_dns46: Factory) -> None:
    with blackhole() as hole:
        dns46_ = await make_dns46(
            upstreams=[("127.0.0.1", dead_port()), hole.getsockname()], timeout=0.3
        )
        started = time.monotonic()
        response = await dns46_.udp("v4.test")
        elapsed = time.monotonic() - started
    assert response.rcode() == dns.rcode.SERVFAIL
    assert 0.25 < elapsed < 1.0
    assert dns46_.counts == {"servfail": 1}


async def test_next_upstream_answers_when_the_first_is_dead(
    make_dns46: Factory, upstream: DnsServer
) -> None:
    dns46_ = await make_dns46(
        upstreams=[("127.0.0.1", dead_port()), (upstream.host, upstream.port)]
    )
    assert addresses(await dns46_.udp("v4.test")) == ["192.0.2.1"]
    assert addresses(await dns46_.tcp("v4.test")) == ["192.0.2.1"]


async def test_tcp_queries_are_forwarded_over_tcp(make_dns46: Factory, upstream: DnsServer) -> None:
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection(upstream.host, upstream.port)
        for source, sink in ((reader, to_writer), (to_reader, writer)):  # one query, one answer
            size = await source.readexactly(2)
            sink.write(size + await source.readexactly(int.from_bytes(size, "big")))
        await writer.drain()
        for stream in (writer, to_writer):
            stream.close()

    tcp_only = await asyncio.start_server(relay, "127.0.0.1", 0)  # no UDP on its port
    try:
        port = tcp_only.sockets[0].getsockname()[1]
        dns46_ = await make_dns46(upstreams=[("127.0.0.1", port)], timeout=0.3)
        assert addresses(await dns46_.tcp("v4.test")) == ["192.0.2.1"]
        assert IPv4Address(addresses(await dns46_.tcp("v6.test"))[0]) in POOL  # A, then AAAA
        assert (await dns46_.udp("v4.test")).rcode() == dns.rcode.SERVFAIL
    finally:
        tcp_only.close()
        await tcp_only.wait_closed()


async def test_garbage_gets_formerr_or_nothing(make_dns46: Factory) -> None:
    dns46_ = await make_dns46()
    header = bytes.fromhex("beef 0100 0001 0000 0000 0000")  # one question, cut short
    reply = await raw_udp(dns46_.port, header + b"\x07trunc")
    assert reply is not None
    formerr = dns.message.from_wire(reply)
    assert formerr.id == 0xBEEF and formerr.rcode() == dns.rcode.FORMERR
    assert await raw_udp(dns46_.port, b"\x01\x02\x03") is None  # not even a header
    response = dns.message.make_response(dns.message.make_query("v4.test", "A"))
    assert await raw_udp(dns46_.port, response.to_wire()) is None  # never answer answers
    assert addresses(await dns46_.udp("v4.test")) == ["192.0.2.1"]
    assert dns46_.counts == {"formerr": 1, "forwarded": 1}


async def test_truncated_over_udp_full_over_tcp(make_dns46: Factory) -> None:
    dns46_ = await make_dns46()
    small = await dns46_.udp("many.test", "AAAA")
    assert small.flags & dns.flags.TC and not small.answer
    assert len(small.to_wire()) <= 512
    full = await dns46_.tcp("many.test", "AAAA")
    assert not full.flags & dns.flags.TC
    assert sorted(addresses(full, "AAAA")) == sorted(MANY)
    edns = await dns46_.udp("many.test", "AAAA", use_edns=0, payload=4096)
    assert not edns.flags & dns.flags.TC and len(addresses(edns, "AAAA")) == len(MANY)


async def test_exhausted_pool_gives_servfail(
    make_dns46: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    dns46_ = await make_dns46(network=IPv4Network("198.18.0.0/30"))  # two addresses
    first = addresses(await dns46_.udp("v6.test"))
    second = addresses(await dns46_.udp("other.test"))
    assert first != second and len(dns46_.pool) == 2
    response = await dns46_.udp("third.test")
    assert response.rcode() == dns.rcode.SERVFAIL and not response.answer
    assert addresses(await dns46_.udp("v6.test")) == first  # bound names still answer
    logged = [r.getMessage() for r in caplog.records if r.name == "socks64.transparent.dns"]
    assert any("cannot bind third.test" in message for message in logged)
    assert dns46_.counts == {"synthesized": 3, "servfail": 1}


async def test_overload_gives_servfail_at_once(make_dns46: Factory) -> None:
    with blackhole() as hole:
        dns46_ = await make_dns46(upstreams=[hole.getsockname()], max_inflight=1)
        slow = asyncio.create_task(dns46_.udp("v4.test"))
        await until_received(hole)
        started = time.monotonic()
        response = await dns46_.udp("v4.test")
        assert time.monotonic() - started < 0.2
        assert response.rcode() == dns.rcode.SERVFAIL
        await slow
    assert dns46_.counts == {"servfail": 2}


async def test_tcp_carries_several_queries(make_dns46: Factory) -> None:
    dns46_ = await make_dns46()
    reader, writer = await asyncio.open_connection("127.0.0.1", dns46_.port)
    queries = [dns.message.make_query(name, "A") for name in ("v4.test", "v6.test", "nope.test")]
    for query in queries:
        writer.write(query.to_wire(prepend_length=True))
    await writer.drain()
    answers = {}
    for _ in queries:
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 2), "big")
        response = dns.message.from_wire(await reader.readexactly(size))
        answers[response.id] = response
    assert addresses(answers[queries[0].id]) == ["192.0.2.1"]
    assert IPv4Address(addresses(answers[queries[1].id])[0]) in POOL
    assert answers[queries[2].id].rcode() == dns.rcode.NXDOMAIN
    writer.close()
    await writer.wait_closed()


async def test_tcp_idle_and_connection_limits(
    make_dns46: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dns46, "TCP_IDLE_TIMEOUT", 0.3)
    monkeypatch.setattr(dns46, "MAX_TCP_CONNECTIONS", 3)
    dns46_ = await make_dns46()
    connections = [await asyncio.open_connection("127.0.0.1", dns46_.port) for _ in range(3)]
    query = dns.message.make_query("v4.test", "A").to_wire(prepend_length=True)
    for reader, writer in connections:  # each one accepted and answering
        writer.write(query)
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 2), "big")
        assert addresses(dns.message.from_wire(await reader.readexactly(size))) == ["192.0.2.1"]
    extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", dns46_.port)
    assert await asyncio.wait_for(extra_reader.read(), 2) == b""  # over the limit: closed
    extra_writer.close()
    reader, writer = connections[0]
    writer.write(query)  # a second query on the connection, then silence
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 2) != b""  # the rest of the answers, then EOF
    assert 0.25 < time.monotonic() - started < 1.0  # closed as idle after 0.3 s
    for _, writer in connections:
        writer.close()


async def test_close_cancels_queries_in_flight(make_dns46: Factory) -> None:
    with blackhole() as hole:
        dns46_ = await make_dns46(upstreams=[hole.getsockname()], timeout=5)
        query = dns.message.make_query("v4.test", "A")
        assert await raw_udp(dns46_.port, query.to_wire(), wait=0.1) is None
        await until_received(hole)
        reader, writer = await asyncio.open_connection("127.0.0.1", dns46_.port)
        writer.write(query.to_wire(prepend_length=True))
        await writer.drain()
        await asyncio.sleep(0.1)  # the TCP query is waiting on the upstream too
        started = time.monotonic()
        await dns46_.server.close()
        assert time.monotonic() - started < 0.5
        assert await asyncio.wait_for(reader.read(), 1) == b""  # closed, unanswered
        writer.close()
    assert dns46_.counts.total() == 0
    assert all(task.done() for task in asyncio.all_tasks() if task is not asyncio.current_task())


async def test_a_failing_policy_is_servfail_not_a_crash(make_dns46: Factory) -> None:
    def broken(client: object) -> bool:
        raise RuntimeError("policy bug")

    dns46_ = await make_dns46(may_use=broken)
    assert (await dns46_.udp("v4.test")).rcode() == dns.rcode.SERVFAIL
    assert (await dns46_.tcp("v4.test")).rcode() == dns.rcode.SERVFAIL
    assert dns46_.counts == {"servfail": 2}


async def test_answer_without_sockets(make_dns46: Factory) -> None:
    dns46_ = await make_dns46()
    query = dns.message.make_query("v4.test", "A")
    wire = await dns46_.server.answer(query.to_wire(), IPv4Address("192.0.2.77"))
    assert wire is not None
    assert addresses(dns.message.from_wire(wire)) == ["192.0.2.1"]
    assert await dns46_.server.answer(b"", IPv4Address("192.0.2.77")) is None
    response = dns.message.make_response(query).to_wire()
    assert await dns46_.server.answer(response, IPv4Address("192.0.2.77")) is None
    assert dns46_.counts == {"forwarded": 1}


def test_parse_nameserver() -> None:
    assert parse_nameserver("203.0.113.53") == ("203.0.113.53", 53)
    assert parse_nameserver("203.0.113.53:5353") == ("203.0.113.53", 5353)
    assert parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)
    assert parse_nameserver("[2001:db8::53]:5353") == ("2001:db8::53", 5353)
    assert parse_nameserver("[2001:db8::53]") == ("2001:db8::53", 53)
    bad = ["", "dns.example", "203.0.113.53:", "203.0.113.53:70000", "[203.0.113.53]:53"]
    for text in [*bad, "[2001:db8::53", "[2001:db8::53]x", "2001:db8::53:x"]:
        with pytest.raises(ValueError):
            parse_nameserver(text)
