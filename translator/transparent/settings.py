"""The ``transparent`` config section: DNS46, the fake-IP pool, interception.

Parsed here, next to what uses it, and embedded in :class:`translator.config.Config`.
Checks that need the running host (the pool overlapping a local address) happen when the
gateway starts, in :func:`pool_conflicts`; everything else is checked on parse.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from translator.keys import check_keys

DEFAULT_POOL = IPv4Network("198.18.0.0/15")
DEFAULT_STATE_FILE = "/var/lib/socks64/transparent.state"
SYNTHESIZE = ("missing-a", "always")
DENIED_ANSWERS = ("refused", "real")
_SHARED = IPv4Network("100.64.0.0/10")  # carrier-grade NAT space: real hosts live there
_MULTICAST = IPv4Network("224.0.0.0/4")
_FORBIDDEN = (
    (_SHARED, "the shared address space 100.64.0.0/10"),
    (_MULTICAST, "multicast"),
    (IPv4Network("127.0.0.0/8"), "loopback"),
    (IPv4Network("240.0.0.0/4"), "reserved space"),
    (IPv4Network("0.0.0.0/8"), "'this network'"),
)


@dataclass(frozen=True, slots=True)
class TransparentConfig:
    dns_listen: tuple[tuple[str, int], ...] = ()  # DNS46 on these (UDP and TCP)
    pool: IPv4Network = DEFAULT_POOL
    synthesize: str = "missing-a"  # or "always": every name through the gateway
    denied_answer: str = "refused"  # a client the policy keeps off the path: or "real"
    interfaces: tuple[str, ...] = ()  # client-facing interfaces to intercept on
    state_file: str | None = DEFAULT_STATE_FILE  # bindings across restarts; None: none kept
    fwmark: int = 0x5364  # marks intercepted packets for the policy-routing rule
    route_table: int = 164  # holds the local route of the pool
    answer_ttl: int = 60  # the longest TTL a synthesized answer carries

    @property
    def enabled(self) -> bool:
        """The pool exists when DNS46 answers or flows are intercepted."""
        return bool(self.dns_listen or self.interfaces)


def parse_transparent(
    raw: Mapping[str, Any],
    endpoint: Callable[[str, str], tuple[str, int]],
    error: Callable[[str, str], Exception],
) -> TransparentConfig:
    """Validate the section; ``endpoint`` parses HOST:PORT, ``error`` builds the error."""
    check_keys(raw, TransparentConfig.__dataclass_fields__, "transparent", error)
    default = TransparentConfig()
    listen = _list(raw, "dns_listen", error)
    dns_listen = tuple(
        endpoint(str(item), f"transparent.dns_listen[{i}]") for i, item in enumerate(listen)
    )
    pool = _pool(raw.get("pool", str(DEFAULT_POOL)), error)
    synthesize = _choice(raw, "synthesize", SYNTHESIZE, default.synthesize, error)
    denied = _choice(raw, "denied_answer", DENIED_ANSWERS, default.denied_answer, error)
    interfaces = tuple(_list(raw, "interfaces", error))
    for i, name in enumerate(interfaces):
        if not isinstance(name, str) or not 0 < len(name.encode()) < 16 or "/" in name:
            raise error(f"transparent.interfaces[{i}]", f"{name!r} is not an interface name")
    state_file = raw.get("state_file", default.state_file)
    if state_file is not None and (not isinstance(state_file, str) or not state_file):
        raise error("transparent.state_file", f"must be a path or null, not {state_file!r}")
    return TransparentConfig(
        dns_listen=dns_listen,
        pool=pool,
        synthesize=synthesize,
        denied_answer=denied,
        interfaces=interfaces,
        state_file=state_file,
        fwmark=_whole(raw, "fwmark", default.fwmark, 1, 0xFFFFFFFF, error),
        route_table=_whole(raw, "route_table", default.route_table, 1, 0xFFFFFFFF, error),
        answer_ttl=_whole(raw, "answer_ttl", default.answer_ttl, 0, 86400, error),
    )


def pool_conflicts(pool: IPv4Network, local: Iterable[IPv4Network]) -> list[str]:
    """Local networks the pool overlaps: the gateway refuses to start with any."""
    return [str(network) for network in local if network.overlaps(pool)]


def _list(raw: Mapping[str, Any], key: str, error: Callable[[str, str], Exception]) -> list[Any]:
    value = raw.get(key) or []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise error(f"transparent.{key}", "must be a list")
    return list(value)


def _pool(value: object, error: Callable[[str, str], Exception]) -> IPv4Network:
    key = "transparent.pool"
    try:
        pool = ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        raise error(key, f"{value!r} is not a network: {exc}") from None
    if not isinstance(pool, IPv4Network):
        raise error(key, "must be an IPv4 network (it answers IPv4-only clients)")
    if not 8 <= pool.prefixlen <= 30:
        raise error(key, f"must be a /8 to a /30, not /{pool.prefixlen}")
    for forbidden, what in _FORBIDDEN:
        if pool.overlaps(forbidden):
            raise error(key, f"{pool} overlaps {what}")
    return pool


def _choice(
    raw: Mapping[str, Any],
    key: str,
    choices: Sequence[str],
    default: str,
    error: Callable[[str, str], Exception],
) -> str:
    value = raw.get(key, default)
    if value not in choices:
        raise error(f"transparent.{key}", f"must be one of {', '.join(choices)}, not {value!r}")
    return str(value)


def _whole(
    raw: Mapping[str, Any],
    key: str,
    default: int,
    low: int,
    high: int,
    error: Callable[[str, str], Exception],
) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(f"transparent.{key}", f"must be a whole number {low}..{high}, not {value!r}")
    return value
