"""The gateway: listeners, client admission, shared state, and an orderly stop.

Shared state lives here and is handed to each Session as ``Services`` (context.py): the
config, the resolver, the address table, the connector, the credentials check, the BIND
MULTI registry and the multicast hub. Nothing here parses bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial

from addrmap import AddressTable
from translator.auth import Credentials
from translator.config import Config, Endpoint
from translator.net.happy_eyeballs import connect_happy, connect_socket
from translator.net.interfaces import Interface, InterfaceAddress
from translator.net.resolver import Resolver
from translator.net.watcher import InterfaceWatcher
from translator.ratelog import RateLimitedLog
from translator.relay.channel import Channel
from translator.relay.listeners import MultiRegistry
from translator.relay.multicast import MulticastHub

from .context import Services
from .session import Session

log = logging.getLogger("socks64.server")

# scrypt costs ~16 MiB and some milliseconds per check: a login flood must queue, not
# multiply memory.
_CONCURRENT_PASSWORD_CHECKS = 4
_SWEEP_INTERVAL = 1.0
_SWEEP_BUDGET = 10_000  # IDs freed per sweep: ~30 ms, so a mass expiry never stalls the loop
_ACCEPT_BATCH = 64  # connections taken per wake-up, so one listener cannot starve the loop
_BACKLOG = 1024


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


def _listening_socket(endpoint: Endpoint) -> socket.socket:
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if endpoint.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Gateway:
    """A running socks64 instance."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: Resolver | None = None,
        table: AddressTable | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        rc = config.resolver
        self.resolver = resolver or Resolver(
            nameservers=rc.nameservers,
            timeout=rc.timeout,
            tries=rc.tries,
            cache_size=rc.cache_size,
            hosts_file=rc.hosts_file,
            clock=clock,
        )
        am = config.addrmap
        self.table = table or AddressTable(
            clock=clock,
            ttl=am.ttl,
            quarantine=am.quarantine,
            per_owner_quota=am.per_owner,
            capacity=am.capacity,
        )
        self.credentials = (
            Credentials.load(config.auth.users_file) if config.auth.users_file else None
        )
        self.multi = MultiRegistry()
        self.interfaces = InterfaceWatcher()
        self.multicast = MulticastHub(
            self.interfaces,
            {
                socket.AF_INET: config.udp.multicast_interface_v4,
                socket.AF_INET6: config.udp.multicast_interface_v6,
            },
        )
        outbound = partial(connect_socket, interface=config.outbound.interface)
        self.services = Services(
            config=config,
            table=self.table,
            resolver=self.resolver,
            clock=clock,
            connect=lambda addresses, port: connect_happy(
                addresses,
                port,
                prefer=rc.prefer_family,
                delay=rc.happy_eyeballs_delay,
                timeout=config.timeouts.connect,
                attempt=outbound,
            ),
            verify_password=self.verify_password,
            multi=self.multi,
            multicast=self.multicast,
            udp_drop_log=RateLimitedLog(level=logging.INFO),
        )
        self._unsubscribe: Callable[[], None] | None = None
        self.endpoints: list[Endpoint] = []
        self._listeners: list[socket.socket] = []
        self._sessions: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._auth_slots: asyncio.Semaphore | None = None
        self._full_log = RateLimitedLog()

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    async def start(self, listen: Sequence[Endpoint] | None = None) -> list[Endpoint]:
        """Open every listener; returns the bound endpoints (real ports for port 0)."""
        self._auth_slots = asyncio.Semaphore(_CONCURRENT_PASSWORD_CHECKS)
        try:
            await self.interfaces.start()
            self._unsubscribe = self.interfaces.subscribe(self._on_interface_event)
            loop = asyncio.get_running_loop()
            for endpoint in listen or self.config.listen:
                sock = _listening_socket(endpoint)
                self._listeners.append(sock)
                loop.add_reader(sock.fileno(), self._accept, sock)
                host, port = sock.getsockname()[:2]
                self.endpoints.append(Endpoint(str(host), int(port)))
        except BaseException:
            await self.close()
            raise
        self._sweeper = asyncio.create_task(self._sweep_table())
        return list(self.endpoints)

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

    def _accept(self, listener: socket.socket) -> None:
        """Readable listener: take every pending connection (no task per accept)."""
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving who we have
                self._full_log(log, "accept failed: %s", exc)
                return
            if len(self._sessions) >= self.config.limits.max_clients:
                self._full_log(
                    log,
                    "client limit of %d reached; closing connection from %s",
                    self.config.limits.max_clients,
                    peer,
                )
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.ensure_future(self._serve(Channel(sock, asyncio.get_running_loop())))
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)

    async def _serve(self, channel: Channel) -> None:
        try:
            await Session(self.services, channel).run()
        finally:
            channel.close()

    async def _sweep_table(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            freed = self.table.expire(budget=_SWEEP_BUDGET)
            if freed:
                log.debug("address table: %d idle IDs expired", freed)

    async def close(self) -> None:
        """Stop listening, end every session, and release everything held."""
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()
        tasks = list(self._sessions)
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.multi.close_all()
        self.multicast.close()
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self.interfaces.close()
        await self.resolver.close()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
