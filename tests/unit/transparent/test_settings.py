"""The ``transparent`` config section: every key checked, errors name their key."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import pytest

from translator.config import Config, ConfigError, config_from_mapping
from translator.transparent.settings import pool_conflicts


def parse(**section: Any) -> Config:
    return config_from_mapping({"transparent": section})


def test_defaults_leave_the_front_off() -> None:
    settings = parse().transparent
    assert not settings.enabled
    assert settings.pool == IPv4Network("198.18.0.0/15")
    assert settings.synthesize == "missing-a" and settings.denied_answer == "refused"
    assert settings.state_file == "/var/lib/socks64/transparent.state"


def test_a_full_section() -> None:
    settings = parse(
        dns_listen=["192.0.2.1:53", "[2001:db8::1]:5353"],
        pool="198.18.0.0/16",
        synthesize="always",
        denied_answer="real",
        interfaces=["lan0", "wlan0"],
        state_file=None,
        fwmark=7,
        route_table=200,
        answer_ttl=10,
    ).transparent
    assert settings.enabled
    assert settings.dns_listen == (("192.0.2.1", 53), ("2001:db8::1", 5353))
    assert settings.interfaces == ("lan0", "wlan0")
    assert settings.state_file is None


@pytest.mark.parametrize(
    ("section", "key", "words"),
    [
        ({"pool": "100.64.0.0/16"}, "transparent.pool", "shared address space"),
        ({"pool": "239.1.0.0/16"}, "transparent.pool", "multicast"),
        ({"pool": "2001:db8::/64"}, "transparent.pool", "IPv4"),
        ({"pool": "198.18.0.1/15"}, "transparent.pool", "not a network"),
        ({"pool": "198.51.100.0/31"}, "transparent.pool", "/30"),
        ({"synthesize": "sometimes"}, "transparent.synthesize", "missing-a, always"),
        ({"denied_answer": "nxdomain"}, "transparent.denied_answer", "refused, real"),
        ({"interfaces": "eth0"}, "transparent.interfaces", "list"),
        ({"interfaces": ["a/b"]}, "transparent.interfaces[0]", "interface name"),
        ({"dns_listen": ["nowhere"]}, "transparent.dns_listen[0]", "HOST:PORT"),
        ({"fwmark": 0}, "transparent.fwmark", "1..4294967295"),
        ({"answer_ttl": True}, "transparent.answer_ttl", "whole number"),
        ({"poool": "x"}, "transparent.poool", "unknown key"),
        ({"state_file": ""}, "transparent.state_file", "path or null"),
    ],
)
def test_bad_values_name_their_key(section: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(**section)
    assert caught.value.key == key
    assert words in str(caught.value)


def test_pool_conflicts_with_local_networks() -> None:
    local = [IPv4Network("192.0.2.0/24"), IPv4Network("198.19.0.0/24")]
    assert pool_conflicts(IPv4Network("198.18.0.0/15"), local) == ["198.19.0.0/24"]
    assert pool_conflicts(IPv4Network("198.18.0.0/16"), local) == []
