"""Intercepted flows: TCP and UDP a client sent to a pool address, relayed to the name.

An intercepted flow is served by the same parts as a SOCKS request: the pool address is
looked up to its name (an alias of an ADDRESS ID), the policy decides for this client
(command ``transparent``) toward each address the name resolves to, the Happy Eyeballs
connector dials, and TCP goes through the splice relay, UDP through the UDP engine (one
association per client endpoint, with replies sent from the pool address and port the
client wrote to). Each flow pins its pool address, so a binding in use never expires.

Refusals are immediate: an unbound address or a client the policy keeps off gets a TCP
RST (or an ICMP unreachable for UDP, when the gateway may send one), one log line and a
count; the gateway goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address

from addrmap import FakeIpPool
from translator import policy as pol
from translator.gateway.accesslog import SessionRecord, family_name
from translator.gateway.context import RequestContext, Services
from translator.gateway.replies import REFUSALS, describe, rep_for
from translator.gateway.udp import association_deps
from translator.net.addresses import IPAddress, unmapped
from translator.ratelog import RateLimitedLog
from translator.relay.tcp import RelayStats, relay
from translator.relay.udp import UdpAssociation, UdpStats
from translator.wire import Rep, UdpDatagram

from . import sockets

log = logging.getLogger("socks64.transparent")

TCP_COMMAND = "TRANSPARENT_TCP"
UDP_COMMAND = "TRANSPARENT_UDP"
_UDP_BATCH = 64  # datagrams read per wake-up, so one busy client cannot starve the loop
_REPLY_SOCKETS = 1024  # (pool address, port) reply sockets kept open, least recently used
# Codes a connected UDP socket hears about without IP_RECVERR (Linux reports only "fatal"
# ICMP errors to it): port unreachable (ECONNREFUSED) for an unbound address, the same
# as a closed port; administratively prohibited (EHOSTUNREACH) for a policy refusal.
_ICMP_PORT_UNREACHABLE = 3
_ICMP_PROHIBITED = 13
_ICMP_PER_SECOND = 100  # our ICMP errors are not rate-limited by the kernel: do it here
_REASONS = {
    Rep.NOT_ALLOWED: "policy",
    Rep.HOST_UNREACHABLE: "unreachable",
    Rep.NETWORK_UNREACHABLE: "unreachable",
    Rep.CONNECTION_REFUSED: "refused",
    Rep.TTL_EXPIRED: "timeout",
}


@dataclass
class FlowCounters:
    """What the metrics show of the transparent path (read at scrape time)."""

    answers: Counter[str] = field(default_factory=Counter)
    flows: Counter[tuple[str, str]] = field(default_factory=Counter)
    refusals: Counter[tuple[str, str]] = field(default_factory=Counter)


class Refused(Exception):
    """An intercepted flow is not served; ``reason`` is the metrics label, ``rep`` the reply
    code a SOCKS client would have got (it goes into the access line)."""

    def __init__(
        self,
        reason: str,
        message: str,
        icmp_code: int = _ICMP_PROHIBITED,
        rep: Rep = Rep.NOT_ALLOWED,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.icmp_code = icmp_code
        self.rep = rep


def _reset(sock: socket.socket) -> None:
    """Close with an RST: the client's connection fails at once, not after a timeout."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _client_ip(host: object) -> IPAddress:
    return unmapped(ip_address(str(host)))


class Interceptor:
    """Serves every intercepted flow; owns the flows' tasks and sockets."""

    def __init__(
        self, pool: FakeIpPool, services: Callable[[], Services], counters: FlowCounters
    ) -> None:
        self.pool = pool
        self._services = services
        self.counters = counters
        self.tcp_tasks: set[asyncio.Task[None]] = set()
        self.udp_flows: dict[tuple[str, int], TransparentUdpFlow] = {}
        self._replies: OrderedDict[tuple[IPv4Address, int], socket.socket] = OrderedDict()
        self._udp_listener: socket.socket | None = None
        self.icmp = sockets.IcmpSender()
        self._icmp_second = 0
        self._icmp_sent = 0
        self._udp_refusal_log = RateLimitedLog(level=logging.INFO)
        self._limit_log = RateLimitedLog()

    @property
    def active(self) -> dict[str, int]:
        return {"tcp": len(self.tcp_tasks), "udp": len(self.udp_flows)}

    def _refuse_udp(
        self, client: tuple[str, int], destination: tuple[IPv4Address, int], size: int, exc: Refused
    ) -> None:
        """Count, tell the client (ICMP, at most ``_ICMP_PER_SECOND``), and log, rate-limited:
        a refused datagram has no session whose access line could carry it."""
        self.counters.refusals[("udp", exc.reason)] += 1
        second = int(time.monotonic())
        if second != self._icmp_second:
            self._icmp_second, self._icmp_sent = second, 0
        if self._icmp_sent < _ICMP_PER_SECOND:
            self._icmp_sent += 1
            self.icmp.unreachable(client, destination, size, exc.icmp_code)
        self._udp_refusal_log(
            log,
            "%s:%d: transparent udp to %s:%d refused (%s): %s",
            client[0],
            client[1],
            destination[0],
            destination[1],
            exc.reason,
            exc,
        )

    # -- TCP ----------------------------------------------------------------------------

    def tcp_accepted(self, sock: socket.socket, peer: tuple[object, ...], _: object) -> None:
        services = self._services()
        if len(self.tcp_tasks) >= services.config.limits.max_clients:
            _reset(sock)
            self.counters.refusals[("tcp", "limit")] += 1
            self._limit_log(log, "resetting a flow from %s: limits.max_clients reached", peer[0])
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.ensure_future(self._serve_tcp(services, sock, peer))
        self.tcp_tasks.add(task)
        task.add_done_callback(self.tcp_tasks.discard)

    async def _serve_tcp(
        self, services: Services, sock: socket.socket, peer: tuple[object, ...]
    ) -> None:
        try:
            destination, port, _redirected = sockets.original_destination(sock)
        except OSError as exc:  # gone while queued, or not intercepted after all
            log.debug("intercepted connection from %s unusable: %s", peer[0], exc)
            sock.close()
            return
        ctx = RequestContext(services, _client_ip(peer[0]), int(peer[1]), destination)  # type: ignore[call-overload]
        record = SessionRecord(
            ctx, family_name(ctx.client_ip.version), services.metrics, command=TCP_COMMAND
        )
        record.requested = f"{destination}:{port}"
        token: int | None = None
        try:
            name, token = self._admit(ctx, destination)
            record.requested = f"{name}:{port} ({destination})"
            try:
                target = await ctx.destination(name, port, pol.Command.TRANSPARENT)
                outbound = await services.connect(target.addresses, port)
            except REFUSALS as exc:
                rep = rep_for(exc)
                raise Refused(_REASONS.get(rep, "error"), describe(exc), rep=rep) from None
            await self._relay_tcp(services, record, sock, outbound)
        except Refused as exc:
            _reset(sock)  # the access line below is the one log line of it
            record.refused(exc.rep, f"{exc} ({exc.reason})")
            self.counters.refusals[("tcp", exc.reason)] += 1
        except asyncio.CancelledError:
            record.end = "stopped"
            raise
        except Exception:  # a bug costs this flow, never the gateway
            record.end = "error"
            log.exception("%s: intercepted TCP flow failed", ctx.label)
        finally:
            sock.close()
            if token is not None:
                self.pool.unpin(token)
            ctx.unpin_all()
            record.finish()

    def _admit(self, ctx: RequestContext, destination: IPv4Address) -> tuple[str, int]:
        """The name behind ``destination`` and a pin on it, or Refused."""
        if not ctx.config.policy.may_allow(
            client=ctx.client_ip, user=None, command=pol.Command.TRANSPARENT
        ):
            raise Refused("policy", "no rule allows the transparent path for this client")
        token = self.pool.pin(destination)
        name = None if token is None else self.pool.name_of(destination)
        if token is None or name is None:
            raise Refused(
                "unbound",
                f"pool address {destination} is not bound",
                _ICMP_PORT_UNREACHABLE,
                Rep.HOST_UNREACHABLE,
            )
        return name, token

    async def _relay_tcp(
        self,
        services: Services,
        record: SessionRecord,
        client: socket.socket,
        outbound: socket.socket,
    ) -> None:
        host, port = outbound.getpeername()[:2]
        v6 = outbound.family == socket.AF_INET6
        record.reached = f"[{host}]:{port}" if v6 else f"{host}:{port}"
        record.destination_family = family = family_name(6 if v6 else 4)
        record.end = "ok"
        self.counters.flows[("tcp", family)] += 1
        stats = RelayStats()
        traffic, metrics = services.traffic, services.metrics
        flow = traffic.begin_tcp(stats, record.client_family, family, metrics)
        try:
            await relay(
                client,
                outbound,
                idle_timeout=services.config.timeouts.idle,
                clock=services.clock,
                stats=stats,
            )
        finally:
            traffic.end(flow, metrics)
            record.up, record.down = stats.to_peer, stats.to_client
            if stats.idle_timeout:
                record.end = "idle"

    # -- UDP ----------------------------------------------------------------------------

    def watch_udp(self, listener: socket.socket) -> None:
        self._udp_listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._udp_readable)

    def _udp_readable(self) -> None:
        listener = self._udp_listener
        if listener is None:
            return
        for _ in range(_UDP_BATCH):
            try:
                data, client, (destination, port) = sockets.recv_with_destination(listener)
            except (BlockingIOError, InterruptedError):
                return
            except ValueError as exc:  # no original destination: not one of ours
                log.debug("UDP datagram without its original destination: %s", exc)
                continue
            except OSError as exc:
                log.debug("transparent UDP receive failed: %s", exc)
                return
            self._udp_datagram(data, client, destination, port)

    def _udp_datagram(
        self, data: bytes, client: tuple[str, int], destination: IPv4Address, port: int
    ) -> None:
        flow = self.udp_flows.get(client)
        name = None if flow is None else flow.names.get(destination)
        if name is None:
            try:
                name = self._adopt(flow, client, destination)
            except Refused as exc:
                self._refuse_udp(client, (destination, port), len(data), exc)
                return
            flow = self.udp_flows[client]
        assert flow is not None
        flow.client_datagram(UdpDatagram(name, port, data))

    def _adopt(
        self, flow: TransparentUdpFlow | None, client: tuple[str, int], destination: IPv4Address
    ) -> str:
        """A new destination of a client endpoint, admitted (a flow is made for the first):
        nothing is kept for a datagram that is refused."""
        if flow is not None:
            return flow.adopt(destination, self._admit(flow.ctx, destination))
        services = self._services()
        if len(self.udp_flows) >= services.config.limits.max_clients:
            raise Refused("limit", "limits.max_clients reached", rep=Rep.GENERAL_FAILURE)
        ctx = RequestContext(services, _client_ip(client[0]), client[1], _client_ip(client[0]))
        admitted = self._admit(ctx, destination)
        flow = self.udp_flows[client] = TransparentUdpFlow(self, ctx)
        return flow.adopt(destination, admitted)

    def reply_socket(self, source: IPv4Address, port: int) -> socket.socket:
        """A socket that sends from ``source``:``port`` (a pool address), kept for reuse."""
        key = (source, port)
        sock = self._replies.get(key)
        if sock is None:
            sock = self._replies[key] = sockets.reply_socket(source, port)
            if len(self._replies) > _REPLY_SOCKETS:
                _, oldest = self._replies.popitem(last=False)
                oldest.close()
        else:
            self._replies.move_to_end(key)
        return sock

    def end_udp_flow(self, flow: TransparentUdpFlow) -> None:
        if self.udp_flows.get(flow.client) is flow:
            del self.udp_flows[flow.client]
        flow.close()

    def sweep(self, now: float) -> None:
        """End UDP flows idle for ``udp.idle``."""
        for flow in list(self.udp_flows.values()):
            if now - flow.last_activity >= flow.config.idle:
                self.end_udp_flow(flow)

    async def close(self) -> None:
        if self._udp_listener is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._udp_listener.fileno())
            self._udp_listener = None
        for task in list(self.tcp_tasks):
            task.cancel()
        if self.tcp_tasks:
            await asyncio.gather(*self.tcp_tasks, return_exceptions=True)
        for flow in list(self.udp_flows.values()):
            self.end_udp_flow(flow)
        for sock in self._replies.values():
            sock.close()
        self._replies.clear()
        self.icmp.close()


class TransparentUdpFlow(UdpAssociation):
    """One client endpoint's intercepted UDP: the UDP engine, with replies written from
    the pool address the client sent to instead of framed to a SOCKS relay."""

    unicast_command = pol.Command.TRANSPARENT

    def __init__(self, owner: Interceptor, ctx: RequestContext) -> None:
        super().__init__(
            association_deps(ctx), aa=False, real_family=False, client_port=ctx.client_port
        )
        self.interceptor = owner
        self.ctx = ctx
        self.client = (ctx.client_ip.compressed, ctx.client_port)
        self.names: dict[IPv4Address, str] = {}  # pool address -> name, pinned
        self._addresses: dict[str, IPv4Address] = {}  # and back, for replies
        self._tokens: list[int] = []
        services = ctx.services
        self.record = SessionRecord(
            ctx, family_name(ctx.client_ip.version), services.metrics, command=UDP_COMMAND
        )
        self.record.unit = "datagrams"
        self.record.end = "ok"
        self._flow = services.traffic.begin_udp(self.stats, self.record.client_family)
        self._counted: set[str] = set()

    def adopt(self, address: IPv4Address, admitted: tuple[str, int]) -> str:
        name, token = admitted
        self._tokens.append(token)
        self.names[address] = name
        self._addresses[name] = address
        if self.record.requested == "-":
            self.record.requested = f"{name} ({address})"
        return name

    def send_to_peer(self, peer: IPAddress, port: int, *args: object, **kwargs: object) -> bool:
        sent = super().send_to_peer(peer, port, *args, **kwargs)  # type: ignore[arg-type]
        family = family_name(peer.version)
        if sent and family not in self._counted:
            self._counted.add(family)
            self.interceptor.counters.flows[("udp", family)] += 1
            self.record.reached = f"[{peer}]:{port}" if peer.version == 6 else f"{peer}:{port}"
            self.record.destination_family = family
        return sent

    def render_source(self, peer: IPAddress, port: int, *, by_id: bool = False) -> str | None:
        """Replies are named by the name the client reached (its pool address), whatever
        the peer's family."""
        named = self._named.get((peer, port))
        return named if isinstance(named, str) else None

    def to_client(self, datagram: UdpDatagram, *, from_v6: bool = False) -> None:
        source = datagram.address
        address = self._addresses.get(source) if isinstance(source, str) else None
        if address is None:
            self._drop("dropped_unrenderable", "reply from %s names no pool address", source)
            return
        try:
            sock = self.interceptor.reply_socket(address, datagram.port)
            sock.sendto(datagram.data, self.client)
        except OSError as exc:
            self._drop("dropped", "reply to client failed: %s", exc)
            return
        self.last_activity = self._clock()
        self.stats.to_client += 1
        self.stats.bytes_down[from_v6] += len(datagram.data)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        for token in self._tokens:
            self.interceptor.pool.unpin(token)
        self._tokens.clear()
        services = self.ctx.services
        services.traffic.end(self._flow, services.metrics)
        stats: UdpStats = self.stats
        self.record.up, self.record.down = stats.to_peers, stats.to_client
        self.record.finish()
