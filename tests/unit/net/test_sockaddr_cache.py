"""sockaddr_ip: parsed hosts are remembered (a bounded table), answers unchanged."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from translator.net import addresses
from translator.net.addresses import sockaddr_ip


def test_answers_are_those_of_a_fresh_parse() -> None:
    assert sockaddr_ip(("192.0.2.7", 1)) == IPv4Address("192.0.2.7")
    assert sockaddr_ip(("192.0.2.7", 2)) is sockaddr_ip(("192.0.2.7", 3))
    assert sockaddr_ip(("::ffff:192.0.2.8", 1, 0, 0)) == IPv4Address("192.0.2.8")
    assert sockaddr_ip(("fe80::1%lo", 1, 0, 1)) == IPv6Address("fe80::1")
    assert sockaddr_ip(("2001:db8::1", 1, 0, 0)) == IPv6Address("2001:db8::1")


def test_the_table_stays_bounded() -> None:
    for i in range(addresses._PARSED_MAX + 10):
        sockaddr_ip((f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1))
    assert len(addresses._PARSED) <= addresses._PARSED_MAX
