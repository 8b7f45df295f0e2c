"""An :class:`addrmap.AddressTable` behind the :class:`~translator.idtable.base.Authority`
interface: the supervisor's table, and the reference the Redis backend is tested against."""

from __future__ import annotations

from collections.abc import Sequence

from addrmap import AddressTable, Owner, TableStats, Target


class TableAuthority:
    """Serves one in-memory table; every call completes at once."""

    def __init__(self, table: AddressTable) -> None:
        self.table = table

    async def associate(self, owner: Owner, target: Target) -> int:
        return self.table.associate(owner, target)

    async def lookup(self, owner: Owner, realid: int) -> Target | None:
        return self.table.lookup(owner, realid)

    async def touch(self, uses: Sequence[tuple[Owner, int]]) -> None:
        lookup = self.table.lookup
        for owner, realid in uses:
            lookup(owner, realid)

    async def expire(self) -> int:
        return self.table.expire()

    async def stats(self) -> TableStats:
        return self.table.stats

    async def close(self) -> None:
        return None
