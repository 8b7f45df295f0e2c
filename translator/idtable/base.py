"""The gateway's view of the ADDRESS ID table, wherever the table lives.

One process with the memory backend holds an :class:`addrmap.AddressTable` itself
(:class:`~translator.idtable.local.LocalIds`). Worker processes, and gateways sharing
Redis, keep a cache of the entries they have seen in front of one *authority* (the
supervisor's table, or Redis) and ask it only for what they have not seen
(:class:`~translator.idtable.cache.CachedIds`). The session code sees one interface:
synchronous for what is known here (a datagram's ID, a pin), awaitable for the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

from addrmap import AddrMapError, Owner, TableStats, Target

#: Seconds between a worker's batches of uses (touches) to the authority.
FLUSH_INTERVAL = 1.0  # the gateway's sweeper runs maintain() once a second
#: The authority keeps an entry this much longer than a worker's cache trusts it, so a use
#: a worker has made and not yet flushed always reaches the authority before the entry
#: could expire there.
GRACE = 5.0


class TableUnavailable(AddrMapError):
    """The shared table cannot be reached (Redis down, supervisor gone): REP X'01'."""


class Authority(Protocol):
    """The one source of truth behind worker caches: every call may wait on I/O and
    raise :class:`TableUnavailable`; limits and errors are those of AddressTable."""

    async def associate(self, owner: Owner, target: Target) -> int:
        """The owner's ID for ``target``, created if needed (a use)."""
        ...

    async def lookup(self, owner: Owner, realid: int) -> Target | None:
        """What ``realid`` names for ``owner`` (a use), or None: unknown, expired, foreign."""
        ...

    async def touch(self, uses: Sequence[tuple[Owner, int]]) -> None:
        """Record a batch of uses (refresh the idle TTL); unknown IDs are ignored."""
        ...

    async def expire(self) -> int:
        """Free what is due (a shared backend is swept by every gateway); returns freed."""
        ...

    async def stats(self) -> TableStats:
        """The whole table's counters."""
        ...

    async def close(self) -> None: ...


class Ids(ABC):
    """What sessions use: the table of one gateway, local or shared."""

    @abstractmethod
    def cached(self, owner: Owner, realid: int) -> Target | None:
        """The target if it is known here without waiting (a use), else None: then ask
        :meth:`lookup`, which knows for sure."""

    @abstractmethod
    async def lookup(self, owner: Owner, realid: int) -> Target | None:
        """What ``realid`` names for ``owner`` (a use); None when unknown, expired or
        another owner's. Raises :class:`TableUnavailable`."""

    @abstractmethod
    def cached_id(self, owner: Owner, target: Target) -> int | None:
        """The owner's live ID for ``target`` if known here without waiting (a use)."""

    def associate_now(self, owner: Owner, target: Target) -> int | None:
        """:meth:`associate` if it can be answered without waiting (a use), else None."""
        return self.cached_id(owner, target)

    @abstractmethod
    async def associate(self, owner: Owner, target: Target) -> int:
        """The owner's ID for ``target``, created if needed. Raises LimitExceeded,
        InvalidTarget, :class:`TableUnavailable`."""

    @abstractmethod
    def pin(self, owner: Owner, realid: int) -> bool:
        """Keep an ID just looked up or associated alive while a session uses it."""

    @abstractmethod
    def unpin(self, owner: Owner, realid: int) -> None:
        """Drop one pin; the idle TTL starts again from now when the last goes."""

    @abstractmethod
    async def maintain(self) -> int:
        """Periodic work (about every second): expiry, flushing uses, saving state.
        Returns how many IDs were freed here."""

    @property
    @abstractmethod
    def stats(self) -> TableStats:
        """The table's counters (for a shared table: as of the last :meth:`maintain`)."""

    @abstractmethod
    def __len__(self) -> int:
        """Live IDs (of the whole table)."""

    async def start(self) -> None:  # noqa: B027 - most tables have nothing to do
        """Connect, or load saved state."""

    async def close(self) -> None:  # noqa: B027
        """Save state and disconnect."""
