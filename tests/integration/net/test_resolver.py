"""Resolver against a real dnsmasq on loopback (never the machine's own resolver)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer, DnsServerError, ipv6_loopback_available
from translator.net.resolver import ResolveError, Resolver

A = {
    "v4.test": ["127.0.0.1"],
    "both.test": ["127.0.0.2", "127.0.0.3"],
    "short.test": ["192.0.2.10"],
    "zero.test": ["192.0.2.11"],
    "a.test": ["192.0.2.1"],
    "b.test": ["192.0.2.2"],
    "c.test": ["192.0.2.3"],
}
AAAA = {"v6.test": ["::1"], "both.test": ["::2"]}
PTR = {"127.0.0.1": "v4.test", "::1": "v6.test"}
CNAME = {"alias.test": "both.test"}
TTLS = {"short.test": 60, "zero.test": 0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(a=A, aaaa=AAAA, ptr=PTR, cname=CNAME, ttl=300, ttls=TTLS)
    try:
        server.start()
    except DnsServerError as exc:
        pytest.skip(str(exc))
    with server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def resolver(dns: DnsServer, clock: FakeClock) -> AsyncIterator[Resolver]:
    async with Resolver(
        nameservers=[dns.address], timeout=1.0, tries=2, hosts_file=None, clock=clock
    ) as resolver:
        yield resolver


def _dead_port() -> int:
    """A loopback port with nothing listening (nothing is started on it afterwards)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- forward lookups ---------------------------------------------------------------------


async def test_resolves_both_families_from_a_nameserver_on_a_non_53_port(
    resolver: Resolver, dns: DnsServer
) -> None:
    assert dns.port != 53
    addresses = await resolver.resolve("both.test")
    assert set(addresses) == {ip_address("::2"), ip_address("127.0.0.2"), ip_address("127.0.0.3")}
    assert {("A", "both.test"), ("AAAA", "both.test")} <= set(dns.queries())


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
async def test_ipv6_nameserver_with_port(dns: DnsServer) -> None:
    async with Resolver(nameservers=[dns.address6], hosts_file=None) as resolver:
        assert await resolver.resolve("v6.test") == [IPv6Address("::1")]


async def test_one_family_answering_is_success(resolver: Resolver) -> None:
    assert await resolver.resolve("v4.test") == [IPv4Address("127.0.0.1")]
    assert await resolver.resolve("v6.test") == [IPv6Address("::1")]


async def test_cname_is_followed(resolver: Resolver) -> None:
    addresses = await resolver.resolve("alias.test")
    assert set(addresses) == {ip_address("::2"), ip_address("127.0.0.2"), ip_address("127.0.0.3")}


async def test_resolve_family_returns_only_that_family(resolver: Resolver) -> None:
    assert await resolver.resolve_family("both.test", socket.AF_INET6) == [IPv6Address("::2")]
    assert set(await resolver.resolve_family("both.test", socket.AF_INET)) == {
        IPv4Address("127.0.0.2"),
        IPv4Address("127.0.0.3"),
    }


async def test_resolve_family_without_such_record_is_nodata(resolver: Resolver) -> None:
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve_family("v4.test", socket.AF_INET6)
    assert caught.value.reason == "nodata"  # ResolveReason is a StrEnum


async def test_unknown_name_is_nxdomain(resolver: Resolver) -> None:
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve("nope.test")
    assert caught.value.reason == "nxdomain"
    assert caught.value.name == "nope.test"


async def test_refused_query_is_reported_as_refused(resolver: Resolver) -> None:
    # dnsmasq has no upstream, so it refuses names outside its local domains.
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve("outside.example")
    assert caught.value.reason == "refused"


async def test_name_is_lower_cased_and_final_dot_ignored(
    resolver: Resolver, dns: DnsServer
) -> None:
    assert await resolver.resolve_family("V4.Test.", socket.AF_INET) == [IPv4Address("127.0.0.1")]
    queries_before = resolver.stats.queries
    assert await resolver.resolve_family("v4.test", socket.AF_INET) == [IPv4Address("127.0.0.1")]
    assert resolver.stats.queries == queries_before  # same cache entry


# -- reverse lookups ---------------------------------------------------------------------


async def test_reverse_uses_ptr_records(resolver: Resolver) -> None:
    assert await resolver.reverse(IPv4Address("127.0.0.1")) == "v4.test"
    assert await resolver.reverse(IPv6Address("::1")) == "v6.test"
    assert await resolver.reverse(IPv6Address("::ffff:127.0.0.1")) == "v4.test"


async def test_reverse_without_ptr_raises(resolver: Resolver) -> None:
    with pytest.raises(ResolveError) as caught:
        await resolver.reverse(IPv4Address("198.51.100.77"))
    assert caught.value.reason == "nxdomain"


# -- hosts file and no-query paths -------------------------------------------------------


async def test_hosts_file_wins_over_dns_and_is_reread_when_changed(
    dns: DnsServer, clock: FakeClock, tmp_path: Path
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# test\n192.0.2.7 v4.test alias7\n")
    async with Resolver(nameservers=[dns.address], hosts_file=str(hosts), clock=clock) as resolver:
        assert await resolver.resolve("v4.test") == [IPv4Address("192.0.2.7")]
        assert await resolver.resolve("ALIAS7") == [IPv4Address("192.0.2.7")]
        assert await resolver.reverse(IPv4Address("192.0.2.7")) == "v4.test"
        assert resolver.stats.queries == 0
        assert await resolver.resolve("v6.test") == [IPv6Address("::1")]  # not listed: DNS

        hosts.write_text("192.0.2.8 v4.test\n")
        os.utime(hosts, ns=(0, 10**18))  # a different mtime even on coarse clocks
        clock.now += 10
        assert await resolver.resolve("v4.test") == [IPv4Address("192.0.2.8")]
        with pytest.raises(ResolveError):  # no longer listed, and DNS does not know it
            await resolver.resolve("alias7")


async def test_localhost_and_literals_never_query() -> None:
    # A nameserver nobody listens on: any query would fail.
    async with Resolver(nameservers=[f"127.0.0.1:{_dead_port()}"], hosts_file=None) as resolver:
        loopback = [IPv6Address("::1"), IPv4Address("127.0.0.1")]
        assert await resolver.resolve("localhost") == loopback
        assert await resolver.resolve("Foo.LOCALHOST.") == loopback
        assert await resolver.resolve("192.0.2.1") == [IPv4Address("192.0.2.1")]
        assert await resolver.resolve("2001:db8::1") == [IPv6Address("2001:db8::1")]
        assert await resolver.resolve_family("localhost", socket.AF_INET) == [loopback[1]]
        assert resolver.stats.queries == 0


@pytest.mark.parametrize(
    "name",
    [
        "bad\x00name.test",
        "tab\tname.test",
        "sp ace.test",
        "del\x7f.test",
        "a..b.test",
        "",
        ".",
        "x" * 64 + ".test",
        "a." * 127 + "test",
    ],
)
async def test_invalid_names_fail_without_a_query(resolver: Resolver, name: str) -> None:
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve(name)
    assert caught.value.reason == "invalid"
    assert resolver.stats.queries == 0


# -- cache -------------------------------------------------------------------------------


async def test_positive_answers_are_cached_for_their_ttl(
    resolver: Resolver, clock: FakeClock
) -> None:
    expected = [IPv4Address("192.0.2.10")]
    assert await resolver.resolve_family("short.test", socket.AF_INET) == expected
    assert resolver.stats.queries == 1
    clock.now += 59
    assert await resolver.resolve_family("short.test", socket.AF_INET) == expected
    assert resolver.stats.queries == 1
    clock.now += 2
    assert await resolver.resolve_family("short.test", socket.AF_INET) == expected
    assert resolver.stats.queries == 2


async def test_zero_ttl_answers_are_not_cached(resolver: Resolver) -> None:
    for _ in range(2):
        assert await resolver.resolve_family("zero.test", socket.AF_INET) == [
            IPv4Address("192.0.2.11")
        ]
    assert resolver.stats.queries == 2


async def test_negative_answers_are_cached_briefly(dns: DnsServer, clock: FakeClock) -> None:
    async with Resolver(
        nameservers=[dns.address], hosts_file=None, clock=clock, negative_ttl=5
    ) as resolver:
        for _ in range(2):
            with pytest.raises(ResolveError):
                await resolver.resolve("missing.test")
        assert resolver.stats.queries == 2  # A and AAAA once each
        clock.now += 6
        with pytest.raises(ResolveError):
            await resolver.resolve("missing.test")
        assert resolver.stats.queries == 4


async def test_cache_is_bounded_least_recently_used_first(dns: DnsServer, clock: FakeClock) -> None:
    async with Resolver(
        nameservers=[dns.address], hosts_file=None, clock=clock, cache_size=2
    ) as resolver:

        async def lookup(name: str) -> None:
            await resolver.resolve_family(name, socket.AF_INET)

        for name in ("a.test", "b.test", "a.test", "c.test"):  # b is least recent at c
            await lookup(name)
        assert resolver.stats.queries == 3
        await lookup("a.test")
        await lookup("c.test")
        assert resolver.stats.queries == 3
        await lookup("b.test")
        assert resolver.stats.queries == 4


async def test_cached_answer_survives_the_server_going_away(clock: FakeClock) -> None:
    with DnsServer(a={"gone.test": ["192.0.2.20"]}, ttl=300) as server:
        async with Resolver(nameservers=[server.address], hosts_file=None, clock=clock) as resolver:
            assert await resolver.resolve_family("gone.test", socket.AF_INET) == [
                IPv4Address("192.0.2.20")
            ]
            server.stop()
            clock.now += 299
            assert await resolver.resolve_family("gone.test", socket.AF_INET) == [
                IPv4Address("192.0.2.20")
            ]
            assert resolver.stats.queries == 1


async def test_concurrent_lookups_of_one_name_share_the_query(
    resolver: Resolver, dns: DnsServer
) -> None:
    seen_before = len(dns.queries())
    results = await asyncio.gather(*(resolver.resolve("v4.test") for _ in range(10)))
    assert all(result == [IPv4Address("127.0.0.1")] for result in results)
    assert resolver.stats.queries == 2
    assert len(dns.queries()) - seen_before == 2


# -- failures of the server --------------------------------------------------------------


async def test_closed_nameserver_port_fails_fast() -> None:
    loop = asyncio.get_running_loop()
    async with Resolver(
        nameservers=[f"127.0.0.1:{_dead_port()}"], timeout=0.5, tries=2, hosts_file=None
    ) as resolver:
        started = loop.time()
        with pytest.raises(ResolveError) as caught:
            await resolver.resolve("any.test")
        assert loop.time() - started < 1.0 + 0.3
    assert caught.value.reason in ("unreachable", "timeout")


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A UDP socket on loopback that swallows queries: a server that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sink.getsockname()[1]}"


async def test_silent_nameserver_times_out_within_timeout_times_tries(silent_server: str) -> None:
    loop = asyncio.get_running_loop()
    async with Resolver(
        nameservers=[silent_server], timeout=0.5, tries=2, hosts_file=None
    ) as resolver:
        started = loop.time()
        with pytest.raises(ResolveError) as caught:
            await resolver.resolve("any.test")
        elapsed = loop.time() - started
    assert caught.value.reason == "timeout"
    # c-ares alone backs off to about 1.3 s here; the resolver cuts it at timeout * tries.
    assert 0.5 - 0.002 <= elapsed < 1.0 + 0.2  # uvloop: 1 ms clock


async def test_close_fails_pending_lookups_with_resolve_error(silent_server: str) -> None:
    resolver = Resolver(nameservers=[silent_server], timeout=5, tries=1, hosts_file=None)
    pending = asyncio.ensure_future(resolver.resolve("any.test"))
    await asyncio.sleep(0.05)
    await resolver.close()
    with pytest.raises(ResolveError):
        await asyncio.wait_for(pending, 2)
    with pytest.raises(ResolveError):
        await resolver.resolve("other.test")
