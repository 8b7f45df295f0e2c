"""Access policy: an ordered rule list, first match wins, with a configurable default.

Theory of operation
-------------------
A rule matches a request when every criterion it sets matches; a criterion it leaves out
matches anything. The rules are tried in order and the first match decides; when none
matches, the policy's ``default`` decides (``deny`` unless configured otherwise).

Criteria about the client: ``clients`` (networks), ``users`` (authenticated user names; an
unauthenticated client never matches a rule that names users) and ``commands``.

Criteria about the destination: ``destinations`` (networks, matched against the destination
*address*), ``domains`` (matched against the destination *name* the client sent) and
``ports``. A rule that sets one of them does not match a request that lacks that piece:
when the client sends a name, a rule with ``destinations`` can only match once the gateway
has resolved the name and calls :meth:`Policy.check` again with both name and address.
Such a first, address-less verdict is marked :attr:`Decision.provisional` when a skipped
rule could have decided the other way.

Domain patterns (case-insensitive, a trailing dot ignored):

* ``example.test`` matches ``example.test`` itself and every name below it
  (``www.example.test``, ``a.b.example.test``);
* ``.lab.test`` (leading dot) matches only names below it (``host.lab.test``), not
  ``lab.test`` itself.

Addresses: an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``), as a client or a destination,
is matched as the IPv4 address it carries, so IPv4 networks cover clients that reach a
dual-stack listener. A configured network that lies inside ``::ffff:0:0/96`` is likewise
matched as the IPv4 network it maps; a broader IPv6 network (``::/0``) matches only IPv6.

The networks are parsed with netaddr. For speed, :class:`Policy` precomputes each
``IPSet`` into sorted integer ranges and matches with ``bisect``: an ``IPSet`` membership
test builds an ``IPNetwork`` and walks up to 128 supernets (about 8 us per test), the
range search takes well under 1 us and creates no objects.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Literal

from netaddr import AddrFormatError, IPNetwork, IPSet

from .keys import check_keys

__all__ = [
    "Command",
    "Decision",
    "Policy",
    "PolicyError",
    "PortRanges",
    "Rule",
]

Action = Literal["allow", "deny"]
PortRanges = tuple[tuple[int, int], ...]
"""Inclusive ``(first, last)`` port ranges, sorted and merged."""

_ACTIONS: tuple[Action, ...] = ("allow", "deny")
_POLICY_KEYS = ("default", "rules")
_RULE_KEYS = (
    "action",
    "clients",
    "users",
    "commands",
    "destinations",
    "domains",
    "ports",
    "comment",
)
_MAX_NAME_OCTETS = 255  # RFC 1928 ATYP X'03' and RFC 1929 UNAME are both 1..255 octets
_MAPPED_PREFIX = 0xFFFF  # ::ffff:0:0/96 shifted right by 32
_MAPPED_NETWORK = IPNetwork("::ffff:0:0/96")


class Command(StrEnum):
    """What a client asks the gateway to do, as the policy sees it."""

    CONNECT = "connect"
    BIND = "bind"
    UDP = "udp"
    ASSOCIATE = "associate"  # ADDRESS ASSOCIATE (Kitamura)
    MULTICAST = "multicast"  # UDP control channel MULTICAST JOIN
    TRANSPARENT = "transparent"  # DNS46 answers and intercepted flows (transparent front)


_COMMANDS_BY_NAME = {command.value: command for command in Command}


class PolicyError(ValueError):
    """A policy configuration error; :attr:`key` is the offending key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Rule:
    """One policy rule. A criterion left as ``None`` matches anything."""

    action: Action
    clients: IPSet | None = None
    users: frozenset[str] | None = None
    commands: frozenset[Command] | None = None
    destinations: IPSet | None = None
    domains: tuple[str, ...] | None = None
    ports: PortRanges | None = None
    comment: str = ""

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"rule action must be 'allow' or 'deny', not {self.action!r}")

    def describe(self) -> str:
        """A short text for logs: the action and the comment, if any."""
        return f"{self.action}: {self.comment}" if self.comment else self.action


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict of :meth:`Policy.check`.

    ``rule_index`` is the 0-based position of the deciding rule, as in the config key path
    ``policy.rules[N]``, or ``None`` when the default decided. ``provisional`` is true when
    the request carried no destination address and a rule that needs one was skipped, one
    whose action differs from this verdict: check again once the address is known.
    """

    allowed: bool
    rule_index: int | None
    reason: str
    provisional: bool = False


class _AddressRanges:
    """An IPSet flattened to sorted, disjoint integer ranges per IP version."""

    __slots__ = ("_v4_ends", "_v4_starts", "_v6_ends", "_v6_starts")

    def __init__(self, networks: IPSet) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for cidr in networks.iter_cidrs():
            if cidr.version == 4:
                v4.append((cidr.first, cidr.last))
            elif cidr in _MAPPED_NETWORK:
                # ::ffff:a.b.c.d/96+n is the IPv4 network a.b.c.d/n.
                v4.append((cidr.first & 0xFFFFFFFF, cidr.last & 0xFFFFFFFF))
            else:
                v6.append((cidr.first, cidr.last))
        self._v4_starts, self._v4_ends = _merge(v4)
        self._v6_starts, self._v6_ends = _merge(v6)

    def contains(self, version: int, value: int) -> bool:
        if version == 4:
            starts, ends = self._v4_starts, self._v4_ends
        else:
            starts, ends = self._v6_starts, self._v6_ends
        position = bisect_right(starts, value) - 1
        return position >= 0 and value <= ends[position]


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sort and merge inclusive ranges; return (starts, ends)."""
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return tuple(r[0] for r in merged), tuple(r[1] for r in merged)


def _address_key(address: IPv4Address | IPv6Address) -> tuple[int, int]:
    """(version, integer value), with an IPv4-mapped IPv6 address taken as IPv4."""
    value = int(address)
    if address.version == 6 and value >> 32 == _MAPPED_PREFIX:
        return 4, value & 0xFFFFFFFF
    return address.version, value


def _normalise_name(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


class _CompiledRule:
    """A rule precomputed for :meth:`Policy.check`: plain sets, tuples and ranges."""

    __slots__ = (
        "allow",
        "clients",
        "commands",
        "decision",
        "destinations",
        "exact_names",
        "has_destination_criteria",
        "parent_names",
        "port_ends",
        "port_starts",
        "provisional_decision",
        "users",
    )

    def __init__(self, index: int, rule: Rule) -> None:
        self.allow = rule.action == "allow"
        self.clients = None if rule.clients is None else _AddressRanges(rule.clients)
        self.users = rule.users
        self.commands = rule.commands
        self.destinations = None if rule.destinations is None else _AddressRanges(rule.destinations)
        # Names matched exactly, and names whose subdomains match; None: no domains criterion.
        self.exact_names: frozenset[str] = frozenset()
        self.parent_names: frozenset[str] | None = None
        if rule.domains is not None:
            exact: set[str] = set()
            parents: set[str] = set()
            for pattern in rule.domains:
                pattern = _normalise_name(pattern)
                if pattern.startswith("."):
                    parents.add(pattern[1:])
                else:
                    exact.add(pattern)
                    parents.add(pattern)
            self.exact_names = frozenset(exact)
            self.parent_names = frozenset(parents)
        self.port_starts: tuple[int, ...] | None = None
        self.port_ends: tuple[int, ...] = ()
        if rule.ports is not None:
            self.port_starts, self.port_ends = _merge(list(rule.ports))
        self.has_destination_criteria = (
            rule.destinations is not None or rule.domains is not None or rule.ports is not None
        )
        reason = f"rule {index} ({rule.describe()})"
        self.decision = Decision(self.allow, index, reason)
        self.provisional_decision = Decision(self.allow, index, reason, provisional=True)

    def matches_client(
        self, client_key: tuple[int, int], user: str | None, command: Command
    ) -> bool:
        if self.commands is not None and command not in self.commands:
            return False
        if self.users is not None and (user is None or user not in self.users):
            return False
        return self.clients is None or self.clients.contains(*client_key)

    def matches_name_and_port(self, name: str | None, port: int | None) -> bool:
        if self.port_starts is not None:
            if port is None:
                return False
            position = bisect_right(self.port_starts, port) - 1
            if position < 0 or port > self.port_ends[position]:
                return False
        if self.parent_names is not None:
            if name is None:
                return False
            if name not in self.exact_names:
                dot = name.find(".")
                while dot != -1 and name[dot + 1 :] not in self.parent_names:
                    dot = name.find(".", dot + 1)
                if dot == -1:
                    return False
        return True


class Policy:
    """An ordered rule list; the first matching rule decides, else the default."""

    def __init__(self, rules: Iterable[Rule] = (), *, default: Action = "deny") -> None:
        if default not in _ACTIONS:
            raise ValueError(f"default must be 'allow' or 'deny', not {default!r}")
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.default: Action = default
        self._compiled = tuple(_CompiledRule(i, rule) for i, rule in enumerate(self.rules))
        allowed = default == "allow"
        self._default_decision = Decision(allowed, None, f"default {default}")
        self._default_provisional = Decision(allowed, None, f"default {default}", provisional=True)

    @classmethod
    def from_config(cls, data: Mapping[str, Any], *, key: str = "policy") -> Policy:
        """Build a policy from the parsed ``policy`` section of the config.

        Raises :class:`PolicyError` naming the exact key path of the first problem, e.g.
        ``policy.rules[2].ports[0]``.
        """
        if not isinstance(data, Mapping):
            raise PolicyError(key, "must be a mapping")
        check_keys(data, _POLICY_KEYS, key, PolicyError)
        default = _parse_action(data.get("default", "deny"), f"{key}.default")
        raw_rules = data.get("rules", [])
        if raw_rules is None:
            raw_rules = []
        if not isinstance(raw_rules, list):
            raise PolicyError(f"{key}.rules", "must be a list of rules")
        rules = [_parse_rule(raw, f"{key}.rules[{i}]") for i, raw in enumerate(raw_rules)]
        return cls(rules, default=default)

    def check(
        self,
        *,
        client: IPv4Address | IPv6Address,
        user: str | None,
        command: Command,
        address: IPv4Address | IPv6Address | None = None,
        name: str | None = None,
        port: int | None = None,
    ) -> Decision:
        """Decide a request. Runs per connection and per UDP datagram: no allocation
        beyond a couple of tuples, no netaddr objects."""
        client_key = _address_key(client)
        address_key = None if address is None else _address_key(address)
        if name is not None:
            name = _normalise_name(name)
        # Address-needing rules skipped because the address is not known yet, by action.
        skipped_allow = skipped_deny = False
        for rule in self._compiled:
            if not rule.matches_client(client_key, user, command):
                continue
            if rule.has_destination_criteria:
                if not rule.matches_name_and_port(name, port):
                    continue
                if rule.destinations is not None:
                    if address_key is None:
                        if rule.allow:
                            skipped_allow = True
                        else:
                            skipped_deny = True
                        continue
                    if not rule.destinations.contains(*address_key):
                        continue
            if skipped_deny if rule.allow else skipped_allow:
                return rule.provisional_decision
            return rule.decision
        if skipped_deny if self.default == "allow" else skipped_allow:
            return self._default_provisional
        return self._default_decision

    def can_allow_anything(self) -> bool:
        """False when the policy denies every request whatever it is (check-config warns)."""
        return self.default == "allow" or any(rule.allow for rule in self._compiled)

    def may_allow(
        self, *, client: IPv4Address | IPv6Address, user: str | None, command: Command
    ) -> bool:
        """Whether some destination could be allowed for this client, user and command.

        A cheap pre-check before any DNS work (and the check for UDP ASSOCIATE itself,
        whose destinations arrive later, per datagram). False means :meth:`check` denies
        every destination.
        """
        client_key = _address_key(client)
        for rule in self._compiled:
            if not rule.matches_client(client_key, user, command):
                continue
            if rule.allow:
                return True
            if not rule.has_destination_criteria:
                return False  # denies every destination; later rules are never reached
        return self.default == "allow"

    def __repr__(self) -> str:
        return f"Policy({len(self.rules)} rules, default={self.default!r})"


# --- config parsing -------------------------------------------------------------------


def _parse_action(value: object, key: str) -> Action:
    if isinstance(value, str) and value.lower() in _ACTIONS:
        return "allow" if value.lower() == "allow" else "deny"
    raise PolicyError(key, f"must be 'allow' or 'deny', not {value!r}")


def _parse_rule(data: object, key: str) -> Rule:
    if not isinstance(data, Mapping):
        raise PolicyError(key, "a rule must be a mapping")
    check_keys(data, _RULE_KEYS, key, PolicyError)
    if "action" not in data:
        raise PolicyError(f"{key}.action", "missing; every rule needs 'allow' or 'deny'")
    action = _parse_action(data["action"], f"{key}.action")

    def items(field: str) -> list[object] | None:
        if field not in data or data[field] is None:
            return None
        value = data[field]
        if not isinstance(value, list):
            raise PolicyError(f"{key}.{field}", "must be a list")
        if not value:
            raise PolicyError(f"{key}.{field}", "must not be empty; leave it out to match any")
        return value

    clients = items("clients")
    users = items("users")
    commands = items("commands")
    destinations = items("destinations")
    domains = items("domains")
    ports = items("ports")
    comment = data.get("comment", "")
    if comment is None:
        comment = ""
    if not isinstance(comment, str):
        raise PolicyError(f"{key}.comment", "must be a string")
    return Rule(
        action=action,
        clients=None if clients is None else _parse_networks(clients, f"{key}.clients"),
        users=None if users is None else _parse_users(users, f"{key}.users"),
        commands=None if commands is None else _parse_commands(commands, f"{key}.commands"),
        destinations=(
            None if destinations is None else _parse_networks(destinations, f"{key}.destinations")
        ),
        domains=None if domains is None else _parse_domains(domains, f"{key}.domains"),
        ports=None if ports is None else _parse_ports(ports, f"{key}.ports"),
        comment=comment,
    )


def _parse_networks(values: Sequence[object], key: str) -> IPSet:
    networks: list[IPNetwork] = []
    for i, value in enumerate(values):
        item_key = f"{key}[{i}]"
        if not isinstance(value, str):
            raise PolicyError(item_key, f"must be an address or CIDR string, not {value!r}")
        try:
            network = IPNetwork(value.strip())
        except (AddrFormatError, ValueError, TypeError):
            raise PolicyError(item_key, f"not an IP address or CIDR: {value!r}") from None
        if network.ip != network.network:
            raise PolicyError(
                item_key, f"{value!r} has host bits set; did you mean {network.cidr}?"
            )
        networks.append(network)
    return IPSet(networks)


def _parse_users(values: Sequence[object], key: str) -> frozenset[str]:
    users: set[str] = set()
    for i, value in enumerate(values):
        item_key = f"{key}[{i}]"
        if not isinstance(value, str):
            raise PolicyError(item_key, f"must be a string (quote it in YAML), not {value!r}")
        if value == "*":
            raise PolicyError(item_key, "'*' is not a wildcard; leave 'users' out to match any")
        if not 1 <= len(value.encode("utf-8")) <= _MAX_NAME_OCTETS:
            raise PolicyError(item_key, "a user name is 1..255 octets (RFC 1929)")
        users.add(value)
    return frozenset(users)


def _parse_commands(values: Sequence[object], key: str) -> frozenset[Command]:
    commands: set[Command] = set()
    for i, value in enumerate(values):
        if not isinstance(value, str) or value.lower() not in _COMMANDS_BY_NAME:
            expected = ", ".join(_COMMANDS_BY_NAME)
            raise PolicyError(
                f"{key}[{i}]", f"unknown command {value!r}; expected one of {expected}"
            )
        commands.add(_COMMANDS_BY_NAME[value.lower()])
    return frozenset(commands)


def _parse_domains(values: Sequence[object], key: str) -> tuple[str, ...]:
    patterns: list[str] = []
    for i, value in enumerate(values):
        item_key = f"{key}[{i}]"
        if not isinstance(value, str):
            raise PolicyError(item_key, f"must be a domain name string, not {value!r}")
        pattern = _normalise_name(value.strip())
        labels = pattern[1:] if pattern.startswith(".") else pattern
        if "*" in pattern:
            raise PolicyError(
                item_key, "no wildcards; '.example.test' matches names below example.test"
            )
        if (
            not labels
            or len(labels.encode("utf-8")) > _MAX_NAME_OCTETS
            or any(not label or label != label.strip() for label in labels.split("."))
            or any(ch.isspace() for ch in labels)
        ):
            raise PolicyError(item_key, f"not a domain name: {value!r}")
        patterns.append(pattern)
    return tuple(patterns)


def _parse_ports(values: Sequence[object], key: str) -> PortRanges:
    ranges: list[tuple[int, int]] = []
    for i, value in enumerate(values):
        item_key = f"{key}[{i}]"
        first, last = _parse_port_range(value, item_key)
        ranges.append((first, last))
    starts, ends = _merge(ranges)
    return tuple(zip(starts, ends, strict=True))


def _parse_port_range(value: object, key: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise PolicyError(key, f"not a port: {value!r}")
    if isinstance(value, int):
        first = last = value
    elif isinstance(value, str):
        low, dash, high = value.partition("-")
        try:
            first = _port_number(low)
            last = _port_number(high) if dash else first
        except ValueError:
            raise PolicyError(key, f"not a port or 'FIRST-LAST' range: {value!r}") from None
    else:
        raise PolicyError(key, f"not a port: {value!r}")
    if not (0 <= first <= 65535 and 0 <= last <= 65535):
        raise PolicyError(key, f"port out of range 0..65535: {value!r}")
    if first > last:
        raise PolicyError(key, f"empty port range (first > last): {value!r}")
    return first, last


def _port_number(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or not text.isascii():
        raise ValueError(text)
    return int(text)
