"""The gateway: listeners, client admission, shared state, and an orderly stop.

Shared state lives here and is handed to each Session: the config, the resolver, the
address table, the credentials and the BIND MULTI registry. Nothing here parses bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from addrmap import AddressTable

from .auth import Credentials
from .bind import MultiRegistry
from .config import Config, Endpoint
from .resolver import Resolver
from .session import Session

log = logging.getLogger("socks64.server")

# scrypt costs ~16 MiB and some milliseconds per check: a login flood must queue, not
# multiply memory.
_CONCURRENT_PASSWORD_CHECKS = 4
_SWEEP_INTERVAL = 5.0


class RateLimitedLog:
    """Log a recurring condition at most once per ``interval``, with a count of the rest."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, logger: logging.Logger, message: str, *args: object) -> None:
        now = self.clock()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" (and {self._suppressed} more)"
            self._suppressed = 0
        self._next = now + self.interval
        logger.warning(message, *args)


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
        self.endpoints: list[Endpoint] = []
        self._servers: list[asyncio.Server] = []
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
            for endpoint in listen or self.config.listen:
                server = await asyncio.start_server(
                    self._on_client, endpoint.host, endpoint.port, reuse_address=True, backlog=1024
                )
                self._servers.append(server)
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    self.endpoints.append(Endpoint(str(host), int(port)))
        except BaseException:
            await self.close()
            raise
        self._sweeper = asyncio.create_task(self._sweep_table())
        return list(self.endpoints)

    async def verify_password(self, user: str, password: str) -> bool:
        if self.credentials is None or self._auth_slots is None:
            return False
        async with self._auth_slots:
            return await self.credentials.verify_async(user, password)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if len(self._sessions) >= self.config.limits.max_clients:
                self._full_log(
                    log,
                    "client limit of %d reached; closing connection from %s",
                    self.config.limits.max_clients,
                    writer.get_extra_info("peername"),
                )
                return
            self._sessions.add(task)
            await Session(self, reader, writer).run()
        finally:
            self._sessions.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _sweep_table(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            freed = self.table.expire()
            if freed:
                log.debug("address table: %d idle IDs expired", freed)

    async def serve_forever(self) -> None:
        await asyncio.gather(*(server.serve_forever() for server in self._servers))

    async def close(self) -> None:
        """Stop listening, end every session, and release everything held."""
        for server in self._servers:
            server.close()
        tasks = list(self._sessions)
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        self.multi.close_all()
        await self.resolver.close()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
