"""A worker's cache of the shared table: what it has seen, answered without waiting.

An entry (REALID -> owner, target) never changes while it lives, so a worker keeps every
entry it has looked up or associated, with the time it last knew the entry in use, and
trusts it for ``ttl`` from then. Uses are batched to the authority every
:data:`~translator.idtable.base.FLUSH_INTERVAL` (pinned IDs are touched at each flush:
that is how a pin keeps an entry alive in a shared table, and a crashed worker's pins
lapse on their own after the TTL). The authority keeps entries :data:`GRACE` seconds
longer than a cache trusts them, so an entry this cache calls live is live there too:
associate stays idempotent and no cached ID can point at a reissued REALID.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from addrmap import Owner, TableStats, Target

from .base import Authority, Ids, TableUnavailable

log = logging.getLogger("socks64.idtable")

_EMPTY = TableStats(0, 0, 0, 0, 0, 0, 0)


class _Known:
    __slots__ = ("last_use", "owner", "target")

    def __init__(self, owner: Owner, target: Target, last_use: float) -> None:
        self.owner = owner
        self.target = target
        self.last_use = last_use


def _target_key(target: Target) -> Target:
    if isinstance(target, str):
        return target.lower()
    return target


class CachedIds(Ids):
    """The session-facing table of a worker or of a gateway sharing Redis."""

    def __init__(self, authority: Authority, *, ttl: float, clock: Callable[[], float]) -> None:
        self.authority = authority
        self.ttl = ttl
        self._clock = clock
        self._by_id: dict[int, _Known] = {}
        self._by_target: dict[tuple[Owner, Target], int] = {}
        self._used: dict[int, Owner] = {}  # uses since the last flush
        self._pins: dict[int, int] = {}
        self._stats = _EMPTY
        self._failing = False
        self.hits = 0
        self.misses = 0

    # -- without waiting ------------------------------------------------------------------

    def cached(self, owner: Owner, realid: int) -> Target | None:
        known = self._by_id.get(realid)
        if known is None or known.owner != owner:
            return None
        now = self._clock()
        if now - known.last_use >= self.ttl and realid not in self._pins:
            return None  # maybe used elsewhere since: lookup() asks
        known.last_use = now
        self._used[realid] = owner
        self.hits += 1
        return known.target

    def cached_id(self, owner: Owner, target: Target) -> int | None:
        realid = self._by_target.get((owner, _target_key(target)))
        if realid is None:
            return None
        return realid if self.cached(owner, realid) is not None else None

    def pin(self, owner: Owner, realid: int) -> bool:
        known = self._by_id.get(realid)
        if known is None or known.owner != owner:
            return False
        now = self._clock()
        if now - known.last_use >= self.ttl and realid not in self._pins:
            return False
        self._pins[realid] = self._pins.get(realid, 0) + 1
        known.last_use = now
        self._used[realid] = owner
        return True

    def unpin(self, owner: Owner, realid: int) -> None:
        count = self._pins.get(realid)
        known = self._by_id.get(realid)
        if count is None or known is None or known.owner != owner:
            return
        if count > 1:
            self._pins[realid] = count - 1
            return
        del self._pins[realid]
        known.last_use = self._clock()
        self._used[realid] = owner  # the idle TTL starts again from now, everywhere

    # -- asking the authority -------------------------------------------------------------

    async def lookup(self, owner: Owner, realid: int) -> Target | None:
        target = self.cached(owner, realid)
        if target is not None:
            return target
        self.misses += 1
        target = await self.authority.lookup(owner, realid)
        if target is not None:
            self._remember(realid, owner, target)
        return target

    async def associate(self, owner: Owner, target: Target) -> int:
        realid = self.cached_id(owner, target)
        if realid is not None:
            return realid
        self.misses += 1
        realid = await self.authority.associate(owner, target)
        self._remember(realid, owner, target.lower() if isinstance(target, str) else target)
        return realid

    def _remember(self, realid: int, owner: Owner, target: Target) -> None:
        old = self._by_id.get(realid)
        if old is not None and (old.owner, old.target) != (owner, target):
            # Reissued after its quarantine; what we knew was stale (and unpinned).
            self._by_target.pop((old.owner, _target_key(old.target)), None)
        self._by_id[realid] = _Known(owner, target, self._clock())
        self._by_target[(owner, _target_key(target))] = realid

    # -- periodic -------------------------------------------------------------------------

    async def maintain(self) -> int:
        """Flush uses and pins, let the authority expire, forget what expired here."""
        now = self._clock()
        uses = list(self._used.items())
        uses += [(r, self._by_id[r].owner) for r in self._pins if r not in self._used]
        self._used.clear()
        freed = 0
        try:
            if uses:
                await self.authority.touch([(owner, realid) for realid, owner in uses])
            freed = await self.authority.expire()
            self._stats = await self.authority.stats()
        except TableUnavailable as exc:
            for realid, owner in uses:  # tried again at the next flush
                self._used.setdefault(realid, owner)
            if not self._failing:
                log.warning("shared ID table unavailable: %s", exc)
                self._failing = True
            return 0
        if self._failing:
            log.info("shared ID table reachable again")
            self._failing = False
        self._forget_expired(now)
        return freed

    def _forget_expired(self, now: float) -> None:
        ttl = self.ttl
        pins = self._pins
        stale = [
            r for r, k in self._by_id.items() if now - k.last_use >= ttl and r not in pins
        ]
        for realid in stale:
            known = self._by_id.pop(realid)
            key = (known.owner, _target_key(known.target))
            if self._by_target.get(key) == realid:
                del self._by_target[key]

    @property
    def stats(self) -> TableStats:
        """The authority's counters as of the last flush; pins are this process's own."""
        return dataclasses.replace(self._stats, pinned=len(self._pins))

    def __len__(self) -> int:
        return self._stats.live

    async def close(self) -> None:
        """Flush the last uses (best effort), then disconnect."""
        uses = [(owner, realid) for realid, owner in self._used.items()]
        self._used.clear()
        try:
            if uses:
                await self.authority.touch(uses)
        except TableUnavailable:
            pass
        finally:
            await self.authority.close()
