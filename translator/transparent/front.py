"""The transparent front's life: state, DNS46, interception, from start to stop.

Start: the pool takes back the bindings of the state file; the pool is checked against
the host's own addresses; DNS46 listens; with ``transparent.interfaces``, the TPROXY
listeners open on loopback and the gateway's nftables table, fwmark rule and local route
are installed (leftovers of a run that died are removed first). Running: bindings are
saved within a second of changing; idle UDP flows end. Stop: listeners close, flows end,
exactly what was installed is removed, and the state is saved a last time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Network, ip_address
from typing import TypeVar

from addrmap import FakeIpPool
from translator import policy as pol
from translator.gateway.context import Services
from translator.metrics import Metric, transparent_metrics
from translator.net.accepting import Acceptor

from . import netfilter, sockets, state
from .dns46 import Dns46, parse_nameserver
from .flows import FlowCounters, Interceptor
from .settings import TransparentConfig, pool_conflicts

log = logging.getLogger("socks64.transparent")

T = TypeVar("T")
_TICK = 1.0  # seconds between saves of changed bindings (and idle-flow sweeps)


class TransparentError(RuntimeError):
    """The front cannot start as configured (the message says why and what to change)."""


def local_ipv4_networks() -> list[IPv4Network]:
    """The host's IPv4 networks (interface addresses with their prefixes)."""
    from pyroute2 import IPRoute  # here: only a gateway with a pool asks

    with IPRoute() as ipr:
        return [
            IPv4Network(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}", strict=False)
            for msg in ipr.get_addr(family=socket.AF_INET)
        ]


class TransparentFront:
    """DNS46 and the interception of one gateway, around its fake-IP pool."""

    def __init__(
        self, settings: TransparentConfig, pool: FakeIpPool, services: Callable[[], Services]
    ) -> None:
        self.settings = settings
        self.pool = pool
        self._services = services
        self.counters = FlowCounters()
        self.interceptor = Interceptor(pool, services, self.counters)
        self.dns: Dns46 | None = None
        self.dns_endpoints: list[tuple[str, int]] = []
        self.interception: netfilter.Interception | None = None
        self._acceptor: Acceptor | None = None
        self._listeners: list[socket.socket] = []
        self._ticker: asyncio.Task[None] | None = None
        self._saved_changes = -1
        self._save_failing = False  # logged once per failing spell, not every second

    @property
    def port(self) -> int | None:
        """The TPROXY listeners' port, when intercepting."""
        return self._listeners[0].getsockname()[1] if self._listeners else None

    async def start(self) -> None:
        settings = self.settings
        conflicts = pool_conflicts(settings.pool, await _in_fresh_thread(local_ipv4_networks))
        if conflicts:
            raise TransparentError(
                f"transparent.pool {settings.pool} overlaps local network(s) "
                f"{', '.join(conflicts)}: choose another pool"
            )
        self._restore()
        try:
            if settings.dns_listen:
                await self._start_dns()
            if settings.interfaces:
                await self._start_interception()
        except BaseException:
            await self.close()
            raise
        self._ticker = asyncio.create_task(self._tick())

    def _restore(self) -> None:
        path = self.settings.state_file
        if path is None:
            return
        try:
            state.check_writable(path)
        except OSError as exc:
            raise TransparentError(f"transparent.state_file: {exc}") from None
        snapshot = state.load(path)
        if snapshot is not None:
            restored = self.pool.restore(snapshot)
            log.info("transparent: %d binding(s) restored from %s", restored, path)
        self._saved_changes = self.pool.changes

    async def _start_dns(self) -> None:
        services = self._services()
        config = services.config
        upstreams = [parse_nameserver(text) for text in config.resolver.nameservers]
        if not upstreams:
            upstreams = _system_nameservers()
        loops = set(upstreams) & set(self.settings.dns_listen)
        if loops:
            raise TransparentError(
                f"resolver.nameservers names DNS46 itself ({', '.join(map(_show, loops))}): "
                "DNS46 forwards to the nameservers, so they must be real resolvers"
            )
        if not upstreams:
            raise TransparentError(
                "transparent.dns_listen needs upstream servers: set resolver.nameservers "
                "(there are none in /etc/resolv.conf either)"
            )
        settings = self.settings

        def may_use(client: object) -> bool:
            current = self._services().config.policy  # the policy in force (reloads)
            return current.may_allow(
                client=ip_address(str(client)), user=None, command=pol.Command.TRANSPARENT
            )

        self.dns = Dns46(
            pool=self.pool,
            upstreams=upstreams,
            synthesize=settings.synthesize,
            denied_answer=settings.denied_answer,
            may_use=may_use,
            max_ttl=settings.answer_ttl,
            timeout=config.resolver.timeout,
            count=self._count_answer,
        )
        self.dns_endpoints = await self.dns.start(list(settings.dns_listen))
        log.info(
            "DNS46 on %s (pool %s, synthesize %s)",
            ", ".join(_show(e) for e in self.dns_endpoints),
            settings.pool,
            settings.synthesize,
        )

    def _count_answer(self, kind: str) -> None:
        self.counters.answers[kind] += 1

    async def _start_interception(self) -> None:
        settings = self.settings
        try:
            tcp = sockets.transparent_listener("127.0.0.1", 0, socket.SOCK_STREAM)
            self._listeners.append(tcp)
            port = tcp.getsockname()[1]
            self._listeners.append(
                sockets.transparent_listener("127.0.0.1", port, socket.SOCK_DGRAM)
            )
        except PermissionError as exc:
            raise TransparentError(
                f"transparent.interfaces needs CAP_NET_ADMIN (IP_TRANSPARENT): {exc}"
            ) from None
        plan = netfilter.InterceptPlan(
            pool=settings.pool,
            interfaces=settings.interfaces,
            port=port,
            fwmark=settings.fwmark,
            route_table=settings.route_table,
        )
        interception = netfilter.Interception(plan)
        try:
            leftovers = await _in_fresh_thread(interception.install)
        except netfilter.InterceptionError as exc:
            raise TransparentError(str(exc)) from None
        self.interception = interception
        if leftovers:
            log.warning(
                "transparent: removed leftovers of an earlier run: %s", "; ".join(leftovers)
            )
        self._acceptor = Acceptor(self.interceptor.tcp_accepted)
        self._acceptor.watch(tcp)
        self.interceptor.watch_udp(self._listeners[1])
        log.info(
            "intercepting TCP and UDP to %s on %s (port %d, fwmark %#x, table %d)",
            settings.pool,
            ", ".join(settings.interfaces),
            port,
            settings.fwmark,
            settings.route_table,
        )

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            self.interceptor.sweep(self._services().clock())
            self.save()

    def save(self) -> None:
        """Write the bindings if they changed since the last write (logged on failure)."""
        path = self.settings.state_file
        if path is None or self.pool.changes == self._saved_changes:
            return
        changes = self.pool.changes
        try:
            state.save(path, self.pool.snapshot(), self.pool.network)
        except OSError as exc:
            if not self._save_failing:
                log.error("cannot save transparent state to %s: %s", path, exc)
                self._save_failing = True
            return
        if self._save_failing:
            log.info("transparent state saved to %s again", path)
            self._save_failing = False
        self._saved_changes = changes

    def stop_accepting(self) -> None:
        """Drain: no new intercepted TCP flows (their packets now meet a closed port)."""
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self.interceptor.tcp_tasks)

    async def close(self) -> None:
        self.stop_accepting()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self.interceptor.close()
        if self.dns is not None:
            await self.dns.close()
            self.dns = None
        if self.interception is not None:
            try:
                await _in_fresh_thread(self.interception.remove)
            except netfilter.InterceptionError as exc:
                log.error("transparent: could not remove the interception: %s", exc)
            self.interception = None
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        self.save()

    def metrics(self) -> list[Metric]:
        return transparent_metrics(
            answers=self.counters.answers,
            flows=self.counters.flows,
            refusals=self.counters.refusals,
            active=self.interceptor.active,
            bound=len(self.pool),
            quarantined=self.pool.quarantined,
            size=self.pool.size,
        )


async def _in_fresh_thread(work: Callable[[], T]) -> T:
    """Run blocking netlink/nft work in a thread started now. Not the loop's thread:
    pyroute2's sync API runs an event loop of its own. Not the default executor: its
    threads may predate the drop to ``user:``, and capabilities are per thread, so they
    would have none (nor pass CAP_NET_ADMIN on to nft)."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="socks64-netfilter") as pool:
        return await loop.run_in_executor(pool, work)


def _show(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _system_nameservers() -> list[tuple[str, int]]:
    """/etc/resolv.conf's nameservers, when the config names none."""
    servers: list[tuple[str, int]] = []
    with contextlib.suppress(OSError), open("/etc/resolv.conf", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    servers.append((str(ip_address(fields[1].split("%")[0])), 53))
    return servers
