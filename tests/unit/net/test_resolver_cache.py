"""Pure parts of translator.net.resolver: cache, name rules, nameserver forms, hosts file."""

from __future__ import annotations

import os
import socket
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from translator.net.resolver import (
    HostsFile,
    ResolveError,
    Resolver,
    TtlLruCache,
    normalize_name,
    parse_nameserver,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


# -- TtlLruCache -------------------------------------------------------------------------


def test_cache_entry_lives_exactly_its_ttl() -> None:
    clock = FakeClock()
    cache: TtlLruCache[str, int] = TtlLruCache(4, clock)
    cache.put("k", 1, ttl=10)
    clock.now += 9.999
    assert cache.get("k") == 1
    clock.now += 0.001
    assert cache.get("k") is None
    assert len(cache) == 0


def test_cache_evicts_least_recently_used() -> None:
    cache: TtlLruCache[str, int] = TtlLruCache(2, FakeClock())
    cache.put("a", 1, ttl=10)
    cache.put("b", 2, ttl=10)
    assert cache.get("a") == 1  # b is now the least recently used
    cache.put("c", 3, ttl=10)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


def test_cache_keeps_nothing_for_zero_ttl_or_zero_capacity() -> None:
    cache: TtlLruCache[str, int] = TtlLruCache(2, FakeClock())
    cache.put("k", 1, ttl=10)
    cache.put("k", 2, ttl=0)  # a zero-TTL answer also replaces the older one
    assert cache.get("k") is None
    empty: TtlLruCache[str, int] = TtlLruCache(0, FakeClock())
    empty.put("k", 1, ttl=10)
    assert empty.get("k") is None


# -- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("_srv.example", "_srv.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("x" * 63 + ".test", "x" * 63 + ".test"),
    ],
)
def test_normalize_name(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "a..b",
        ".a",
        "nul\x00",
        "bell\x07.test",
        "new\nline",
        "sp ace",
        "\x7f",
        "\u200b.test",
        "x" * 64,
        ("a" * 62 + ".") * 4 + "ab",
    ],
)
def test_normalize_name_rejects(raw: str) -> None:
    with pytest.raises(ResolveError) as caught:
        normalize_name(raw)
    assert caught.value.reason == "invalid"
    assert caught.value.name == raw


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("192.0.2.53", "192.0.2.53:53"),
        ("127.0.0.1:5353", "127.0.0.1:5353"),
        ("2001:db8::53", "[2001:db8::53]:53"),
        ("[2001:db8::53]", "[2001:db8::53]:53"),
        ("[::1]:5353", "[::1]:5353"),
    ],
)
def test_parse_nameserver(entry: str, expected: str) -> None:
    assert parse_nameserver(entry) == expected


@pytest.mark.parametrize(
    "entry", ["ns.example", "127.0.0.1:0", "127.0.0.1:70000", "[::1", "[::1]x", "1.2.3.4:x"]
)
def test_parse_nameserver_rejects(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(entry)


def test_resolver_rejects_bad_nameserver_at_construction() -> None:
    with pytest.raises(ValueError):
        Resolver(nameservers=["not-an-address"])


# -- hosts file --------------------------------------------------------------------------


HOSTS = """\
# comment line
127.0.0.1   localhost
192.0.2.1   Alpha.example alpha   # trailing comment
2001:db8::1 alpha.example
192.0.2.2   beta.example alpha.example
not-an-ip   gamma.example
192.0.2.3
"""


def test_hosts_file_forward_and_reverse(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(HOSTS)
    hosts = HostsFile(str(path), FakeClock())
    assert hosts.lookup("alpha.example") == [
        IPv4Address("192.0.2.1"),
        IPv6Address("2001:db8::1"),
        IPv4Address("192.0.2.2"),
    ]
    assert hosts.lookup("alpha") == [IPv4Address("192.0.2.1")]
    assert hosts.lookup("gamma.example") == []
    assert hosts.reverse(IPv4Address("192.0.2.2")) == "beta.example"
    assert hosts.reverse(IPv4Address("192.0.2.3")) is None


def test_hosts_file_reloads_after_change_once_recheck_interval_passed(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "hosts"
    path.write_text("192.0.2.1 host.example\n")
    hosts = HostsFile(str(path), clock, recheck_interval=2.0)
    assert hosts.lookup("host.example") == [IPv4Address("192.0.2.1")]
    path.write_text("192.0.2.99 host.example\n")
    os.utime(path, ns=(0, 10**18))
    clock.now += 1
    assert hosts.lookup("host.example") == [IPv4Address("192.0.2.1")]  # not re-checked yet
    clock.now += 1
    assert hosts.lookup("host.example") == [IPv4Address("192.0.2.99")]
    path.unlink()
    clock.now += 2
    assert hosts.lookup("host.example") == []


def test_missing_or_disabled_hosts_file_is_empty(tmp_path: Path) -> None:
    assert HostsFile(str(tmp_path / "absent"), FakeClock()).lookup("localhost") == []
    assert HostsFile(None, FakeClock()).reverse(IPv4Address("127.0.0.1")) is None


# -- paths that never reach DNS ----------------------------------------------------------


async def test_literals_localhost_and_hosts_need_no_query(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("192.0.2.5 listed.example\n2001:db8::5 listed.example\n")
    # Nothing listens on loopback port 1: a query would fail, but none is made.
    async with Resolver(nameservers=["127.0.0.1:1"], hosts_file=str(path)) as resolver:
        assert await resolver.resolve("::1") == [IPv6Address("::1")]
        assert await resolver.resolve("localhost") == [
            IPv6Address("::1"),
            IPv4Address("127.0.0.1"),
        ]
        assert await resolver.resolve_family("x.localhost", socket.AF_INET6) == [IPv6Address("::1")]
        assert await resolver.resolve_family("LISTED.example", socket.AF_INET) == [
            IPv4Address("192.0.2.5")
        ]
        assert await resolver.reverse(IPv6Address("2001:db8::5")) == "listed.example"
        assert resolver.stats.queries == 0


async def test_literal_of_the_other_family_is_wrong_family() -> None:
    async with Resolver(nameservers=["127.0.0.1:1"], hosts_file=None) as resolver:
        with pytest.raises(ResolveError) as caught:
            await resolver.resolve_family("192.0.2.1", socket.AF_INET6)
        assert caught.value.reason == "wrong_family"
        with pytest.raises(ValueError):
            await resolver.resolve_family("192.0.2.1", socket.AF_UNIX)
