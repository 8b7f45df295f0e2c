"""The table held in this process: one gateway process with the memory backend.

With ``addrmap.state_file`` the table is saved there (atomically) every few seconds when it
changed and at stop, and loaded at start, so a restart neither forgets a live ID nor
reissues a quarantined REALID (wire profile, section 4).
"""

from __future__ import annotations

import asyncio
import logging
import time

from addrmap import AddressTable, Owner, TableStats, Target
from addrmap.snapshot import restore, snapshot

from . import statefile
from .base import Ids

log = logging.getLogger("socks64.idtable")

_SWEEP_BUDGET = 10_000  # entries examined per maintain(): bounds the pause
_SAVE_INTERVAL = 5.0  # seconds between saves of a changed table
_REFRESH_INTERVAL = 30.0  # and between saves of a table whose IDs are only being used: the
# idle times saved then are at most this old after a crash (a stop always saves)


class LocalIds(Ids):
    """An :class:`AddressTable` in this process: every answer is immediate."""

    def __init__(self, table: AddressTable, *, state_file: str | None = None) -> None:
        self.table = table
        self.state_file = state_file
        self._saved_issued = -1
        self._saved_freed = -1
        self._next_save = 0.0
        self._last_save = 0.0
        self._save_failing = False
        self._saving = asyncio.Lock()

    def cached(self, owner: Owner, realid: int) -> Target | None:
        return self.table.lookup(owner, realid)

    async def lookup(self, owner: Owner, realid: int) -> Target | None:
        return self.table.lookup(owner, realid)

    def cached_id(self, owner: Owner, target: Target) -> int | None:
        return self.table.find(owner, target)

    def associate_now(self, owner: Owner, target: Target) -> int:
        return self.table.associate(owner, target)

    async def associate(self, owner: Owner, target: Target) -> int:
        return self.table.associate(owner, target)

    def pin(self, owner: Owner, realid: int) -> bool:
        return self.table.pin(owner, realid)

    def unpin(self, owner: Owner, realid: int) -> None:
        self.table.unpin(owner, realid)

    async def maintain(self) -> int:
        freed = self.table.expire(budget=_SWEEP_BUDGET)
        now = self.table.clock()
        if self.state_file is not None and now >= self._next_save:
            self._next_save = now + _SAVE_INTERVAL
            refresh = len(self.table) and now - self._last_save >= _REFRESH_INTERVAL
            await self.save(only_if_changed=not refresh)
        return freed

    @property
    def stats(self) -> TableStats:
        return self.table.stats

    def __len__(self) -> int:
        return len(self.table)

    # -- persistence --------------------------------------------------------------------

    async def start(self) -> None:
        await self.load()

    async def close(self) -> None:
        await self.save()

    async def load(self) -> int:
        """Restore the saved table into the (empty) table; a bad file is logged, not fatal.
        Reading and parsing run in a thread (a million IDs take seconds)."""
        if self.state_file is None:
            return 0
        try:
            loaded = await asyncio.to_thread(statefile.load, self.state_file)
        except statefile.StateFileError as exc:
            log.error("%s; starting with an empty ID table", exc)
            return 0
        if loaded is None:
            return 0
        snap, saved_at = loaded
        restored = restore(self.table, snap, max(0.0, time.time() - saved_at))
        log.info(
            "ID table: %d live IDs and %d quarantined restored from %s",
            restored,
            self.table.stats.quarantined,
            self.state_file,
        )
        self._mark_saved(self.table.stats)
        return restored

    async def save(self, *, only_if_changed: bool = False) -> None:
        """Write the table to ``state_file`` (logged once while it keeps failing). The
        snapshot is taken here; encoding and writing it run in a thread."""
        if self.state_file is None:
            return
        async with self._saving:  # the periodic save and the one at stop never overlap
            stats = self.table.stats
            if only_if_changed and (stats.issued, stats.freed) == (
                self._saved_issued,
                self._saved_freed,
            ):
                return
            snap = snapshot(self.table)
            saved_at = time.time()
            try:
                await asyncio.to_thread(statefile.save, self.state_file, snap, saved_at=saved_at)
            except OSError as exc:
                if not self._save_failing:
                    log.error("cannot save the ID table to %s: %s", self.state_file, exc)
                    self._save_failing = True
                return
            if self._save_failing:
                log.info("ID table saved to %s again", self.state_file)
                self._save_failing = False
            self._mark_saved(stats)

    def _mark_saved(self, stats: TableStats) -> None:
        """What was saved: the table as of ``stats`` (later changes are saved next time)."""
        self._last_save = self.table.clock()
        self._saved_issued, self._saved_freed = stats.issued, stats.freed
