"""CachedIds: a worker's cache in front of the shared table (here an in-memory authority).

The authority keeps entries GRACE seconds longer than the cache trusts them; these tests
drive one fake clock for both, as the supervisor and its workers share CLOCK_MONOTONIC.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address

import pytest

from addrmap import AddressTable, Owner, QuotaExceeded, TableStats, Target
from tests.unit.fakes import FakeClock
from translator.idtable import GRACE, CachedIds, TableUnavailable
from translator.idtable.authority import TableAuthority

TTL = 60.0
ALICE = Owner("192.0.2.10")
BOB = Owner("198.51.100.20", "bob")
V6 = IPv6Address("2001:db8:6::6")
V4 = IPv4Address("203.0.113.4")


class CountingAuthority(TableAuthority):
    """The real table, counting what reaches it, and able to go away."""

    def __init__(self, table: AddressTable) -> None:
        super().__init__(table)
        self.calls: list[str] = []
        self.down = False

    def _reach(self, what: str) -> None:
        if self.down:
            raise TableUnavailable("down for the test")
        self.calls.append(what)

    async def associate(self, owner: Owner, target: Target) -> int:
        self._reach("associate")
        return await super().associate(owner, target)

    async def lookup(self, owner: Owner, realid: int) -> Target | None:
        self._reach("lookup")
        return await super().lookup(owner, realid)

    async def touch(self, uses: Sequence[tuple[Owner, int]]) -> None:
        self._reach("touch")
        await super().touch(uses)

    async def stats(self) -> TableStats:
        self._reach("stats")
        return await super().stats()


def make(quota: int = 100) -> tuple[CachedIds, CachedIds, CountingAuthority, FakeClock]:
    clock = FakeClock()
    table = AddressTable(clock=clock, ttl=TTL + GRACE, quarantine=600, per_owner_quota=quota)
    authority = CountingAuthority(table)
    first = CachedIds(authority, ttl=TTL, clock=clock)
    second = CachedIds(authority, ttl=TTL, clock=clock)
    return first, second, authority, clock


async def test_an_id_is_asked_for_once_then_answered_here() -> None:
    worker, other, authority, _ = make()
    realid = await other.associate(ALICE, "V6.Example.TEST")
    assert worker.cached(ALICE, realid) is None  # never seen here
    assert await worker.lookup(ALICE, realid) == "v6.example.test"
    authority.calls.clear()
    for _ in range(100):
        assert await worker.lookup(ALICE, realid) == "v6.example.test"
        assert worker.cached(ALICE, realid) == "v6.example.test"
    assert authority.calls == []
    assert await worker.associate(ALICE, "v6.example.test") == realid  # idempotent, cached
    assert authority.calls == []


async def test_another_owner_gets_nothing_here_or_there() -> None:
    worker, other, _, _ = make()
    realid = await other.associate(ALICE, V6)
    assert await worker.lookup(BOB, realid) is None
    assert worker.cached(BOB, realid) is None
    assert await other.lookup(BOB, realid) is None


async def test_uses_here_keep_the_id_alive_there() -> None:
    worker, other, _, clock = make()
    realid = await worker.associate(ALICE, V4)
    for _ in range(5):  # used here every 40 s, each use flushed at the next maintain
        clock.now += 40
        assert worker.cached(ALICE, realid) == V4
        await worker.maintain()
    assert await other.lookup(ALICE, realid) == V4  # 200 s later, alive for everyone
    clock.now += TTL + GRACE + 1
    await worker.maintain()
    await other.maintain()
    assert await other.lookup(ALICE, realid) is None
    assert await worker.lookup(ALICE, realid) is None


async def test_the_cache_never_trusts_an_entry_longer_than_the_table_keeps_it() -> None:
    worker, other, _, clock = make()
    realid = await other.associate(ALICE, V6)
    assert await worker.lookup(ALICE, realid) == V6
    clock.now += TTL - 1
    assert worker.cached(ALICE, realid) == V6  # a use: trusted for another TTL from now
    clock.now += TTL  # no flush happened: the table saw no use since the lookup
    assert worker.cached(ALICE, realid) is None  # asks again rather than guess
    # The table saw its last use at the lookup, 2 TTLs ago: gone there, and so here.
    assert await worker.lookup(ALICE, realid) is None


async def test_a_pin_keeps_an_id_alive_across_flushes_and_unpin_restarts_the_clock() -> None:
    worker, other, _, clock = make()
    realid = await worker.associate(ALICE, V6)
    assert worker.pin(ALICE, realid)
    for _ in range(10):
        clock.now += TTL / 2
        await worker.maintain()
    assert await other.lookup(ALICE, realid) == V6  # 5 TTLs later
    worker.unpin(ALICE, realid)
    await worker.maintain()
    clock.now += TTL - 1
    assert await other.lookup(ALICE, realid) == V6
    assert worker.stats.pinned == 0


async def test_pin_needs_an_id_known_here() -> None:
    worker, other, _, _ = make()
    realid = await other.associate(ALICE, V6)
    assert not worker.pin(ALICE, realid)
    assert await worker.lookup(ALICE, realid) == V6
    assert not worker.pin(BOB, realid)
    assert worker.pin(ALICE, realid)


async def test_limits_are_the_tables() -> None:
    worker, other, _, _ = make(quota=2)
    await worker.associate(ALICE, V4)
    await other.associate(ALICE, V6)
    with pytest.raises(QuotaExceeded):
        await worker.associate(ALICE, "third.example.test")


async def test_an_unreachable_table_fails_misses_and_keeps_uses_for_later() -> None:
    worker, other, authority, clock = make()
    realid = await worker.associate(ALICE, V4)
    authority.down = True
    assert worker.cached(ALICE, realid) == V4  # what is known here still works
    with pytest.raises(TableUnavailable):
        await worker.associate(ALICE, V6)
    with pytest.raises(TableUnavailable):
        await worker.lookup(BOB, 12345)
    clock.now += 30
    assert worker.cached(ALICE, realid) == V4
    assert await worker.maintain() == 0  # the use could not be sent: kept
    authority.down = False
    await worker.maintain()
    clock.now += TTL + GRACE - 31
    assert await other.lookup(ALICE, realid) == V4  # the use made while down arrived


async def test_stats_are_the_tables_as_of_the_last_flush() -> None:
    worker, _, _, _ = make()
    await worker.associate(ALICE, V4)
    await worker.associate(BOB, V6)
    assert len(worker) == 0
    await worker.maintain()
    assert len(worker) == 2 and worker.stats.owners == 2
