"""Configuration: defaults, endpoint forms, and errors that name the offending key."""

from __future__ import annotations

import socket
from ipaddress import ip_address
from pathlib import Path

import pytest

from translator.config import (
    Config,
    ConfigError,
    Endpoint,
    config_from_mapping,
    load_config,
    parse_endpoint,
)
from translator.policy import Command


def test_shipped_default_is_loopback_only() -> None:
    config = load_config(None)
    assert config.listen == (Endpoint("127.0.0.1", 1080), Endpoint("::1", 1080))
    assert config.auth.methods == ("none",)
    from ipaddress import ip_address

    from translator.policy import Command

    policy = config.policy
    for client, allowed in (("127.0.0.1", True), ("::1", True), ("192.0.2.7", False)):
        decision = policy.check(
            client=ip_address(client),
            user=None,
            command=Command.CONNECT,
            address=ip_address("198.51.100.1"),
            port=80,
        )
        assert decision.allowed is allowed, client


@pytest.mark.parametrize(
    ("text", "endpoint", "family"),
    [
        ("127.0.0.1:1080", Endpoint("127.0.0.1", 1080), socket.AF_INET),
        ("[::1]:0", Endpoint("::1", 0), socket.AF_INET6),
        ("[2001:db8::1]:65535", Endpoint("2001:db8::1", 65535), socket.AF_INET6),
    ],
)
def test_endpoints(text: str, endpoint: Endpoint, family: int) -> None:
    assert parse_endpoint(text) == endpoint
    assert parse_endpoint(text).family == family


@pytest.mark.parametrize(
    "text", ["::1:1080", "localhost:1080", "127.0.0.1", "127.0.0.1:70000", "[::1]1080", "1.2.3:80"]
)
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_endpoint(text)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"lsiten": []}, "lsiten"),
        ({"listen": "127.0.0.1:1080"}, "listen"),
        ({"listen": ["127.0.0.1:1080", "nope"]}, "listen[1]"),
        ({"auth": {"methods": ["none", "chap"]}}, "auth.methods[1]"),
        ({"auth": {"methods": ["none", "gssapi"]}}, "auth.gssapi.keytab"),
        ({"auth": {"methods": ["username"]}}, "auth.users_file"),
        ({"resolver": {"timeout": 0}}, "resolver.timeout"),
        ({"resolver": {"tries": 1.5}}, "resolver.tries"),
        ({"resolver": {"nameservers": ["dns.example"]}}, "resolver.nameservers[0]"),
        ({"resolver": {"prefer": "ipv5"}}, "resolver.prefer"),
        ({"timeouts": {"connect": -1}}, "timeouts.connect"),
        ({"timeouts": {"conect": 1}}, "timeouts.conect"),
        ({"limits": {"max_clients": 0}}, "limits.max_clients"),
        ({"bind": {"address_v4": "::1"}}, "bind.address_v4"),
        ({"outbound": {"interface": "x" * 20}}, "outbound.interface"),
        ({"udp": {"fragment_timeout": 1}}, "udp.fragment_timeout"),
        ({"udp": {"multicast_hops": 300}}, "udp.multicast_hops"),
        ({"udp": {"multicast_interface": {"ipv5": "eth0"}}}, "udp.multicast_interface.ipv5"),
        ({"udp": {"restrict_to_announced": "yes"}}, "udp.restrict_to_announced"),
        ({"policy": {"rules": [{"action": "allow", "ports": ["x"]}]}}, "policy.rules[0].ports[0]"),
    ],
)
def test_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data)
    assert caught.value.key == key
    assert str(caught.value).startswith(key)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"lsiten": []},
            "lsiten: unknown key (known: listen, auth, resolver, timeouts, limits, addrmap,"
            " bind, outbound, udp, policy, metrics, transparent, shutdown_grace, user, group,"
            " workers)",
        ),
        (
            {"resolver": {"foo": 1}},
            "resolver.foo: unknown key (known: nameservers, timeout, tries, cache_size,"
            " hosts_file, prefer, happy_eyeballs_delay)",
        ),
        (
            {"udp": {"multicast_interface": {"ipv5": "eth0"}}},
            "udp.multicast_interface.ipv5: unknown key (known: ipv4, ipv6)",
        ),
    ],
)
def test_unknown_key_lists_the_known_keys(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data)
    assert str(caught.value) == message


def test_unknown_policy_key_has_the_config_wording() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"policy": {"rules": [{"action": "allow", "bar": 1}]}})
    assert caught.value.key == "policy.rules[0].bar"
    assert "policy.rules[0].bar: unknown key (known: action, clients, users," in str(caught.value)


def test_multicast_interface_forms() -> None:
    both = config_from_mapping({"udp": {"multicast_interface": "eth1"}}).udp
    assert (both.multicast_interface_v4, both.multicast_interface_v6) == ("eth1", "eth1")
    split = config_from_mapping(
        {"udp": {"multicast_interface": {"ipv4": "v-s4", "ipv6": "v-s6"}}}
    ).udp
    assert (split.multicast_interface_v4, split.multicast_interface_v6) == ("v-s4", "v-s6")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


PROJECT_CONFIG = Path(__file__).resolve().parents[2] / "config"


def test_the_shipped_default_config_states_the_built_in_defaults() -> None:
    """config/socks64.yaml says "the values below are the built-in defaults": keep it so."""
    shipped = load_config(PROJECT_CONFIG / "socks64.yaml")
    built_in = Config()
    for name in Config.__dataclass_fields__:
        if name in ("policy", "source"):
            continue
        assert getattr(shipped, name) == getattr(built_in, name), name


def test_an_absent_policy_section_allows_loopback_clients_as_documented() -> None:
    config = config_from_mapping({"listen": ["127.0.0.1:0"], "limits": {"max_clients": 10}})
    loopback = config.policy.check(
        client=ip_address("127.0.0.1"),
        user=None,
        command=Command.CONNECT,
        address=ip_address("127.0.0.1"),
    )
    assert loopback.allowed
    other = config.policy.check(
        client=ip_address("192.0.2.1"),
        user=None,
        command=Command.CONNECT,
        address=ip_address("127.0.0.1"),
    )
    assert not other.allowed


def test_an_explicit_empty_policy_denies_and_check_config_would_warn() -> None:
    config = config_from_mapping({"policy": {}})
    assert not config.policy.can_allow_anything()
    assert Config().policy.can_allow_anything()


def test_the_edge_router_example_is_valid_and_serves_metrics_on_loopback() -> None:
    config = load_config(PROJECT_CONFIG / "edge-router.yaml")
    assert config.metrics.listen is not None
    assert ip_address(config.metrics.listen.host).is_loopback


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"metrics": {"listen": "localhost:9464"}}, "metrics.listen"),
        ({"shutdown_grace": -1}, "shutdown_grace"),
        ({"user": "no-such-user-socks64"}, "user"),
        ({"group": "no-such-group-socks64"}, "group"),
        ({"udp": {"announce_v4": "2001:db8::1"}}, "udp.announce_v4"),
        ({"bind": {"announce_v6": "192.0.2.1"}}, "bind.announce_v6"),
        ({"limits": {"per_client": 0}}, "limits.per_client"),
        ({"udp": {"max_peers_total": 0}}, "udp.max_peers_total"),
    ],
)
def test_service_keys_are_validated(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data)
    assert caught.value.key == key


def test_service_keys_parse() -> None:
    config = config_from_mapping(
        {
            "metrics": {"listen": "[::1]:9464"},
            "shutdown_grace": 0,
            "user": "nobody",
            "udp": {"announce_v4": "203.0.113.7", "max_datagram_rate": 0},
            "bind": {"announce_v6": "2001:db8::7"},
        }
    )
    assert str(config.metrics.listen) == "[::1]:9464"
    assert config.shutdown_grace == 0.0
    assert config.user == "nobody"
    assert config.udp.announce_v4 == "203.0.113.7"
    assert config.bind.announce_v6 == "2001:db8::7"
    assert config.udp.max_datagram_rate == 0
