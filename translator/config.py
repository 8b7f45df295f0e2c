"""Configuration: YAML in, validated frozen dataclasses out.

Every error names the offending key path (``resolver.timeout``) so ``socks64 check-config``
can point at it. Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import pwd
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .gss.settings import GssapiConfig, parse_gssapi
from .keys import check_keys
from .policy import Policy, PolicyError
from .transparent.settings import TransparentConfig, parse_transparent

DEFAULT_CONFIG_NAME = "socks64.yaml"


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str, key: str = "listen") -> Endpoint:
    """``HOST:PORT`` with an IP literal host; IPv6 as ``[::1]:1080``."""
    text = str(text).strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(key, f"{text!r} is not [IPv6]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(key, f"{text!r} is not HOST:PORT (IPv6 goes in brackets)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(key, f"{host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(key, f"port {port_text!r} is not 0..65535")
    return Endpoint(address.compressed, int(port_text))


AUTH_METHODS = ("none", "username", "gssapi")  # RFC 1928 X'00', RFC 1929 X'02', RFC 1961 X'01'


@dataclass(frozen=True, slots=True)
class AuthConfig:
    methods: tuple[str, ...] = ("none",)
    users_file: str | None = None
    gssapi: GssapiConfig = field(default_factory=GssapiConfig)


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    nameservers: tuple[str, ...] = ()
    timeout: float = 3.0
    tries: int = 2
    cache_size: int = 4096
    hosts_file: str | None = "/etc/hosts"
    prefer: str = "ipv6"
    happy_eyeballs_delay: float = 0.25

    @property
    def prefer_family(self) -> int:
        return socket.AF_INET6 if self.prefer == "ipv6" else socket.AF_INET


@dataclass(frozen=True, slots=True)
class Timeouts:
    handshake: float = 10.0
    connect: float = 10.0
    idle: float = 600.0
    bind_accept: float = 120.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_clients: int = 4096
    max_requests_per_connection: int = 64
    per_client: int = 2048  # concurrent connections from one client address
    per_client_handshake: int = 64  # of those, still before their first request


@dataclass(frozen=True, slots=True)
class AddrmapConfig:
    ttl: float = 600.0
    quarantine: float = 3600.0
    per_owner: int = 4096
    capacity: int = 1_000_000
    backend: str = "memory"  # or redis://HOST:PORT/DB (the table shared by several gateways)
    state_file: str | None = None  # memory backend: IDs and quarantine survive a restart

    @property
    def redis_url(self) -> str | None:
        return None if self.backend == "memory" else self.backend


@dataclass(frozen=True, slots=True)
class UdpConfig:
    idle: float = 300.0
    max_datagram_rate: int = 0  # per association, datagrams/s in either direction; 0: no bound
    max_buffered_bytes: int = 262144  # fragments + datagrams waiting for DNS, per association
    fragment_timeout: float = 5.0
    restrict_to_announced: bool = False
    multicast_interface_v4: str | None = None  # from multicast_interface: NAME or {ipv4:, ipv6:}
    multicast_interface_v6: str | None = None
    multicast_hops: int = 1
    max_peers_per_client: int = 8192  # peers remembered across one client's associations
    max_peers_total: int = 131072  # ... and across the whole gateway
    announce_v4: str | None = None  # BND.ADDR of UDP ASSOCIATE replies (NAT, virtual address)
    announce_v6: str | None = None


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    interface: str | None = None  # SO_BINDTODEVICE for outbound connections


@dataclass(frozen=True, slots=True)
class BindConfig:
    address_v4: str | None = None
    address_v6: str | None = None
    announce_v4: str | None = None  # BND.ADDR written in BIND replies instead of the local one
    announce_v6: str | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Endpoint | None = None  # Prometheus text at http://HOST:PORT/metrics; off when None


#: Used when a config has no ``policy`` section: the documented default, loopback clients.
DEFAULT_POLICY: Mapping[str, Any] = {
    "default": "deny",
    "rules": [
        {
            "action": "allow",
            "clients": ["127.0.0.0/8", "::1/128"],
            "comment": "loopback clients may use every command",
        }
    ],
}


@dataclass(frozen=True)
class Config:
    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 1080), Endpoint("::1", 1080))
    auth: AuthConfig = field(default_factory=AuthConfig)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    addrmap: AddrmapConfig = field(default_factory=AddrmapConfig)
    bind: BindConfig = field(default_factory=BindConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    udp: UdpConfig = field(default_factory=UdpConfig)
    policy: Policy = field(default_factory=lambda: Policy.from_config(DEFAULT_POLICY))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    transparent: TransparentConfig = field(default_factory=TransparentConfig)
    shutdown_grace: float = 5.0  # SIGTERM: running sessions get this long to finish
    user: str | None = None  # drop to this user (and group) once everything is open
    group: str | None = None
    source: str = "<built-in>"
    workers: int | str = 1  # processes serving the listeners; "auto": one per CPU


# --- validation helpers ---------------------------------------------------------------


def _section(data: Mapping[str, Any], name: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(name, "must be a mapping")
    check_keys(value, allowed, name, ConfigError)
    return value


def _number(
    section: Mapping[str, Any],
    key: str,
    path: str,
    default: float,
    *,
    minimum: int = 0,
    integer: bool = False,
) -> Any:
    """A positive float, or with ``integer`` a whole number of at least ``minimum``."""
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(path, f"must be a number, not {value!r}")
    if integer:
        if not isinstance(value, int) or value < minimum:
            raise ConfigError(path, f"must be a whole number >= {minimum}, not {value!r}")
        return value
    if value <= 0:
        raise ConfigError(path, f"must be greater than 0, not {value!r}")
    return float(value)


def _optional_str(section: Mapping[str, Any], key: str, path: str) -> str | None:
    value = section.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(path, f"must be a string or null, not {value!r}")
    return value


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(cls.__dataclass_fields__)  # type: ignore[attr-defined]


def config_from_mapping(data: Mapping[str, Any] | None, source: str = "<mapping>") -> Config:
    """Validate a parsed YAML document."""
    data = data or {}
    if not isinstance(data, Mapping):
        raise ConfigError("", "the configuration must be a YAML mapping")
    known = (
        "listen",
        "auth",
        "resolver",
        "timeouts",
        "limits",
        "addrmap",
        "bind",
        "outbound",
        "udp",
        "policy",
        "metrics",
        "transparent",
        "shutdown_grace",
        "user",
        "group",
        "workers",
    )
    check_keys(data, known, "", ConfigError)

    listen_raw = data.get("listen", ["127.0.0.1:1080", "[::1]:1080"])
    if isinstance(listen_raw, str) or not isinstance(listen_raw, Sequence) or not listen_raw:
        raise ConfigError("listen", "must be a non-empty list of HOST:PORT")
    listen = tuple(parse_endpoint(item, f"listen[{i}]") for i, item in enumerate(listen_raw))

    auth_raw = _section(data, "auth", _fields(AuthConfig))
    methods = auth_raw.get("methods", ["none"])
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise ConfigError("auth.methods", "must be a non-empty list")
    for i, method in enumerate(methods):
        if method not in AUTH_METHODS:
            raise ConfigError(
                f"auth.methods[{i}]", f"unknown method {method!r} ({', '.join(AUTH_METHODS)})"
            )
    users_file = _optional_str(auth_raw, "users_file", "auth.users_file")
    if "username" in methods and not users_file:
        raise ConfigError("auth.users_file", "required when auth.methods has 'username'")
    gssapi = parse_gssapi(auth_raw.get("gssapi"), ConfigError)
    if "gssapi" in methods and not gssapi.keytab:
        raise ConfigError("auth.gssapi.keytab", "required when auth.methods has 'gssapi'")
    auth = AuthConfig(tuple(methods), users_file, gssapi)

    res_raw = _section(data, "resolver", _fields(ResolverConfig))
    nameservers = res_raw.get("nameservers") or []
    if isinstance(nameservers, str) or not isinstance(nameservers, Sequence):
        raise ConfigError("resolver.nameservers", "must be a list")
    for i, server in enumerate(nameservers):
        _check_nameserver(str(server), f"resolver.nameservers[{i}]")
    prefer = res_raw.get("prefer", "ipv6")
    if prefer not in ("ipv4", "ipv6"):
        raise ConfigError("resolver.prefer", f"must be ipv4 or ipv6, not {prefer!r}")
    resolver = ResolverConfig(
        nameservers=tuple(str(s) for s in nameservers),
        timeout=_number(res_raw, "timeout", "resolver.timeout", 3.0),
        tries=_number(res_raw, "tries", "resolver.tries", 2, minimum=1, integer=True),
        cache_size=_number(
            res_raw, "cache_size", "resolver.cache_size", 4096, minimum=0, integer=True
        ),
        hosts_file=_optional_str(res_raw, "hosts_file", "resolver.hosts_file")
        if "hosts_file" in res_raw
        else "/etc/hosts",
        prefer=prefer,
        happy_eyeballs_delay=_number(
            res_raw, "happy_eyeballs_delay", "resolver.happy_eyeballs_delay", 0.25
        ),
    )

    t_raw = _section(data, "timeouts", _fields(Timeouts))
    timeouts = Timeouts(
        **{
            name: _number(t_raw, name, f"timeouts.{name}", getattr(Timeouts(), name))
            for name in _fields(Timeouts)
        }
    )
    l_raw = _section(data, "limits", _fields(Limits))
    limits = Limits(
        **{
            name: _number(
                l_raw, name, f"limits.{name}", getattr(Limits(), name), minimum=1, integer=True
            )
            for name in _fields(Limits)
        }
    )
    a_raw = _section(data, "addrmap", _fields(AddrmapConfig))
    addrmap = AddrmapConfig(
        ttl=_number(a_raw, "ttl", "addrmap.ttl", 600.0),
        quarantine=_number(a_raw, "quarantine", "addrmap.quarantine", 3600.0),
        per_owner=_number(a_raw, "per_owner", "addrmap.per_owner", 4096, minimum=1, integer=True),
        capacity=_number(a_raw, "capacity", "addrmap.capacity", 1_000_000, minimum=1, integer=True),
        backend=_backend(a_raw.get("backend", "memory")),
        state_file=_optional_str(a_raw, "state_file", "addrmap.state_file"),
    )
    b_raw = _section(data, "bind", _fields(BindConfig))
    bind = BindConfig(
        *(_address(b_raw, f"{key}_v{v}", v, "bind") for key in _BIND_KEYS for v in (4, 6))
    )
    o_raw = _section(data, "outbound", _fields(OutboundConfig))
    interface = _optional_str(o_raw, "interface", "outbound.interface")
    if interface is not None and not 0 < len(interface.encode()) < 16:
        raise ConfigError("outbound.interface", f"{interface!r} is not an interface name")
    outbound = OutboundConfig(interface)
    udp_keys = [k for k in _fields(UdpConfig) if not k.startswith("multicast_interface_")]
    udp = _udp_config(_section(data, "udp", [*udp_keys, "multicast_interface"]))
    policy_raw = data.get("policy", DEFAULT_POLICY)
    try:
        policy = Policy.from_config(policy_raw or {}, key="policy")
    except PolicyError as exc:
        raise ConfigError(exc.key, str(exc)) from None
    m_raw = _section(data, "metrics", _fields(MetricsConfig))
    metrics_listen = m_raw.get("listen")
    metrics = MetricsConfig(
        None if metrics_listen is None else parse_endpoint(metrics_listen, "metrics.listen")
    )
    t_raw = data.get("transparent") or {}
    if not isinstance(t_raw, Mapping):
        raise ConfigError("transparent", "must be a mapping")
    transparent = parse_transparent(t_raw, _host_port, ConfigError)
    grace = data.get("shutdown_grace", 5.0)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace < math.inf:
        raise ConfigError("shutdown_grace", f"must be a number of seconds >= 0, not {grace!r}")
    user = _account(data, "user", "pw")
    group = _account(data, "group", "gr")
    workers = _workers(data.get("workers", 1))
    if transparent.enabled and (workers != 1 or addrmap.backend != "memory"):
        raise ConfigError(
            "transparent",
            "the transparent front runs in a single process with the memory backend "
            "(workers: 1, addrmap.backend: memory)",
        )
    return Config(
        listen,
        auth,
        resolver,
        timeouts,
        limits,
        addrmap,
        bind,
        outbound,
        udp,
        policy,
        metrics,
        transparent,
        float(grace),
        user,
        group,
        source=source,
        workers=workers,
    )


def _workers(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ConfigError("workers", f"must be 1..256 processes or auto, not {value!r}")
    return value


def worker_count(config: Config) -> int:
    """How many worker processes ``config`` asks for (``auto``: the CPUs this process may use)."""
    if config.workers == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return int(config.workers)


def _backend(value: Any) -> str:
    """``memory`` or a Redis URL: redis://[:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS)."""
    if value == "memory":
        return "memory"
    where = "addrmap.backend"
    if not isinstance(value, str):
        raise ConfigError(where, f"must be memory or redis://HOST:PORT/DB, not {value!r}")
    url = urllib.parse.urlsplit(value)
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        raise ConfigError(where, f"must be memory or redis://HOST:PORT/DB, not {value!r}")
    try:
        url.port  # noqa: B018 - raises ValueError on a bad port
        database = url.path.strip("/")
        if database and int(database) < 0:
            raise ValueError(database)
    except ValueError:
        raise ConfigError(where, f"bad port or database number in {value!r}") from None
    return value


def _account(data: Mapping[str, Any], key: str, database: str) -> str | None:
    """A user or group that exists on this machine, by name or number."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(key, f"must be a name or a number, not {value!r}")
    text = str(value)
    try:
        if database == "pw":
            pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
        else:
            grp.getgrgid(int(text)) if text.isdigit() else grp.getgrnam(text)
    except (KeyError, ValueError, OverflowError):
        raise ConfigError(key, f"no {key} {text!r} on this machine") from None
    return text


def _udp_config(raw: Mapping[str, Any]) -> UdpConfig:
    default = UdpConfig()
    restrict = raw.get("restrict_to_announced", False)
    if not isinstance(restrict, bool):
        raise ConfigError("udp.restrict_to_announced", f"must be true or false, not {restrict!r}")
    interface_v4, interface_v6 = _multicast_interfaces(raw.get("multicast_interface"))
    hops = _number(raw, "multicast_hops", "udp.multicast_hops", 1, minimum=1, integer=True)
    if hops > 255:
        raise ConfigError("udp.multicast_hops", f"must be 1..255, not {hops}")
    rate = _number(
        raw,
        "max_datagram_rate",
        "udp.max_datagram_rate",
        default.max_datagram_rate,
        minimum=0,
        integer=True,
    )
    per_client = _number(
        raw,
        "max_peers_per_client",
        "udp.max_peers_per_client",
        default.max_peers_per_client,
        minimum=1,
        integer=True,
    )
    total = _number(
        raw,
        "max_peers_total",
        "udp.max_peers_total",
        default.max_peers_total,
        minimum=1,
        integer=True,
    )
    buffered = _number(
        raw,
        "max_buffered_bytes",
        "udp.max_buffered_bytes",
        default.max_buffered_bytes,
        minimum=1024,
        integer=True,
    )
    fragment_timeout = _number(raw, "fragment_timeout", "udp.fragment_timeout", 5.0)
    if fragment_timeout < 5.0:
        raise ConfigError("udp.fragment_timeout", "RFC 1928 wants at least 5 seconds")
    return UdpConfig(
        idle=_number(raw, "idle", "udp.idle", default.idle),
        max_datagram_rate=rate,
        max_buffered_bytes=buffered,
        fragment_timeout=fragment_timeout,
        restrict_to_announced=restrict,
        multicast_interface_v4=interface_v4,
        multicast_interface_v6=interface_v6,
        multicast_hops=hops,
        max_peers_per_client=per_client,
        max_peers_total=total,
        announce_v4=_address(raw, "announce_v4", 4, "udp"),
        announce_v6=_address(raw, "announce_v6", 6, "udp"),
    )


def _multicast_interfaces(value: Any) -> tuple[str | None, str | None]:
    """One interface name for both families, or ``{ipv4: NAME, ipv6: NAME}``."""
    key = "udp.multicast_interface"
    if value is None or isinstance(value, str):
        return value, value
    if not isinstance(value, Mapping):
        raise ConfigError(key, "must be an interface name or {ipv4: NAME, ipv6: NAME}")
    check_keys(value, ("ipv4", "ipv6"), key, ConfigError)
    names = (value.get("ipv4"), value.get("ipv6"))
    for family, name in zip(("ipv4", "ipv6"), names, strict=True):
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{key}.{family}", f"must be an interface name, not {name!r}")
    return names


def _check_nameserver(text: str, key: str) -> None:
    host = text
    if text.startswith("["):
        host = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise ConfigError(key, f"bad port in {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(key, f"{text!r} is not IP, IP:PORT or [IPv6]:PORT") from None


def _host_port(text: str, key: str) -> tuple[str, int]:
    endpoint = parse_endpoint(text, key)
    return endpoint.host, endpoint.port


_BIND_KEYS = ("address", "announce")


def _address(section: Mapping[str, Any], key: str, version: int, name: str) -> str | None:
    path = f"{name}.{key}"
    value = _optional_str(section, key, path)
    if value is None:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(path, f"{value!r} is not an IP address") from None
    if address.version != version:
        raise ConfigError(path, f"{value!r} is not IPv{version}")
    return address.compressed


def load_config(path: str | Path | None = None) -> Config:
    """Load ``path``, or the embedded default config when None."""
    if path is None:
        text = default_config_text()
        source = "<default>"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{source}: not valid YAML: {exc}") from None
    return config_from_mapping(data, source)


def default_config_text() -> str:
    """The shipped default config: config/socks64.yaml in a checkout, else the package copy."""
    checkout = Path(__file__).resolve().parent.parent / "config" / DEFAULT_CONFIG_NAME
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    return resources.files("translator").joinpath(DEFAULT_CONFIG_NAME).read_text("utf-8")
