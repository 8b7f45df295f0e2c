"""What a request handler is handed instead of the session or the gateway.

``Services`` is the gateway's shared state a request may use (one per gateway);
``RequestContext`` adds who is asking (one per client connection). Handlers take a
context and the decoded request, and return an outcome (``outcomes``) or raise one of
``replies.REFUSALS``; they never read or write the client socket.

The steps every request kind shares live here once: turning a request's address into a
table target, checking the policy, resolving and pinning a destination in one call, and
the BND.ADDR of a success reply (+AA: an ID; otherwise the client's family, profile 6).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address

from addrmap import FakeIpPool, Owner, Target
from translator import policy as pol
from translator.config import Config
from translator.gss.acceptor import Acceptor
from translator.gss.protection import MessageProtection
from translator.idtable import Ids
from translator.metrics import Metrics
from translator.net.addresses import IPAddress, family_of, unmapped
from translator.net.happy_eyeballs import order_addresses
from translator.net.resolver import Resolver
from translator.ratelog import RateLimitedLog
from translator.relay.channel import Channel
from translator.relay.listeners import MultiRegistry
from translator.relay.multicast import MulticastHub
from translator.relay.peercache import PeerBudgets
from translator.relay.udp import UdpAssociation
from translator.wire import FLAG_REAL_FAMILY, Address, AddressId, Rep, Request

from .accesslog import TrafficMeter, UdpTotals
from .replies import GatewayError

#: Connect to the first of these addresses that answers on the port (Happy Eyeballs).
Connector = Callable[[Sequence[IPAddress], int], Awaitable[socket.socket]]
PasswordCheck = Callable[[str, str], Awaitable[bool]]


@dataclass(slots=True)
class Services:
    """The gateway's shared state, as request handlers and sessions see it."""

    config: Config
    ids: Ids
    resolver: Resolver
    clock: Callable[[], float]
    connect: Connector
    verify_password: PasswordCheck
    multi: MultiRegistry
    multicast: MulticastHub
    udp_drop_log: RateLimitedLog
    #: live UDP associations and the client connection each ends with
    udp_associations: dict[UdpAssociation, Channel] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    udp_totals: UdpTotals = field(default_factory=UdpTotals)
    traffic: TrafficMeter = field(default_factory=TrafficMeter)
    peer_budgets: PeerBudgets = field(default_factory=PeerBudgets)
    #: the transparent front's fake-IP pool: a pool address in a request names its name
    pool: FakeIpPool | None = None
    #: GSS-API acceptor credentials, when auth.methods offers gssapi
    gssapi: Acceptor | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """A request's destination after lookup, resolution and the policy."""

    target: Target  # what the client named (an ID looked up to its target)
    addresses: list[IPAddress]  # those the policy lets this client reach
    realid: int | None  # the REALID the request named, pinned for the session


def _denied(reason: str) -> GatewayError:
    return GatewayError(Rep.NOT_ALLOWED, f"denied by policy ({reason})")


def owner_for(client: IPAddress, user: str | None) -> Owner:
    return Owner(client.compressed, user)


def as_target(address: Address) -> Target:
    """A literal or a name as the address table stores it (IDs are looked up first)."""
    if isinstance(address, AddressId):
        raise TypeError("an ADDRESS ID is not a target; look it up first")
    if isinstance(address, str):
        try:  # an IP literal sent as ATYP X'03' is that literal, not a name to look up
            return unmapped(ip_address(address))
        except ValueError:
            return address.lower()
    return address


def is_unspecified(address: Address) -> bool:
    if isinstance(address, AddressId):
        return address.unspecified
    if isinstance(address, str):
        return False
    return address.is_unspecified


def announced(local: IPAddress, announce_v4: str | None, announce_v6: str | None) -> IPAddress:
    """The address a reply names for a local one: the configured announce address of its
    family when the gateway is reached through a NAT or a virtual address."""
    configured = announce_v6 if local.version == 6 else announce_v4
    return local if configured is None else ip_address(configured)


def in_client_family(real: IPAddress, client_facing: IPAddress, *, real_family: bool) -> IPAddress:
    """Profile 6: an address of the other family is replaced by our client-facing one."""
    if real_family or family_of(real) == family_of(client_facing):
        return real
    return client_facing


class RequestContext:
    """One client, as its requests see it: identity, pins, and the shared services."""

    __slots__ = (
        "_facing",
        "_facing_of",
        "_facing_version",
        "client_host",
        "client_ip",
        "client_port",
        "pins",
        "protection",
        "services",
        "user",
    )

    def __init__(
        self,
        services: Services,
        client_ip: IPAddress,
        client_port: int,
        facing_ip: IPAddress | None = None,
        *,
        facing_of: Callable[[], IPAddress] | None = None,
    ) -> None:
        """``facing_ip``, the gateway address the client reached, or ``facing_of`` to
        learn it when first needed (a getsockname most CONNECTs never need)."""
        if facing_ip is None and facing_of is None:
            raise TypeError("RequestContext needs facing_ip or facing_of")
        self.services = services
        self.client_ip = client_ip
        self.client_port = client_port
        self._facing = facing_ip
        self._facing_of = facing_of
        # Both ends of one connection are of one family (an IPv4-mapped pair unmaps to
        # IPv4 on both ends): the client's family is the facing one until it is known.
        self._facing_version = client_ip.version if facing_ip is None else facing_ip.version
        self.user: str | None = None
        #: RFC 1961 per-message protection agreed on this connection (None: none)
        self.protection: MessageProtection | None = None
        self.pins: list[int] = []
        #: ``str(client_ip)`` when the caller has it already (the peer's text): the label
        self.client_host: str | None = None

    @property
    def facing_ip(self) -> IPAddress:
        """The gateway address the client reached."""
        facing = self._facing
        if facing is None:
            assert self._facing_of is not None
            facing = self._facing = self._facing_of()
        return facing

    @property
    def label(self) -> str:
        """The client as logs name it; built only when something is logged."""
        host = self.client_host or str(self.client_ip)  # str(): ipaddress's __format__ is slow
        if self.client_ip.version == 6:
            return f"[{host}]:{self.client_port}"
        return f"{host}:{self.client_port}"

    def __str__(self) -> str:
        return self.label

    @property
    def owner(self) -> Owner:
        return owner_for(self.client_ip, self.user)

    @property
    def config(self) -> Config:
        return self.services.config

    @property
    def ids(self) -> Ids:
        return self.services.ids

    # -- IDs ------------------------------------------------------------------------------

    def pin(self, realid: int) -> None:
        """Keep an ID alive while this connection uses it (released by ``unpin_all``)."""
        if self.services.ids.pin(self.owner, realid):
            self.pins.append(realid)

    def unpin_all(self) -> None:
        if not self.pins:  # the usual case: no Owner to build
            return
        owner = self.owner
        for realid in self.pins:
            self.services.ids.unpin(owner, realid)
        self.pins.clear()

    async def target_of(self, address: Address) -> tuple[Target, int | None]:
        """A request's address as a table target, and the REALID when it was an ID."""
        if isinstance(address, AddressId):
            if address.unspecified:
                raise GatewayError(Rep.INVALID_ADDRESS, "the unspecified ADDRESS ID names nothing")
            target = await self.services.ids.lookup(self.owner, address.realid)
            if target is None:
                raise GatewayError(Rep.INVALID_ADDRESS, f"unknown or foreign {address}")
            return target, address.realid
        target = as_target(address)
        pool = self.services.pool
        if pool is not None and target in pool:
            return self._pool_name(pool, target), None
        return target, None

    def _outside_pool(self, name: str, addresses: list[IPAddress]) -> list[IPAddress]:
        """A name that resolves into the pool (the upstream resolver is DNS46 itself, or
        hands out the same range) would send the gateway into its own interception."""
        pool = self.services.pool
        if pool is None:
            return addresses
        outside = [a for a in addresses if a not in pool]
        if not outside:
            raise GatewayError(
                Rep.HOST_UNREACHABLE, f"{name} resolves into the pool {pool.network} (a DNS loop?)"
            )
        return outside

    @staticmethod
    def _pool_name(pool: FakeIpPool, address: Target) -> str:
        """A pool address stands for the name it is bound to; it is never dialled itself
        (that would loop back into the interception, or leave the host)."""
        assert isinstance(address, IPv4Address)
        name = pool.name_of(address)
        if name is None:
            raise GatewayError(Rep.HOST_UNREACHABLE, f"pool address {address} is not bound")
        return name

    # -- policy ---------------------------------------------------------------------------

    def require(self, command: pol.Command) -> None:
        """Refuse early, before any DNS work, when no rule could allow ``command``."""
        if not self.config.policy.may_allow(client=self.client_ip, user=self.user, command=command):
            raise GatewayError(Rep.NOT_ALLOWED, f"no rule allows {command.value} for this client")

    def check(
        self,
        command: pol.Command,
        address: IPAddress,
        *,
        name: str | None = None,
        port: int | None = None,
    ) -> None:
        """REP X'02' unless the policy allows ``command`` toward ``address``."""
        decision = self._decide(command, address, name, port)
        if not decision.allowed:
            raise _denied(decision.reason)

    def allows(self, command: pol.Command, address: IPAddress) -> pol.Decision:
        return self._decide(command, address, None, None)

    def _decide(
        self, command: pol.Command, address: IPAddress, name: str | None, port: int | None
    ) -> pol.Decision:
        return self.config.policy.check(
            client=self.client_ip,
            user=self.user,
            command=command,
            address=address,
            name=name,
            port=port,
        )

    # -- destinations -----------------------------------------------------------------------

    def order(self, addresses: Sequence[IPAddress]) -> list[IPAddress]:
        """Happy Eyeballs order under the configured family preference."""
        return order_addresses(addresses, self.config.resolver.prefer_family)

    async def addresses_of(self, address: Address) -> list[IPAddress]:
        """Every address a request's address stands for, in Happy Eyeballs order."""
        target, _ = await self.target_of(address)
        if isinstance(target, str):
            return self.order(await self.services.resolver.resolve(target))
        return [target]

    async def destination(self, address: Address, port: int, command: pol.Command) -> Destination:
        """Look up, resolve and check a destination in one step; an ID it names is pinned.

        Names are checked together with each address they resolve to; REP X'02' when the
        policy allows none of them.
        """
        self.require(command)
        target, realid = await self.target_of(address)
        name: str | None = None
        candidates: list[IPAddress]
        if isinstance(target, str):
            name = target
            candidates = self._outside_pool(name, await self.services.resolver.resolve(name))
        else:
            candidates = [target]
        allowed: list[IPAddress] = []
        reason = ""
        for candidate in candidates:
            decision = self._decide(command, candidate, name, port)
            if decision.allowed:
                allowed.append(candidate)
            else:
                reason = decision.reason
        if not allowed:
            raise _denied(reason)
        if realid is not None:
            self.pin(realid)
        return Destination(target, allowed, realid)

    # -- replies --------------------------------------------------------------------------

    async def bound(
        self,
        request: Request,
        real: IPAddress,
        *,
        target: Target | None = None,
        realid: int | None = None,
    ) -> Address:
        """BND.ADDR of a success reply. With +AA: ``realid`` (already pinned by
        ``destination``), else a new ID for ``target`` (default ``real``) pinned for this
        connection; without: ``real`` in the client's family."""
        if request.command.with_aa:
            if realid is None:
                realid = await self.services.ids.associate(
                    self.owner, real if target is None else target
                )
                self.pin(realid)
            return AddressId(realid)
        if request.flag & FLAG_REAL_FAMILY or real.version == self._facing_version:
            return real  # in_client_family's answer, without asking for the facing address
        return in_client_family(real, self.facing_ip, real_family=False)

    @staticmethod
    def reply_flag(request: Request, honoured: int = 0) -> int:
        """FLAG bits echoed in a reply: only those the gateway understood and honoured."""
        return (request.flag & FLAG_REAL_FAMILY) | honoured
