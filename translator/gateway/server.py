"""The gateway: listeners, client admission, shared state, reload and an orderly stop.

Shared state lives here and is handed to each Session as ``Services`` (context.py): the
config, the resolver, the address table, the connector, the credentials check, the BIND
MULTI registry, the multicast hub and the metrics. Nothing here parses bytes.

A reload builds new ``Services`` for the requests that start after it; a running session
keeps the snapshot it started with, and the shared pieces (address table, UDP
associations, multicast memberships, BIND MULTI listeners) are the same objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial

from prometheus_client.metrics_core import Metric

from addrmap import AddressTable, FakeIpPool
from translator.auth import Credentials, CredentialsError
from translator.config import Config, ConfigError, Endpoint
from translator.gss.acceptor import acceptor_for
from translator.idtable import Ids, LocalIds
from translator.idtable.setup import redis_ids
from translator.metrics import Metrics, table_metrics, udp_metrics
from translator.net.addresses import IPAddress
from translator.net.exporter import MetricsServer
from translator.net.happy_eyeballs import connect_happy, connect_one, connect_socket
from translator.net.interfaces import Interface, InterfaceAddress
from translator.net.resolver import Resolver
from translator.net.watcher import InterfaceWatcher
from translator.ratelog import RateLimitedLog
from translator.relay.channel import Channel
from translator.relay.listeners import MultiRegistry
from translator.relay.multicast import MulticastHub
from translator.transparent.front import TransparentFront

from .admission import Admission
from .context import Connector, Services
from .listening import Listeners
from .session import Session

log = logging.getLogger("socks64.server")

# scrypt costs ~16 MiB and some milliseconds per check: a login flood must queue, not
# multiply memory.
_CONCURRENT_PASSWORD_CHECKS = 4
_SWEEP_INTERVAL = 1.0


_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
_IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)


def _end_stranded(sock: socket.socket) -> None:
    """End a connection whose local address was just removed, so its client hears it.

    Linux no longer routes packets from a removed address, so a plain close leaves the
    FIN (and any unacknowledged reply) queued until the address returns. A transparent
    socket may send from a non-local address (this needs CAP_NET_ADMIN, which a gateway
    managing interfaces has); without it the FIN leaves when the address comes back.
    """
    with contextlib.suppress(OSError):
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _resolver_for(config: Config, clock: Callable[[], float]) -> Resolver:
    rc = config.resolver
    return Resolver(
        nameservers=rc.nameservers,
        timeout=rc.timeout,
        tries=rc.tries,
        cache_size=rc.cache_size,
        hosts_file=rc.hosts_file,
        clock=clock,
    )


def _credentials_for(config: Config) -> Credentials | None:
    """The users file, read now (at start and on every reload)."""
    path = config.auth.users_file
    if path is None:
        return None
    try:
        return Credentials.load(path)
    except CredentialsError as exc:
        raise ConfigError("auth.users_file", str(exc)) from None
    except OSError as exc:
        raise ConfigError("auth.users_file", f"cannot read {path}: {exc.strerror}") from None


#: settings a reload cannot change (logged; they apply after a restart)
_FIXED_AT_START = ("addrmap", "transparent", "user", "group")


class Gateway:
    """A running socks64 instance."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: Resolver | None = None,
        table: AddressTable | None = None,
        ids: Ids | None = None,
        own_listeners: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        self.resolver = resolver or _resolver_for(config, clock)
        self.resolver.observe_query = self.metrics.dns_seconds.observe
        am = config.addrmap
        if ids is None and table is None and am.redis_url is not None:
            ids = redis_ids(am)
        if ids is None:
            table = table or AddressTable(
                clock=clock,
                ttl=am.ttl,
                quarantine=am.quarantine,
                per_owner_quota=am.per_owner,
                capacity=am.capacity,
            )
            ids = LocalIds(table, state_file=am.state_file)
        #: the sessions' ID table: this process's own, or a cache of a shared one
        self.ids = ids
        self.credentials = _credentials_for(config)
        self.gss = acceptor_for(config)
        self.pool: FakeIpPool | None = None
        if config.transparent.enabled:
            if not isinstance(ids, LocalIds):
                raise ValueError("the transparent front needs the table in its own process")
            self.pool = FakeIpPool(ids.table, config.transparent.pool, quarantine=am.quarantine)
        self.transparent: TransparentFront | None = None
        self.multi = MultiRegistry()
        self.interfaces = InterfaceWatcher()
        self.multicast = MulticastHub(
            self.interfaces,
            {
                socket.AF_INET: config.udp.multicast_interface_v4,
                socket.AF_INET6: config.udp.multicast_interface_v6,
            },
        )
        self.services = Services(
            config=config,
            ids=self.ids,
            resolver=self.resolver,
            clock=clock,
            connect=self._connector(config),
            verify_password=self.verify_password,
            gssapi=self.gss,
            multi=self.multi,
            multicast=self.multicast,
            udp_drop_log=RateLimitedLog(level=logging.INFO),
            metrics=self.metrics,
            pool=self.pool,
        )
        self.admission = Admission(config.limits)
        self.listeners = Listeners(self._admit, self.metrics.accept_pause)
        self.metrics_server: MetricsServer | None = None
        self.metrics.add_source(self._table_metrics)
        self.metrics.add_source(self._udp_metrics)
        self._listen_override: list[Endpoint] | None = None
        #: False in a worker: it serves the supervisor's sockets and opens none itself
        self._own_listeners = own_listeners
        self._unsubscribe: Callable[[], None] | None = None
        # each running session and the services it started with (a reload swaps them)
        self._sessions: dict[asyncio.Task[None], Services] = {}
        self._retired: list[Resolver] = []  # replaced by a reload, closed once unused
        self._sweeper: asyncio.Task[None] | None = None
        self._auth_slots: asyncio.Semaphore | None = None
        self._reject_log = RateLimitedLog()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop start() ran on

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.listeners.endpoints

    def _connector(self, config: Config) -> Connector:
        rc = config.resolver
        attempt = partial(connect_socket, interface=config.outbound.interface)
        by_family = {  # label children looked up once, not per connection
            socket.AF_INET: self.metrics.connect_seconds.labels("ipv4"),
            socket.AF_INET6: self.metrics.connect_seconds.labels("ipv6"),
        }

        interface = config.outbound.interface
        timeout = config.timeouts.connect
        v4, v6 = by_family[socket.AF_INET], by_family[socket.AF_INET6]
        observe = self.metrics.observe  # at the next scrape: no lock and checks per connect

        async def connect(addresses: Sequence[IPAddress], port: int) -> socket.socket:
            started = time.monotonic()
            if len(addresses) == 1:  # an IP literal: nothing to race, no tasks to start
                address = addresses[0]
                sock = await connect_one(
                    address, port, timeout=timeout, interface=interface, loop=self._loop
                )
                observe(v6 if address.version == 6 else v4, time.monotonic() - started)
                return sock
            sock = await connect_happy(
                addresses,
                port,
                prefer=rc.prefer_family,
                delay=rc.happy_eyeballs_delay,
                timeout=timeout,
                attempt=attempt,
            )
            observe(by_family[sock.family], time.monotonic() - started)
            return sock

        return connect

    async def start(
        self,
        listen: Sequence[Endpoint] | None = None,
        *,
        adopted: Iterable[socket.socket] = (),
    ) -> list[Endpoint]:
        """Open every listener (and the metrics endpoint); returns the bound endpoints
        (real ports for port 0). ``adopted``: listening sockets from systemd."""
        self._auth_slots = asyncio.Semaphore(_CONCURRENT_PASSWORD_CHECKS)
        self._loop = asyncio.get_running_loop()
        self._listen_override = list(listen) if listen else None
        try:
            await self.ids.start()
            await self.interfaces.start()
            self._unsubscribe = self.interfaces.subscribe(self._on_interface_event)
            self.listeners.adopt(adopted)
            if self._own_listeners:
                self.listeners.open(self._listen_override or self.config.listen)
            self.metrics_server = await self._metrics_server(self.config)
            if self.pool is not None:
                self.transparent = TransparentFront(
                    self.config.transparent, self.pool, lambda: self.services
                )
                await self.transparent.start()
                self.metrics.add_source(self.transparent.metrics)
        except BaseException:
            await self.close()
            raise
        self.metrics.set_listeners(str(e) for e in self.endpoints)
        self._sweeper = asyncio.create_task(self._sweep_table())
        return self.endpoints

    async def _metrics_server(self, config: Config) -> MetricsServer | None:
        endpoint = config.metrics.listen
        if endpoint is None:
            return None
        server = MetricsServer(self.metrics, endpoint.host, endpoint.port)
        await server.start()
        return server

    # -- reload ---------------------------------------------------------------------------

    async def reload(self, load: Callable[[], Config]) -> bool:
        """Read, validate and apply a new config; on any error keep the old one.

        Returns whether the new config is in force; the result is logged and counted.
        """
        try:
            await self._apply(load())
        except (ConfigError, OSError) as exc:
            where = f" ({exc.key})" if isinstance(exc, ConfigError) and exc.key else ""
            log.error("reload failed%s, keeping the running config: %s", where, exc)
            self.metrics.config_reload(False)
            return False
        self.metrics.config_reload(True)
        return True

    async def _apply(self, config: Config) -> None:
        old = self.config
        credentials = _credentials_for(config)
        gss = acceptor_for(config)
        resolver = self.resolver
        if config.resolver != old.resolver:
            resolver = _resolver_for(config, self.clock)
            resolver.observe_query = self.metrics.dns_seconds.observe
        metrics_server = self.metrics_server
        try:
            if config.metrics.listen != old.metrics.listen:
                metrics_server = await self._metrics_server(config)
            added: list[Endpoint] = []
            removed: list[Endpoint] = []
            if self._own_listeners:
                added, removed = self.listeners.open(self._listen_override or config.listen)
        except BaseException:
            if resolver is not self.resolver:
                await resolver.close()
            if metrics_server is not self.metrics_server and metrics_server is not None:
                await metrics_server.close()
            raise
        # Everything that can fail has been done: commit.
        if metrics_server is not self.metrics_server:
            if self.metrics_server is not None:
                await self.metrics_server.close()
            self.metrics_server = metrics_server
        if resolver is not self.resolver:
            self._retired.append(self.resolver)
            self.resolver = resolver
        self.config = config
        self.credentials = credentials
        self.gss = gss
        self.admission.limits = config.limits
        self.services = dataclasses.replace(
            self.services,
            config=config,
            resolver=resolver,
            connect=self._connector(config),
            gssapi=gss,
        )
        self.metrics.set_listeners(str(e) for e in self.endpoints)
        fixed = _FIXED_AT_START if self._own_listeners else (*_FIXED_AT_START, "listen", "workers")
        for section in fixed:
            if getattr(config, section) != getattr(old, section):
                log.warning("reload: %s changes apply after a restart", section)
        log.info(
            "reloaded %s: %d listener(s) added%s, %d removed%s; %d policy rules",
            config.source,
            len(added),
            "".join(f" {e}" for e in added),
            len(removed),
            "".join(f" {e}" for e in removed),
            len(config.policy.rules),
        )
        await self._close_retired()

    async def _close_retired(self) -> None:
        """Close replaced resolvers once no running session uses them."""
        in_use = {id(services.resolver) for services in self._sessions.values()}
        for resolver in [r for r in self._retired if id(r) not in in_use]:
            self._retired.remove(resolver)
            await resolver.close()

    # -- clients --------------------------------------------------------------------------

    def _admit(self, sock: socket.socket, peer: tuple[object, ...], endpoint: str) -> None:
        """A new connection: a slot for it, or closed at once (gateway full, or its
        address already holds its share)."""
        client = str(peer[0])
        refused = self.admission.admit(client)
        if refused is not None:
            sock.close()
            self.metrics.connection_rejected(refused)
            self._reject_log(log, "closing a connection from %s: %s limit reached", client, refused)
            return
        self.metrics.connection_accepted(endpoint)
        # TCP_NODELAY: inherited from the listener (Listeners sets it there, or on the
        # connection where the listener would not take it)
        services = self.services
        loop = self._loop or asyncio.get_running_loop()  # known once started: no getpid
        task = loop.create_task(self._serve(services, Channel(sock, loop), client))
        self._sessions[task] = services
        task.add_done_callback(self._session_done)

    def _session_done(self, task: asyncio.Task[None]) -> None:
        services = self._sessions.pop(task, None)
        if self._retired and services is not None and services.resolver is not self.resolver:
            task.get_loop().create_task(self._close_retired())

    async def _serve(self, services: Services, channel: Channel, client: str) -> None:
        handshaking = True

        def first_request() -> None:
            nonlocal handshaking
            handshaking = False
            self.admission.handshake_done(client)

        session: Session | None = None
        try:
            try:
                session = Session(services, channel, first_request)
            except OSError as exc:  # reset while still in the backlog: nobody to serve
                log.debug("connection from %s gone before it was served: %s", client, exc)
                return
            await session.run()
        finally:
            if session is not None and session.channel is not channel:
                session.channel.close()  # GSS-API protection took the socket over
            channel.close()
            self.admission.release(client, handshaking=handshaking)

    def _on_interface_event(self, event: str, subject: Interface | InterfaceAddress) -> None:
        """Interfaces change under a running gateway: act on what it affects."""
        if event == "address-removed" and isinstance(subject, InterfaceAddress):
            stranded = [
                channel
                for association, channel in self.services.udp_associations.items()
                if association.relay_endpoint is not None
                and association.relay_endpoint[0] == subject.address
            ]
            log.warning(
                "address %s was removed; ending %d UDP association(s) relaying on it",
                subject.address,
                len(stranded),
            )
            for channel in stranded:
                _end_stranded(channel.sock)
        elif event == "link-down" and isinstance(subject, Interface):
            groups = [g for g in self.multicast.joined() if g[2] == subject.index]
            log.warning(
                "interface %s went down (%d multicast group(s) joined on it)",
                subject.name,
                len(groups),
            )
        elif event == "link-up" and isinstance(subject, Interface):
            log.info("interface %s is up", subject.name)

    async def verify_password(self, user: str, password: str) -> bool:
        if self.credentials is None or self._auth_slots is None:
            return False
        async with self._auth_slots:
            return await self.credentials.verify_async(user, password)

    async def _sweep_table(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            self.services.traffic.flush(self.metrics)  # long transfers show as they go
            try:
                freed = await self.ids.maintain()
            except Exception:  # the sweeper must live on: it also flushes the traffic
                log.exception("ID table maintenance failed")
                continue
            if freed:
                log.debug("address table: %d idle IDs expired", freed)

    # -- metrics read at scrape time ------------------------------------------------------

    def _table_metrics(self) -> list[Metric]:
        stats = self.ids.stats
        return table_metrics(
            live=stats.live,
            pinned=stats.pinned,
            quarantined=stats.quarantined,
            issued=stats.issued,
            freed=stats.freed,
            quota_refusals=stats.quota_refusals,
            capacity_refusals=stats.capacity_refusals,
        )

    def _udp_metrics(self) -> list[Metric]:
        live = self.services.udp_associations
        totals = self.services.udp_totals.plus([a.stats for a in live])
        return udp_metrics(
            active=len(live),
            datagrams_up=totals.up,
            datagrams_down=totals.down,
            dropped=totals.dropped,
            evictions=totals.evictions,
        )

    # -- stopping -------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop accepting; give running sessions ``grace`` seconds to finish on their own."""
        self.listeners.close()
        self.metrics.set_listeners(())
        tasks = list(self._sessions)
        if self.transparent is not None:
            self.transparent.stop_accepting()
            tasks += self.transparent.tasks
        if tasks and grace > 0:
            log.info("stopped accepting; %d session(s) have %g s to finish", len(tasks), grace)
            await asyncio.wait(tasks, timeout=grace)

    async def close(self) -> None:
        """Stop listening, end every session, and release everything held."""
        self.listeners.close()
        tasks = list(self._sessions)
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.transparent is not None:
            await self.transparent.close()  # removes what it installed, saves the bindings
            self.transparent = None
        self.multi.close_all()
        self.multicast.close()
        try:
            await self.ids.close()  # after the sessions: their pins are released
        except Exception:
            log.exception("closing the ID table failed")
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.metrics_server is not None:
            await self.metrics_server.close()
            self.metrics_server = None
        await self.interfaces.close()
        for resolver in [*self._retired, self.resolver]:
            await resolver.close()
        self._retired.clear()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
