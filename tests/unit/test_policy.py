"""translator.policy: rule matching, ordering, defaults, config errors, may_allow."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import netaddr
import pytest
import yaml

from translator.policy import Command, Decision, Policy, PolicyError, Rule

PROJECT = Path(__file__).resolve().parents[2]


def make_policy(*rules: dict[str, Any], default: str = "deny") -> Policy:
    return Policy.from_config({"default": default, "rules": list(rules)})


def check(
    policy: Policy,
    *,
    client: str = "127.0.0.1",
    user: str | None = None,
    command: Command = Command.CONNECT,
    address: str | None = None,
    name: str | None = None,
    port: int | None = 80,
) -> Decision:
    return policy.check(
        client=ip_address(client),
        user=user,
        command=command,
        address=None if address is None else ip_address(address),
        name=name,
        port=port,
    )


def allowed(policy: Policy, **request: Any) -> bool:
    return check(policy, **request).allowed


# --- defaults and ordering ------------------------------------------------------------


def test_no_rules_denies_by_default() -> None:
    decision = check(Policy.from_config({}))
    assert decision == Decision(False, None, "default deny")


def test_default_allow() -> None:
    decision = check(make_policy(default="allow"))
    assert decision == Decision(True, None, "default allow")


def test_default_applies_when_no_rule_matches() -> None:
    policy = make_policy({"action": "deny", "clients": ["192.0.2.0/24"]}, default="allow")
    assert allowed(policy, client="198.51.100.1")
    assert not allowed(policy, client="192.0.2.1")


def test_first_match_wins() -> None:
    allow_first = make_policy(
        {"action": "allow", "clients": ["127.0.0.0/8"]},
        {"action": "deny", "clients": ["127.0.0.1"]},
    )
    deny_first = make_policy(
        {"action": "deny", "clients": ["127.0.0.1"]},
        {"action": "allow", "clients": ["127.0.0.0/8"]},
    )
    assert check(allow_first).rule_index == 0 and allowed(allow_first)
    assert check(deny_first).rule_index == 0 and not allowed(deny_first)
    # A client only the second rule covers reaches it.
    assert check(deny_first, client="127.0.0.2") == Decision(True, 1, "rule 1 (allow)")


def test_reason_names_rule_action_and_comment() -> None:
    policy = make_policy(
        {"action": "deny", "users": ["mallory"], "comment": "banned"},
        {"action": "allow", "comment": "everyone else"},
    )
    assert check(policy, user="mallory").reason == "rule 0 (deny: banned)"
    assert check(policy, user="alice").reason == "rule 1 (allow: everyone else)"


def test_rule_without_criteria_matches_everything() -> None:
    policy = make_policy({"action": "allow"})
    assert allowed(policy, client="2001:db8::1", user=None, command=Command.MULTICAST, port=None)


# --- client criteria ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("127.0.0.1", True),
        ("127.255.255.255", True),
        ("128.0.0.1", False),
        ("::1", True),
        ("::2", False),
        ("192.0.2.77", True),  # single address without prefix
        ("192.0.2.78", False),
        ("2001:db8:0:1::5", True),
        ("2001:db8:0:2::5", False),
    ],
)
def test_clients(client: str, expected: bool) -> None:
    policy = make_policy(
        {
            "action": "allow",
            "clients": ["127.0.0.0/8", "::1/128", "192.0.2.77", "2001:db8:0:1::/64"],
        }
    )
    assert allowed(policy, client=client) is expected


@pytest.mark.parametrize("client", ["::ffff:192.0.2.9", "::ffff:c000:209"])
def test_ipv4_mapped_client_matches_ipv4_network(client: str) -> None:
    policy = make_policy({"action": "allow", "clients": ["192.0.2.0/24"]})
    assert check(policy, client=client).rule_index == 0
    assert not allowed(policy, client="::ffff:198.51.100.9")


def test_mapped_network_in_config_matches_ipv4_client() -> None:
    policy = make_policy({"action": "allow", "clients": ["::ffff:192.0.2.0/120"]})
    assert allowed(policy, client="192.0.2.200")
    assert allowed(policy, client="::ffff:192.0.2.200")
    assert not allowed(policy, client="198.51.100.1")


def test_all_ipv6_does_not_cover_mapped_ipv4_clients() -> None:
    policy = make_policy({"action": "allow", "clients": ["::/0"]})
    assert allowed(policy, client="2001:db8::1")
    assert not allowed(policy, client="::ffff:192.0.2.1")
    assert not allowed(policy, client="192.0.2.1")


def test_users() -> None:
    policy = make_policy({"action": "allow", "users": ["alice", "bob"]})
    assert allowed(policy, user="alice")
    assert allowed(policy, user="bob")
    assert not allowed(policy, user="Alice")
    assert not allowed(policy, user=None)  # unauthenticated never matches a user rule


@pytest.mark.parametrize("command", list(Command))
def test_commands_each(command: Command) -> None:
    policy = make_policy({"action": "allow", "commands": [command.value]})
    for other in Command:
        assert allowed(policy, command=other) is (other is command)


def test_commands_are_case_insensitive_in_config() -> None:
    policy = make_policy({"action": "allow", "commands": ["CONNECT", "Udp"]})
    assert policy.rules[0].commands == frozenset({Command.CONNECT, Command.UDP})


# --- destination criteria -------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("192.0.2.1", True),
        ("192.0.3.1", False),
        ("2001:db8:ffff::1", True),
        ("2001:db9::1", False),
        ("::ffff:192.0.2.1", True),
        (None, False),
    ],
)
def test_destinations(address: str | None, expected: bool) -> None:
    policy = make_policy({"action": "allow", "destinations": ["192.0.2.0/24", "2001:db8::/32"]})
    assert allowed(policy, address=address) is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("example.test", True),
        ("www.example.test", True),
        ("a.b.example.test", True),
        ("WWW.Example.TEST.", True),
        ("badexample.test", False),
        ("example.test.evil", False),
        ("lab.test", False),  # leading dot: below only
        ("host.lab.test", True),
        ("deep.host.lab.test", True),
        ("xlab.test", False),
        ("other.test", False),
        (None, False),
        ("", False),
    ],
)
def test_domains(name: str | None, expected: bool) -> None:
    policy = make_policy({"action": "allow", "domains": ["example.test", ".lab.test"]})
    assert allowed(policy, name=name) is expected


def test_domain_pattern_is_normalised() -> None:
    policy = make_policy({"action": "allow", "domains": ["Example.TEST.", ".Lab.Test"]})
    assert policy.rules[0].domains == ("example.test", ".lab.test")
    assert allowed(policy, name="www.example.test")
    assert allowed(policy, name="h.lab.test")


@pytest.mark.parametrize(
    ("port", "expected"),
    [(80, True), (443, True), (81, False), (7999, False), (8000, True), (8050, True),
     (8100, True), (8101, False), (0, False), (None, False)],
)  # fmt: skip
def test_ports(port: int | None, expected: bool) -> None:
    policy = make_policy({"action": "allow", "ports": [80, "443", "8000-8100"]})
    assert allowed(policy, port=port) is expected


def test_port_ranges_are_merged() -> None:
    policy = make_policy({"action": "allow", "ports": ["10-20", 21, "15-30", 40, "0"]})
    assert policy.rules[0].ports == ((0, 0), (10, 30), (40, 40))


def test_every_criterion_must_match() -> None:
    rule = {
        "action": "allow",
        "clients": ["127.0.0.0/8"],
        "users": ["alice"],
        "commands": ["connect"],
        "destinations": ["192.0.2.0/24"],
        "domains": ["example.test"],
        "ports": [443],
    }
    policy = make_policy(rule)
    good: dict[str, Any] = {
        "client": "127.0.0.1",
        "user": "alice",
        "command": Command.CONNECT,
        "address": "192.0.2.1",
        "name": "www.example.test",
        "port": 443,
    }
    assert allowed(policy, **good)
    for field, bad in [
        ("client", "192.0.2.1"),
        ("user", "bob"),
        ("command", Command.BIND),
        ("address", "198.51.100.1"),
        ("name", "other.test"),
        ("port", 80),
    ]:
        assert not allowed(policy, **{**good, field: bad}), field


# --- two-phase checks around name resolution ------------------------------------------


def test_destinations_rule_waits_for_resolved_address() -> None:
    policy = make_policy(
        {"action": "deny", "destinations": ["192.0.2.0/24"], "comment": "lab"},
        {"action": "allow", "domains": ["example.test"]},
    )
    before = check(policy, name="www.example.test")
    assert before.allowed and before.rule_index == 1 and before.provisional
    after = check(policy, name="www.example.test", address="192.0.2.10")
    assert after == Decision(False, 0, "rule 0 (deny: lab)")
    elsewhere = check(policy, name="www.example.test", address="198.51.100.10")
    assert elsewhere == Decision(True, 1, "rule 1 (allow)")


def test_default_deny_is_provisional_when_an_address_rule_could_allow() -> None:
    policy = make_policy({"action": "allow", "destinations": ["192.0.2.0/24"]})
    before = check(policy, name="host.test")
    assert not before.allowed and before.rule_index is None and before.provisional
    assert check(policy, name="host.test", address="192.0.2.1").allowed


def test_verdict_is_final_when_skipped_rules_agree() -> None:
    policy = make_policy(
        {"action": "deny", "destinations": ["192.0.2.0/24"]},
        {"action": "deny", "users": ["mallory"]},
    )
    decision = check(policy, user="mallory", name="host.test")
    assert decision == Decision(False, 1, "rule 1 (deny)", provisional=False)
    # With the address known nothing is provisional.
    assert not check(policy, name="host.test", address="198.51.100.1").provisional


# --- may_allow ------------------------------------------------------------------------


def may_allow(
    policy: Policy,
    client: str = "127.0.0.1",
    user: str | None = None,
    command: Command = Command.UDP,
) -> bool:
    return policy.may_allow(client=ip_address(client), user=user, command=command)


def test_may_allow_follows_default_without_rules() -> None:
    assert not may_allow(make_policy())
    assert may_allow(make_policy(default="allow"))


def test_may_allow_true_when_an_allow_rule_has_destination_criteria() -> None:
    policy = make_policy({"action": "allow", "destinations": ["192.0.2.0/24"], "ports": [53]})
    assert may_allow(policy)
    # ...even though no concrete request without a destination is allowed.
    assert not check(policy, command=Command.UDP, port=None).allowed


def test_may_allow_false_after_unconditional_deny() -> None:
    policy = make_policy(
        {"action": "deny", "users": ["mallory"]},
        {"action": "allow"},
    )
    assert not may_allow(policy, user="mallory")
    assert may_allow(policy, user="alice")


def test_may_allow_looks_past_a_deny_with_destination_criteria() -> None:
    policy = make_policy(
        {"action": "deny", "domains": ["blocked.test"]},
        {"action": "allow", "commands": ["connect"]},
    )
    assert may_allow(policy, command=Command.CONNECT)
    assert not may_allow(policy, command=Command.BIND)


def test_may_allow_checks_client_user_and_command() -> None:
    policy = make_policy(
        {"action": "allow", "clients": ["::1"], "users": ["alice"], "commands": ["bind"]}
    )
    assert may_allow(policy, client="::1", user="alice", command=Command.BIND)
    assert not may_allow(policy, client="::2", user="alice", command=Command.BIND)
    assert not may_allow(policy, client="::1", user=None, command=Command.BIND)
    assert not may_allow(policy, client="::1", user="alice", command=Command.CONNECT)


def test_may_allow_mapped_client() -> None:
    policy = make_policy({"action": "allow", "clients": ["127.0.0.0/8"]})
    assert may_allow(policy, client="::ffff:127.0.0.1")


# --- config errors --------------------------------------------------------------------


def rule(**fields: Any) -> dict[str, Any]:
    return {"action": "allow", **fields}


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"defualt": "deny"}, "policy.defualt"),
        ({"default": "permit"}, "policy.default"),
        ({"default": True}, "policy.default"),
        ({"rules": {"action": "allow"}}, "policy.rules"),
        ({"rules": ["allow"]}, "policy.rules[0]"),
        ({"rules": [rule(), {"comment": "x"}]}, "policy.rules[1].action"),
        ({"rules": [rule(), rule(), {"action": "reject"}]}, "policy.rules[2].action"),
        ({"rules": [rule(client=["127.0.0.1"])]}, "policy.rules[0].client"),
        ({"rules": [rule(clients=["127.0.0.0/33"])]}, "policy.rules[0].clients[0]"),
        ({"rules": [rule(clients=["::1", "not-an-ip"])]}, "policy.rules[0].clients[1]"),
        ({"rules": [rule(clients=["127.1"])]}, "policy.rules[0].clients[0]"),
        ({"rules": [rule(clients=["192.0.2.5/24"])]}, "policy.rules[0].clients[0]"),
        ({"rules": [rule(clients=[2130706433])]}, "policy.rules[0].clients[0]"),
        ({"rules": [rule(clients="127.0.0.1")]}, "policy.rules[0].clients"),
        ({"rules": [rule(clients=[])]}, "policy.rules[0].clients"),
        ({"rules": [rule(destinations=["2001:db8::/129"])]}, "policy.rules[0].destinations[0]"),
        ({"rules": [rule(users=["alice", 42])]}, "policy.rules[0].users[1]"),
        ({"rules": [rule(users=["*"])]}, "policy.rules[0].users[0]"),
        ({"rules": [rule(users=[""])]}, "policy.rules[0].users[0]"),
        ({"rules": [rule(users=["x" * 256])]}, "policy.rules[0].users[0]"),
        ({"rules": [rule(commands=["connect", "udp-associate"])]}, "policy.rules[0].commands[1]"),
        ({"rules": [rule(commands=[1])]}, "policy.rules[0].commands[0]"),
        ({"rules": [rule(domains=["*.example.test"])]}, "policy.rules[0].domains[0]"),
        ({"rules": [rule(domains=["ok.test", "a..b"])]}, "policy.rules[0].domains[1]"),
        ({"rules": [rule(domains=["."])]}, "policy.rules[0].domains[0]"),
        ({"rules": [rule(domains=["a b.test"])]}, "policy.rules[0].domains[0]"),
        ({"rules": [rule(ports=[80, 443, 70000])]}, "policy.rules[0].ports[2]"),
        ({"rules": [rule(ports=[-1])]}, "policy.rules[0].ports[0]"),
        ({"rules": [rule(ports=["http"])]}, "policy.rules[0].ports[0]"),
        ({"rules": [rule(ports=["90-80"])]}, "policy.rules[0].ports[0]"),
        ({"rules": [rule(ports=["80-"])]}, "policy.rules[0].ports[0]"),
        ({"rules": [rule(ports=[True])]}, "policy.rules[0].ports[0]"),
        ({"rules": [rule(ports=[80.5])]}, "policy.rules[0].ports[0]"),
        ({"rules": [rule(ports=80)]}, "policy.rules[0].ports"),
        ({"rules": [rule(comment=5)]}, "policy.rules[0].comment"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_config(config)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")
    assert isinstance(caught.value, ValueError)


def test_config_error_uses_given_key_prefix() -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_config({"rules": [rule(ports=["x"])]}, key="listeners[1].policy")
    assert caught.value.key == "listeners[1].policy.rules[0].ports[0]"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"defualt": "deny"}, "policy.defualt: unknown key (known: default, rules)"),
        (
            {"rules": [rule(client=["127.0.0.1"])]},
            "policy.rules[0].client: unknown key (known: action, clients, users, commands,"
            " destinations, domains, ports, comment)",
        ),
    ],
)
def test_unknown_key_lists_the_known_keys(config: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_config(config)
    assert str(caught.value) == message


def test_host_bits_error_suggests_the_network() -> None:
    with pytest.raises(PolicyError, match=r"192\.0\.2\.0/24"):
        make_policy(rule(clients=["192.0.2.5/24"]))


def test_config_builds_typed_rules() -> None:
    policy = make_policy(
        {
            "action": "deny",
            "clients": ["127.0.0.0/8", "::1"],
            "users": ["alice"],
            "commands": ["bind"],
            "destinations": ["2001:db8::/32"],
            "domains": ["example.test"],
            "ports": ["1-1023"],
            "comment": "c",
        }
    )
    assert policy.rules == (
        Rule(
            action="deny",
            clients=netaddr.IPSet(["127.0.0.0/8", "::1/128"]),
            users=frozenset({"alice"}),
            commands=frozenset({Command.BIND}),
            destinations=netaddr.IPSet(["2001:db8::/32"]),
            domains=("example.test",),
            ports=((1, 1023),),
            comment="c",
        ),
    )


def test_null_criteria_mean_any() -> None:
    policy = make_policy({"action": "allow", "clients": None, "ports": None, "comment": None})
    assert allowed(policy, client="2001:db8::1", port=None)


def test_rules_built_in_code() -> None:
    policy = Policy([Rule("allow", users=frozenset({"alice"})), Rule("deny")], default="allow")
    assert allowed(policy, user="alice")
    assert check(policy, user="bob") == Decision(False, 1, "rule 1 (deny)")
    with pytest.raises(ValueError):
        Rule("permit")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Policy(default="maybe")  # type: ignore[arg-type]


def test_shipped_config_policy() -> None:
    data = yaml.safe_load((PROJECT / "config" / "socks64.yaml").read_text())
    policy = Policy.from_config(data["policy"])
    assert allowed(policy, client="127.0.0.1")
    assert allowed(policy, client="::1")
    assert not allowed(policy, client="192.0.2.1")


# --- hot path -------------------------------------------------------------------------


def test_check_creates_no_netaddr_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = make_policy(
        {"action": "deny", "clients": ["198.51.100.0/24"]},
        {"action": "allow", "clients": ["127.0.0.0/8"], "destinations": ["2001:db8::/32"]},
    )

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("netaddr object created on the hot path")

    monkeypatch.setattr(netaddr.IPAddress, "__init__", forbidden)
    monkeypatch.setattr(netaddr.IPNetwork, "__init__", forbidden)
    decision = policy.check(
        client=IPv4Address("127.0.0.1"),
        user=None,
        command=Command.UDP,
        address=IPv6Address("2001:db8::53"),
        port=53,
    )
    assert decision.allowed and decision.rule_index == 1
