"""The table the supervisor holds for its workers, over their control links.

Worker side: :class:`LinkAuthority`, the authority behind a worker's
:class:`~translator.idtable.cache.CachedIds`. Supervisor side: :func:`serve_request`, which
answers a worker's table requests from the supervisor's :class:`addrmap.AddressTable`.

Why the supervisor, not shared memory: the table stays the pure, tested AddressTable with
every rule of the profile (uniqueness, quarantine, global quotas and capacity) in one
place; a worker asks only for what it has not seen (about 30 us on a Unix socket), and
every ID it has seen is answered from its cache at memory speed. No extra service is
needed on a fresh machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from addrmap import AddressTable, AddrMapError, Owner, TableStats, Target

from .base import TableUnavailable

#: how long a worker waits for the supervisor before answering REP X'01'
_WAIT = 2.0


class Link(Protocol):
    async def call(self, kind: str, payload: Any = None, *, wait: float = 5.0) -> Any: ...

    def notify(self, kind: str, payload: Any = None) -> None: ...


class LinkAuthority:
    """A worker's view of the supervisor's table."""

    def __init__(self, link: Link) -> None:
        self.link = link

    async def _call(self, kind: str, payload: Any) -> Any:
        try:
            return await self.link.call(kind, payload, wait=_WAIT)
        except AddrMapError:
            raise  # a limit or a bad target: the table's answer, as in one process
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            # RuntimeError: the supervisor failed on it (its log says why)
            raise TableUnavailable(f"the supervisor's ID table: {exc or 'no answer'}") from None

    async def associate(self, owner: Owner, target: Target) -> int:
        return int(await self._call("table.associate", (owner, target)))

    async def lookup(self, owner: Owner, realid: int) -> Target | None:
        target: Target | None = await self._call("table.lookup", (owner, realid))
        return target

    async def touch(self, uses: Sequence[tuple[Owner, int]]) -> None:
        self.link.notify("table.touch", list(uses))  # ordered after earlier requests

    async def expire(self) -> int:
        return 0  # the supervisor sweeps its own table

    async def stats(self) -> TableStats:
        stats: TableStats = await self._call("table.stats", None)
        return stats

    async def close(self) -> None:
        return None


def serve_request(table: AddressTable, kind: str, payload: Any) -> Any:
    """Answer one ``table.*`` request of a worker (errors travel back to it)."""
    if kind == "table.lookup":
        return table.lookup(*payload)
    if kind == "table.associate":
        return table.associate(*payload)
    if kind == "table.touch":
        lookup = table.lookup
        for owner, realid in payload:
            lookup(owner, realid)
        return None
    if kind == "table.stats":
        return table.stats
    raise ValueError(f"unknown table request {kind!r}")
