"""In-memory stand-ins for what request handlers use: no sockets, no DNS, no clock."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from addrmap import AddressTable
from translator.config import config_from_mapping
from translator.gateway.context import RequestContext, Services
from translator.idtable import LocalIds
from translator.net.addresses import IPAddress
from translator.net.interfaces import NoInterface
from translator.net.resolver import ResolveError, ResolveReason
from translator.ratelog import RateLimitedLog
from translator.relay.listeners import MultiRegistry
from translator.relay.multicast import MulticastHub

# Lab-style documentation ranges: 203.0.113.0/24 is the one the policy denies.
POLICY: dict[str, Any] = {
    "default": "deny",
    "rules": [
        {"action": "deny", "destinations": ["203.0.113.0/24"], "comment": "test deny"},
        {"action": "deny", "ports": [25], "comment": "no mail"},
        {
            "action": "allow",
            "clients": ["192.0.2.0/24", "2001:db8:c::/64"],
            "destinations": ["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32", "239.0.0.0/8"],
        },
    ],
}
NAMES: dict[str, list[IPAddress]] = {
    "v4.example.test": [IPv4Address("198.51.100.4")],
    "v6.example.test": [IPv6Address("2001:db8:6::6")],
    "dual.example.test": [IPv4Address("198.51.100.46"), IPv6Address("2001:db8:46::46")],
    "half.example.test": [IPv4Address("203.0.113.9"), IPv6Address("2001:db8:9::9")],
    "denied.example.test": [IPv4Address("203.0.113.5")],
    "group.example.test": [IPv4Address("239.1.2.3")],
}
PTR: dict[IPAddress, str] = {IPv6Address("2001:db8:6::6"): "v6.example.test."}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeResolver:
    """Answers from fixed tables and records every question."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(self, name: str) -> list[IPAddress]:
        self.asked.append(name)
        try:
            return list(NAMES[name])
        except KeyError:
            raise ResolveError(name, ResolveReason.NXDOMAIN) from None

    async def resolve_family(self, name: str, family: int) -> list[IPAddress]:
        version = 6 if family == socket.AF_INET6 else 4
        found = [a for a in await self.resolve(name) if a.version == version]
        if not found:
            raise ResolveError(name, ResolveReason.NODATA)
        return found

    async def reverse(self, address: IPAddress) -> str:
        self.asked.append(f"PTR {address}")
        try:
            return PTR[address]
        except KeyError:
            raise ResolveError(str(address), ResolveReason.NXDOMAIN) from None


class FakeSocket:
    """A connected socket as far as a handler looks: its local address, and close()."""

    def __init__(self, local: tuple[str, int]) -> None:
        self.local = local
        self.closed = False

    def getsockname(self) -> tuple[str, int]:
        return self.local

    def close(self) -> None:
        self.closed = True


class FakeConnector:
    """Records what the handler asked to connect to; answers with a FakeSocket or fails."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[IPAddress], int]] = []
        self.fail_with: OSError | None = None
        self.sockets: list[FakeSocket] = []

    async def __call__(self, addresses: Sequence[IPAddress], port: int) -> socket.socket:
        self.calls.append((list(addresses), port))
        if self.fail_with is not None:
            raise self.fail_with
        first = addresses[0]
        local = ("2001:db8::1", 50006) if first.version == 6 else ("198.51.100.1", 50004)
        sock = FakeSocket(local)
        self.sockets.append(sock)
        return sock  # type: ignore[return-value]


class NoInterfaces:
    """An interface watcher that knows no interface (multicast has nowhere to go)."""

    def multicast_interface(self, family: int, name: str | None) -> Any:
        raise NoInterface("no interfaces in this test")


async def refuse_password(user: str, password: str) -> bool:
    return False


def make_services(**config: Any) -> tuple[Services, FakeConnector, FakeResolver, FakeClock]:
    clock = FakeClock()
    connector = FakeConnector()
    resolver = FakeResolver()
    services = Services(
        config=config_from_mapping({"policy": POLICY, **config}),
        ids=LocalIds(AddressTable(clock=clock)),
        resolver=resolver,  # type: ignore[arg-type]
        clock=clock,
        connect=connector,
        verify_password=refuse_password,
        multi=MultiRegistry(),
        multicast=MulticastHub(NoInterfaces()),  # type: ignore[arg-type]
        udp_drop_log=RateLimitedLog(clock=clock),
    )
    return services, connector, resolver, clock


def make_ctx(
    services: Services, client: str = "192.0.2.7", facing: str = "192.0.2.1"
) -> RequestContext:
    return RequestContext(services, ip_address(client), 40000, ip_address(facing))


def refused(code: int) -> OSError:
    return OSError(code, errno.errorcode[code])
