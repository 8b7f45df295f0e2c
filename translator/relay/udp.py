"""One UDP association: the client's relay socket (or TCP tunnel), one outbound socket
per family, fragment reassembly, and the rules for writing sources back to the client.

Hot path: a datagram from the client costs one header length, one cache hit for the route
to its destination, and one sendto; a datagram from a peer costs one cache hit for the
header its source is framed with and one sendto. Everything else (names, IDs, first
contact with a peer) takes the slow path once and is cached.

The caches are bounded LRU maps (``peercache``) charged to the client's budget, shared by
all of its associations under a gateway-wide one (``udp.max_peers_per_client``,
``udp.max_peers_total``): a flood of datagrams to ever new peers evicts old entries instead
of growing the gateway, and an evicted peer just takes the slow path again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal, Protocol

from addrmap import AddrMapError
from translator import policy as pol
from translator.idtable import TableUnavailable
from translator.net.addresses import IPAddress, family_of, sockaddr_ip
from translator.net.resolver import ResolveError
from translator.wire import (
    Address,
    AddressId,
    RemoteProtocolError,
    UdpDatagram,
    decode_udp_datagram,
    encode_address_port,
    encode_tunnel_frame,
    udp_header_length,
)

from .fragments import Reassembler
from .peercache import PeerBudget, PeerCache

if TYPE_CHECKING:
    from addrmap import FakeIpPool, Owner
    from translator.config import UdpConfig
    from translator.idtable import Ids
    from translator.net.resolver import Resolver
    from translator.ratelog import RateLimitedLog

    from .channel import Channel
    from .multicast import Membership, MulticastHub

log = logging.getLogger("socks64.udp")

_MAX_NAMES = 256  # names resolved, and IDs pinned, per association
_MAX_UDP_PAYLOAD = 65507
Endpoint = tuple[IPAddress, int]
_Route = tuple[asyncio.DatagramTransport, tuple[str, int], int]  # transport, sockaddr, is IPv6


class _Not(Enum):
    CACHED = 0  # a cache miss where None is a value
    YET = 1  # a peer's ID the shared table has still to give (render_source)


def _route_key(named_as: Address, port: int) -> bytes:
    """The header of a datagram from the client to ``named_as``: its route's key."""
    return b"\x00\x00\x00" + encode_address_port(named_as, port)


@dataclass(slots=True)
class UdpStats:
    to_peers: int = 0
    to_client: int = 0
    # payload bytes and datagrams by the peer's family: index 0 IPv4, 1 IPv6
    bytes_up: list[int] = field(default_factory=lambda: [0, 0])
    bytes_down: list[int] = field(default_factory=lambda: [0, 0])
    datagrams_up: list[int] = field(default_factory=lambda: [0, 0])
    dropped: int = 0
    dropped_policy: int = 0
    dropped_foreign: int = 0
    dropped_malformed: int = 0
    dropped_rate: int = 0
    dropped_unrenderable: int = 0
    evictions: int = 0  # entries of this association's peer caches evicted to stay bounded


class _Bucket:
    """Token bucket: at most ``rate`` (> 0) datagrams per second, bursts of one second.
    A rate of 0 is no bound: no bucket at all (``_bucket``), nothing on the hot path."""

    __slots__ = ("clock", "last", "rate", "tokens")

    def __init__(self, rate: int, clock: Callable[[], float]) -> None:
        self.rate = float(rate)
        self.tokens = float(rate)
        self.clock = clock
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _bucket(rate: int, clock: Callable[[], float]) -> _Bucket | None:
    """The bucket for ``udp.max_datagram_rate``; None when it is 0, no bound."""
    return _Bucket(rate, clock) if rate > 0 else None


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, handler: Callable[[bytes, tuple[object, ...]], None]) -> None:
        self.handler = handler

    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        self.handler(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP socket error: %s", exc)


@dataclass(frozen=True, slots=True)
class UdpDeps:
    """What an association needs from the gateway, handed in: it never sees a session."""

    owner: Owner  # whose IDs it looks up and issues
    user: str | None
    client_ip: IPAddress
    facing_ip: IPAddress  # the gateway address the client reached: the relay's address
    label: str  # the client, as logs name it
    settings: UdpConfig
    policy: pol.Policy
    ids: Ids
    resolver: Resolver
    order: Callable[[Sequence[IPAddress]], list[IPAddress]]  # Happy Eyeballs order
    multicast: MulticastHub
    clock: Callable[[], float]
    drop_log: RateLimitedLog
    #: the client's budget of remembered peers, shared with its other associations; None:
    #: one of the association's own, of udp.max_peers_per_client
    peers: PeerBudget | None = None
    #: the transparent front's pool: its addresses name names (see client_datagram)
    pool: FakeIpPool | None = None
    #: RFC 1961 per-message protection: the relay socket's datagrams travel wrapped
    sealing: DatagramSealing | None = None


class DatagramSealing(Protocol):
    def seal_datagram(self, packet: bytes) -> bytes: ...  # ValueError: too large
    def open_datagram(self, datagram: bytes) -> bytes: ...  # RemoteProtocolError


class UdpAssociation:
    """State of one UDP ASSOCIATE; ends with its TCP connection (``close()``)."""

    #: what the policy is asked for unicast peers (the transparent front asks its own)
    unicast_command = pol.Command.UDP

    def __init__(
        self,
        deps: UdpDeps,
        *,
        aa: bool,
        real_family: bool,
        client_port: int | None,
    ) -> None:
        self.deps = deps
        self.config = deps.settings
        self.client_ip = deps.client_ip
        self.client_family = family_of(deps.client_ip)
        self.client_port = client_port  # declared, or pinned by the first datagram
        self.aa = aa
        self.real_family = real_family
        self.tunnel: Channel | None = None  # TUNNEL mode: the client connection, lent
        self.stats = UdpStats()
        self.last_activity = deps.clock()
        self.relay: asyncio.DatagramTransport | None = None
        self.relay_endpoint: Endpoint | None = None
        self.outbound: dict[int, asyncio.DatagramTransport] = {}
        self.outbound_port: int = 0  # USECLIENTSPORT: bind outbound sockets here
        self.reassembler = Reassembler(
            clock=deps.clock,
            timeout=self.config.fragment_timeout,
            max_bytes=self.config.max_buffered_bytes,
        )
        self._clock = deps.clock
        self._from_client_rate = _bucket(self.config.max_datagram_rate, deps.clock)
        self._to_client_rate = _bucket(self.config.max_datagram_rate, deps.clock)
        # Peer caches, bounded by the client's budget (see the module docstring):
        budget = deps.peers
        if budget is None:
            budget = PeerBudget(self.config.max_peers_per_client)
        budget.attach()
        self.peers = budget
        stats = self.stats
        self._verdicts: PeerCache[Endpoint, bool] = PeerCache(budget, counter=stats)
        # how the client addressed each peer; a route goes with it (see send_to_peer):
        self._named: PeerCache[Endpoint, Address] = PeerCache(
            budget, counter=stats, on_evict=self._forget_route
        )
        self._rendered: PeerCache[Endpoint, Address | None] = PeerCache(budget, counter=stats)
        self._names: PeerCache[str, list[IPAddress]] = PeerCache(
            budget, capacity=_MAX_NAMES, counter=stats
        )
        # Fast paths, filled by the slow path once per peer (see the module docstring):
        self._client_addr: tuple[object, ...] | None = None  # the pinned sockaddr, as given
        # raw header -> (socket, sockaddr):
        self._routes: PeerCache[bytes, _Route] = PeerCache(budget, counter=stats)
        # peer sockaddr -> header:
        self._headers: PeerCache[tuple[object, ...], bytes] = PeerCache(budget, counter=stats)
        # The fast paths' cache hits are done on the caches' maps, not by calls (peercache):
        self._route_hits = self._routes.data
        self._header_hits = self._headers.data
        self._caches = (
            self._verdicts,
            self._named,
            self._rendered,
            self._names,
            self._routes,
            self._headers,
        )
        self._id_pins: list[int] = []
        self._pending_bytes = 0
        self.announced: set[Endpoint] = set()
        self.memberships: dict[Endpoint, Membership] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    # -- set-up -----------------------------------------------------------------------

    async def open_relay(self) -> Endpoint:
        """The client-facing socket, on the address the client reached (profile 7)."""
        loop = asyncio.get_running_loop()
        facing = self.deps.facing_ip
        receive = self.from_client if self.deps.sealing is None else self._from_client_sealed
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Receiver(receive),
            local_addr=(facing.compressed, 0),
            family=family_of(facing),
        )
        self.relay = transport
        self.relay_endpoint = (facing, int(transport.get_extra_info("sockname")[1]))
        return self.relay_endpoint

    async def outbound_socket(self, family: int) -> asyncio.DatagramTransport:
        """This association's outbound socket for ``family``, created on first use."""
        transport = self.outbound.get(family)
        if transport is not None:
            return transport
        transport = await self._create_outbound(family, self.outbound_port)
        self.outbound[family] = transport
        return transport

    async def try_client_port(self, port: int) -> bool:
        """USECLIENTSPORT: bind both families' outbound sockets to ``port`` if free."""
        created: dict[int, asyncio.DatagramTransport] = {}
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                created[family] = await self._create_outbound(family, port)
        except OSError:
            for transport in created.values():
                transport.close()
            return False
        self.outbound.update(created)
        self.outbound_port = port
        return True

    async def _create_outbound(self, family: int, port: int) -> asyncio.DatagramTransport:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            hops = self.config.multicast_hops
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, hops)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                sock.bind(("::", port))
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, hops)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                sock.bind(("0.0.0.0", port))
            index = self.deps.multicast.send_interface_index(family)
            if index:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
                else:
                    # struct ip_mreqn with only imr_ifindex set selects the interface.
                    mreqn = struct.pack("=4s4si", bytes(4), bytes(4), index)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Receiver(self.from_peer), sock=sock
        )
        return transport

    # -- client -> peers ----------------------------------------------------------------

    def from_client(self, data: bytes, addr: tuple[object, ...]) -> None:
        """A datagram on the relay socket: check its source, then relay it."""
        if addr == self._client_addr and len(data) > 4 and data[2] == 0:
            # Fast path: a known client to a destination already checked and resolved.
            size = udp_header_length(data)
            key = data[:size]
            routes = self._route_hits
            route = routes.get(key)
            if route is not None:
                bucket = self._from_client_rate
                if bucket is None or bucket.take():
                    routes.move_to_end(key)
                    route[0].sendto(data[size:], route[1])
                    stats = self.stats
                    stats.to_peers += 1
                    v6 = route[2]
                    stats.datagrams_up[v6] += 1
                    stats.bytes_up[v6] += len(data) - size
                    self.last_activity = self._clock() if bucket is None else bucket.last
                    return
        source = sockaddr_ip(addr)
        port = int(addr[1])  # type: ignore[call-overload]
        if source != self.client_ip or (self.client_port and port != self.client_port):
            self._drop("dropped_foreign", "datagram from foreign source %s:%d", source, port)
            return
        if not self.client_port:
            self.client_port = port  # the first datagram pins the port (profile 7)
        self._client_addr = addr
        try:
            datagram = decode_udp_datagram(data)
        except RemoteProtocolError as exc:
            self._drop("dropped_malformed", "malformed datagram from client: %s", exc.reason)
            return
        route_key = data[: len(data) - len(datagram.data)] if not datagram.frag else None
        self.client_datagram(datagram, route_key)

    def _from_client_sealed(self, data: bytes, addr: tuple[object, ...]) -> None:
        """A protected session's datagram: unwrapped first (strangers' are not)."""
        if addr != self._client_addr and sockaddr_ip(addr) != self.client_ip:
            self._drop("dropped_foreign", "datagram from foreign source %s", addr[0])
            return
        assert self.deps.sealing is not None
        try:
            plain = self.deps.sealing.open_datagram(data)
        except RemoteProtocolError as exc:
            self._drop("dropped_malformed", "client datagram rejected: %s", exc.reason)
            return
        self.from_client(plain, addr)

    def client_datagram(self, datagram: UdpDatagram, route_key: bytes | None = None) -> None:
        """A decoded datagram from the client (relay socket or tunnel). ``route_key`` is
        its raw header, under which the route is remembered for the fast path."""
        bucket = self._from_client_rate
        if bucket is not None and not bucket.take():
            self._drop("dropped_rate", "client datagram rate exceeded")
            return
        self.last_activity = self._clock()
        payload = datagram.data
        if datagram.frag:
            whole = self.reassembler.feed(
                datagram.frag, (datagram.address, datagram.port), datagram.data
            )
            if whole is None:
                return
            payload = whole
        self._relay(datagram.address, datagram.port, payload, route_key)

    def _relay(
        self, destination: Address, port: int, payload: bytes, route_key: bytes | None
    ) -> None:
        if isinstance(destination, AddressId):
            target = self.deps.ids.cached(self.deps.owner, destination.realid)
            if target is None:
                self._lookup_then_relay(destination, port, payload)
                return
            if destination.realid not in self._id_pins and not self._pin(destination.realid):
                route_key = None  # unpinned: keep looking it up, so expiry is seen
        else:
            target = destination.lower() if isinstance(destination, str) else destination
        pool = self.deps.pool
        if pool is not None and target in pool:
            # A fake-IP pool address stands for its name; it is never sent to itself.
            name = pool.name_of(target)  # type: ignore[arg-type]
            if name is None:
                self._drop("dropped_malformed", "pool address %s is not bound", target)
                return
            target, route_key = name, None  # looked up each time: the binding may end
        if isinstance(target, str):
            cached = self._names.get(target)
            if cached is None:
                self._resolve_then_send(target, port, payload, destination)
                return
            self._send_to_any(cached, port, payload, destination, target, route_key)
            return
        self.send_to_peer(target, port, payload, destination, route_key=route_key)

    def _lookup_then_relay(self, destination: AddressId, port: int, payload: bytes) -> None:
        """An ID this process has not seen yet: the shared table says what it names."""
        if self._pending_bytes + len(payload) > self.config.max_buffered_bytes:
            self._drop("dropped", "too many bytes waiting for the ID table")
            return
        self._pending_bytes += len(payload)

        async def lookup() -> None:
            try:
                target = await self.deps.ids.lookup(self.deps.owner, destination.realid)
            except TableUnavailable as exc:
                self._drop("dropped", "cannot look up %s: %s", destination, exc)
                return
            finally:
                self._pending_bytes -= len(payload)
            if target is None:
                self._drop("dropped_malformed", "unknown or foreign %s", destination)
                return
            self._relay(destination, port, payload, None)  # known here now

        self._spawn(lookup())

    def send_to_peer(
        self,
        peer: IPAddress,
        port: int,
        payload: bytes,
        named_as: Address,
        name: str | None = None,
        *,
        route_key: bytes | None = None,
    ) -> bool:
        key = (peer, port)
        allowed = self._verdicts.get(key)
        if allowed is None:
            command = pol.Command.MULTICAST if peer.is_multicast else self.unicast_command
            decision = self.deps.policy.check(
                client=self.client_ip,
                user=self.deps.user,
                command=command,
                address=peer,
                name=name,
                port=port,
            )
            allowed = decision.allowed
            self._verdicts.put(key, allowed)
        if not allowed:
            self._drop("dropped_policy", "datagram to %s:%d denied by policy", peer, port)
            return False
        named = self._named.get(key)
        if (
            named is None
            and self._named.put(key, named_as)
            and self._rendered.pop(key, 0) is None  # it was unnameable until now
        ):
            self._headers.clear()
        transport = self.outbound.get(family_of(peer))
        if transport is None:
            self._spawn(self._send_after_open(peer, port, payload))
            return True
        destination = (peer.compressed, port)
        transport.sendto(payload, destination)
        self._count_up(peer, len(payload))
        # A route's hits skip _named. When the peer's replies need it (render_source,
        # restrict_to_announced), the route is kept only under the naming _named keeps and
        # only while it keeps it: an evicted naming takes its route along (_forget_route)
        # and is learnt again from the client's next datagram.
        if route_key is not None and (
            not self._replies_need_named(peer)
            or (
                (named is None or named == named_as)
                and route_key.startswith(b"\x00\x00")  # what _route_key(named_as) gives
            )
        ):
            self._routes.put(route_key, (transport, destination, int(peer.version == 6)))
            if key not in self._named:  # evicted by the route's own entry after all
                self._routes.pop(route_key, None)
        return True

    def _replies_need_named(self, peer: IPAddress) -> bool:
        return self.config.restrict_to_announced or (
            not (self.aa or self.real_family) and family_of(peer) != self.client_family
        )

    async def _send_after_open(self, peer: IPAddress, port: int, payload: bytes) -> None:
        try:
            transport = await self.outbound_socket(family_of(peer))
        except OSError as exc:
            self._drop("dropped", "no outbound socket for %s: %s", peer, exc)
            return
        transport.sendto(payload, (peer.compressed, port))
        self._count_up(peer, len(payload))

    def _count_up(self, peer: IPAddress, size: int) -> None:
        stats = self.stats
        stats.to_peers += 1
        v6 = int(peer.version == 6)
        stats.datagrams_up[v6] += 1
        stats.bytes_up[v6] += size

    def _send_to_any(
        self,
        addresses: list[IPAddress],
        port: int,
        payload: bytes,
        named_as: Address,
        name: str,
        route_key: bytes | None = None,
    ) -> None:
        # A datagram has no handshake to race: use the first address the policy allows.
        for address in addresses:
            key = (address, port)
            if self._verdicts.get(key) is False:
                continue
            if self.send_to_peer(address, port, payload, named_as, name, route_key=route_key):
                return

    def _resolve_then_send(self, name: str, port: int, payload: bytes, named_as: Address) -> None:
        if self._pending_bytes + len(payload) > self.config.max_buffered_bytes:
            self._drop("dropped", "too many bytes waiting for DNS")
            return
        self._pending_bytes += len(payload)

        async def resolve() -> None:
            try:
                addresses = await self.deps.resolver.resolve(name)
            except ResolveError as exc:
                self._drop("dropped", "cannot resolve %s: %s", name, exc)
                return
            finally:
                self._pending_bytes -= len(payload)
            pool = self.deps.pool
            if pool is not None:  # never into the pool: it would loop (see context.py)
                addresses = [a for a in addresses if a not in pool]
            ordered = self.deps.order(addresses)
            self._names.put(name, ordered)
            self._send_to_any(ordered, port, payload, named_as, name)

        self._spawn(resolve())

    def _pin(self, realid: int) -> bool:
        """Pin an ID the client sends to: in use by this association, it must not expire
        while the fast path skips the table."""
        if len(self._id_pins) >= _MAX_NAMES:
            return False
        if not self.deps.ids.pin(self.deps.owner, realid):
            return False
        self._id_pins.append(realid)
        return True

    def _forget_route(self, key: Endpoint, named_as: Address) -> None:
        """``_named`` evicted ``key``: the route under that naming goes too."""
        self._routes.pop(_route_key(named_as, key[1]), None)

    def name_peer(self, peer: IPAddress, port: int, named_as: Address) -> None:
        """Remember how the client named a peer before any datagram (INTERFACE DATA)."""
        named = self._named.get((peer, port))
        if named is not None and named != named_as:
            self._forget_route((peer, port), named)
        if self._named.put((peer, port), named_as):
            self._rendered.pop((peer, port), None)
            self._headers.clear()  # a rendering may have changed

    # -- peers -> client ----------------------------------------------------------------

    def from_peer(self, data: bytes, addr: tuple[object, ...]) -> None:
        headers = self._header_hits
        header = headers.get(addr)
        if (
            header is not None
            and self.relay is not None
            and self._client_addr is not None
            and len(data) <= _MAX_UDP_PAYLOAD - len(header)
        ):
            # Fast path: a peer whose source rendering is already known.
            bucket = self._to_client_rate
            if bucket is None:
                self.last_activity = self._clock()
            elif bucket.take():
                self.last_activity = bucket.last
            else:
                self._drop("dropped_rate", "datagram rate to client exceeded")
                return
            headers.move_to_end(addr)
            self.relay.sendto(header + data, self._client_addr)
            stats = self.stats
            stats.to_client += 1
            stats.bytes_down[len(addr) == 4] += len(data)  # a 4-tuple sockaddr is IPv6
            return
        peer = sockaddr_ip(addr)
        port = int(addr[1])  # type: ignore[call-overload]
        key = (peer, port)
        if (
            self.config.restrict_to_announced
            and key not in self.announced
            and key not in self._named
        ):
            self._drop("dropped_foreign", "datagram from unannounced peer %s:%d", peer, port)
            return
        source = self._rendered.get(key, _Not.CACHED)
        if source is _Not.CACHED:
            source = self.render_source(peer, port)
            if source is _Not.YET:
                self._spawn(self._name_then_deliver(peer, data, addr))
                return
            self._rendered.put(key, source)  # None too: dropped cheaply until named
        if source is None or source is _Not.YET:  # YET is never cached: for the type checker
            self._drop("dropped_unrenderable", "no way to name %s:%d for this client", peer, port)
            return
        if self.deps.sealing is None:  # a wrapped datagram has no fixed header to reuse
            self._headers.put(addr, UdpDatagram(source, port, b"").encode())
        self.to_client(UdpDatagram(source, port, data), from_v6=peer.version == 6)

    def render_source(
        self, peer: IPAddress, port: int, *, by_id: bool = False
    ) -> Address | Literal[_Not.YET] | None:
        """How the client sees a peer's address (profile 6 and 7); YET: its ID is still to
        come from the shared table (`_name_then_deliver`)."""
        if self.aa or by_id:
            realid = self.deps.ids.associate_now(self.deps.owner, peer)
            return _Not.YET if realid is None else AddressId(realid)
        if self.real_family or family_of(peer) == self.client_family:
            return peer
        return self._named.get((peer, port))

    async def _name_then_deliver(
        self, peer: IPAddress, data: bytes, addr: tuple[object, ...], by_id: bool = False
    ) -> None:
        """A peer's first datagram to a client that sees peers as IDs, in a worker that has
        not met the peer: associate it in the shared table, then deliver."""
        try:
            await self.deps.ids.associate(self.deps.owner, peer)
        except AddrMapError as exc:
            self._drop("dropped_unrenderable", "no ID for %s: %s", peer, exc)
            return
        if by_id:
            self.deliver_group(data, peer, int(addr[1]), by_id=True)  # type: ignore[call-overload]
        else:
            self.from_peer(data, addr)  # the ID is known here now

    def deliver_group(self, data: bytes, source: IPAddress, port: int, *, by_id: bool) -> None:
        """A multicast datagram from ``source`` to this client (joined by ID: as an ID)."""
        rendered = self.render_source(source, port, by_id=by_id)
        if rendered is _Not.YET:
            self._spawn(self._name_then_deliver(source, data, (source, port), by_id=True))
            return
        self.to_client(UdpDatagram(rendered or source, port, data), from_v6=source.version == 6)

    def to_client(self, datagram: UdpDatagram, *, from_v6: bool = False) -> None:
        bucket = self._to_client_rate
        if bucket is not None and not bucket.take():
            self._drop("dropped_rate", "datagram rate to client exceeded")
            return
        packet = datagram.encode()
        sealing = self.deps.sealing
        if sealing is not None and self.tunnel is None:  # a tunnel's channel wraps its own
            try:
                packet = sealing.seal_datagram(packet)
            except ValueError:
                self._drop("dropped", "datagram too large for the client once wrapped")
                return
        if len(packet) > _MAX_UDP_PAYLOAD:
            self._drop("dropped", "datagram too large for the client once framed")
            return
        self.last_activity = self._clock()
        if self.tunnel is not None:
            if self.tunnel.congested:
                self._drop("dropped", "tunnel congested")
                return
            self.tunnel.write_nowait(encode_tunnel_frame(packet))
        elif self.relay is not None and self.client_port:
            self.relay.sendto(packet, (self.client_ip.compressed, self.client_port))
        else:
            self._drop("dropped", "client endpoint not known yet")
            return
        self.stats.to_client += 1
        self.stats.bytes_down[from_v6] += len(datagram.data)

    # -- bookkeeping --------------------------------------------------------------------

    def _drop(self, counter: str, message: str, *args: object) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        if counter != "dropped":
            self.stats.dropped += 1
        self.deps.drop_log(log, "%s: " + message, self.deps.label, *args)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: UDP relay task failed", self.deps.label, exc_info=task.exception())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        if self.relay is not None:
            self.relay.close()
        for transport in self.outbound.values():
            transport.close()
        self.outbound.clear()
        for membership in self.memberships.values():
            self.deps.multicast.leave(membership)
        self.memberships.clear()
        for realid in self._id_pins:
            self.deps.ids.unpin(self.deps.owner, realid)
        self._id_pins.clear()
        for cache in self._caches:
            cache.close()
        self.peers.detach()
