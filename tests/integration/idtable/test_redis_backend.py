"""The Redis backend of the ADDRESS ID table against a real redis-server.

* A property test runs random sequences of associate / lookup / touch / clock moves /
  expire against both :class:`TableAuthority` (the in-memory AddressTable) and
  :class:`RedisAuthority`, and requires the same answers: the same successes and errors
  at the same steps, the same targets, the same counters after each expire, and the same
  pattern of ID equality (IDs are random, so backend A's IDs are mapped to backend B's
  and the mapping must stay a bijection over live entries).
* Directed tests: random non-zero IDs, owner isolation, exact idle TTL, the quarantine
  (through the ``_candidates`` seam), limits, two gateways on one Redis, key prefixes,
  and outages: a stopped server, a hung one, and its return.

Times: the fake clock moves by whole seconds and the property test's TTL and quarantine
end on half and quarter seconds, so the memory table's rounding of last-use times (up
by ttl/16384) and of quarantine ends (up by quarantine/1024) never changes which side of
a deadline a step lands on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from addrmap import (
    MAX_REALID,
    AddressTable,
    CapacityExceeded,
    InvalidTarget,
    LimitExceeded,
    Owner,
    QuotaExceeded,
    TableStats,
    Target,
)
from tests.redisfixture import RedisServer
from tests.unit.fakes import FakeClock
from translator.idtable import TableUnavailable
from translator.idtable.authority import TableAuthority
from translator.idtable.redis_backend import RedisAuthority, redact

ALICE = Owner("192.0.2.1", "alice")
BOB = Owner("198.51.100.7")
CAROL = Owner("2001:db8::5", "carol")
OWNERS = [Owner("192.0.2.1"), ALICE, BOB, CAROL]

NAME_255 = ("a" * 59 + ".") * 4 + "bb.example.test"
NAME_256 = "c" + NAME_255
assert len(NAME_255) == 255 and len(NAME_256) == 256

TARGETS: list[Any] = [
    IPv4Address("192.0.2.10"),
    IPv4Address("198.51.100.20"),
    IPv6Address("2001:db8::10"),
    IPv6Address("2001:db8::10%eth0"),  # a zone: another target than the one above
    IPv6Address("::ffff:192.0.2.10"),  # not the IPv4 address of the same value
    "www.example.test",
    "WWW.Example.TEST",  # the same target as the one above
    "mail.example.test",
    NAME_255,
    NAME_256,  # invalid: too long
    "",  # invalid: empty
    42,  # invalid: not a target
]


def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@contextlib.asynccontextmanager
async def authority(url: str, clock: FakeClock, **overrides: Any) -> AsyncIterator[RedisAuthority]:
    settings_: dict[str, Any] = {
        "ttl": 10.0,
        "quarantine": 20.0,
        "per_owner_quota": 100,
        "capacity": 1000,
        "prefix": prefix(),
    }
    settings_.update(overrides)
    table = RedisAuthority(url, clock=clock, **settings_)
    try:
        yield table
    finally:
        await table.close()


@contextlib.asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


class ScriptedIds(RedisAuthority):
    """Draws candidate IDs from ``draws`` (one list per draw) instead of at random."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.draws: list[list[int]] = []
        self.drawn = 0

    def _candidates(self, count: int) -> list[int]:
        self.drawn += 1
        return self.draws.pop(0) if self.draws else []


# --------------------------------------------------------------------- property test

P_TTL = 10.5
P_QUARANTINE = 20.25
P_QUOTA = 2
P_CAPACITY = 5
STEPS = [0, 1, 2, 3, 5, 8, 10, 11, 21, 31]

_owner = st.integers(0, len(OWNERS) - 1)
_user = st.one_of(st.none(), _owner)  # None: the owner the ID was issued to
_ref = st.one_of(st.none(), st.integers(0, 63))  # None: an ID never issued
_associate = st.tuples(st.just("associate"), _owner, st.integers(0, len(TARGETS) - 1))
_reassociate = st.tuples(st.just("associate"), _owner, st.integers(0, 3))  # repeats, limits
_ops = st.lists(
    st.one_of(
        _associate,
        _reassociate,
        _reassociate,
        st.tuples(st.just("lookup"), _user, _ref),
        st.tuples(st.just("lookup"), _user, _ref),
        st.tuples(st.just("touch"), st.lists(st.tuples(_user, _ref), max_size=4)),
        st.tuples(st.just("advance"), st.sampled_from(STEPS)),
        st.tuples(st.just("expire")),
    ),
    min_size=10,
    max_size=60,
)


async def outcome(call: Awaitable[Any]) -> tuple[Any, ...]:
    try:
        return ("ok", await call)
    except LimitExceeded as exc:
        return ("refused", type(exc), exc.limit, exc.value)
    except InvalidTarget:
        return ("invalid",)


def same_target(a: Target | None, b: Target | None) -> bool:
    return type(a) is type(b) and str(a) == str(b)


class Comparison:
    """Runs each operation on both backends and checks they agree."""

    def __init__(self, memory: TableAuthority, shared: RedisAuthority, clock: FakeClock) -> None:
        self.memory = memory
        self.shared = shared
        self.clock = clock
        # every (memory ID, redis ID, owner) seen
        self.issued: list[tuple[int, int, Owner]] = []
        # the bijection over live entries: memory ID -> (redis ID, owner), and back
        self.a_to_b: dict[int, tuple[int, Owner]] = {}
        self.b_to_a: dict[int, int] = {}

    def use(self, user: int | None, ref: int | None) -> tuple[Owner, int, int]:
        """Who uses which ID: (owner, memory ID, redis ID)."""
        if ref is None or not self.issued:
            issued = {realid for a, b, _ in self.issued for realid in (a, b)}
            unknown = 0x5A5A5A
            while unknown in issued:
                unknown += 1
            return OWNERS[user or 0], unknown, unknown
        a, b, owner = self.issued[ref % len(self.issued)]
        return (owner if user is None else OWNERS[user]), a, b

    def prune(self) -> None:
        """Forget pairs whose entry is no longer live: a reissued ID is a fresh one."""
        table = self.memory.table
        for a, (b, owner) in list(self.a_to_b.items()):
            if table.peek(owner, a) is None:
                del self.a_to_b[a]
                del self.b_to_a[b]

    async def run(self, op: tuple[Any, ...], step: int) -> None:
        kind = op[0]
        where = f"step {step}: {op!r}"
        if kind == "associate":
            owner, target = OWNERS[op[1]], TARGETS[op[2]]
            self.prune()
            a = await outcome(self.memory.associate(owner, target))
            b = await outcome(self.shared.associate(owner, target))
            event(f"associate: {a[0]} {a[2] if a[0] == 'refused' else ''}")
            assert a[0] == b[0], f"{where}: memory {a}, redis {b}"
            if a[0] != "ok":
                assert a == b, where
                return
            id_a, id_b = a[1], b[1]
            assert 0 < id_b <= MAX_REALID, where
            if id_a in self.a_to_b:
                assert self.a_to_b[id_a][0] == id_b, f"{where}: same entry, another ID"
            else:
                assert id_b not in self.b_to_a, f"{where}: redis reused a live ID"
                self.a_to_b[id_a] = (id_b, owner)
                self.b_to_a[id_b] = id_a
                self.issued.append((id_a, id_b, owner))
        elif kind == "lookup":
            owner, id_a, id_b = self.use(op[1], op[2])
            found_a = await self.memory.lookup(owner, id_a)
            found_b = await self.shared.lookup(owner, id_b)
            event(f"lookup: {'found' if found_a is not None else 'none'}")
            assert same_target(found_a, found_b), f"{where}: memory {found_a}, redis {found_b}"
        elif kind == "touch":
            uses = [self.use(user, ref) for user, ref in op[1]]
            await self.memory.touch([(owner, a) for owner, a, _ in uses])
            await self.shared.touch([(owner, b) for owner, _, b in uses])
        elif kind == "advance":
            self.clock.now += op[1]
        else:
            await self.memory.expire()
            await self.shared.expire()
            await self.same_stats(where)
            return
        await self.same_refusals(where)

    async def same_stats(self, where: str) -> None:
        a, b = await self.memory.stats(), await self.shared.stats()
        assert a == b, f"{where}: memory {a}, redis {b}"

    async def same_refusals(self, where: str) -> None:
        a, b = await self.memory.stats(), await self.shared.stats()
        assert (a.quota_refusals, a.capacity_refusals) == (
            b.quota_refusals,
            b.capacity_refusals,
        ), f"{where}: memory {a}, redis {b}"


async def compare(url: str, ops: Sequence[tuple[Any, ...]]) -> None:
    clock = FakeClock(1000.0)
    limits: dict[str, Any] = {
        "ttl": P_TTL,
        "quarantine": P_QUARANTINE,
        "per_owner_quota": P_QUOTA,
        "capacity": P_CAPACITY,
    }
    memory = TableAuthority(AddressTable(clock=clock, **limits))
    async with authority(url, clock, **limits) as shared:
        check = Comparison(memory, shared, clock)
        for step, op in enumerate(ops):
            await check.run(op, step)
        clock.now += 32  # past every TTL and quarantine: the counters still agree
        await check.run(("expire",), len(ops))
        assert (await shared.stats()).live == 0


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=_ops)
def test_redis_backend_behaves_like_the_memory_table(
    redis_server: RedisServer, ops: list[tuple[Any, ...]]
) -> None:
    # One server for every example; each example has a fresh key prefix.
    asyncio.run(compare(redis_server.url, ops))


# ---------------------------------------------------------------------- directed tests


async def test_ids_are_random_non_zero_and_distinct(redis_server: RedisServer) -> None:
    async with authority(redis_server.url, FakeClock()) as table:
        ids = [await table.associate(OWNERS[i % 4], f"h{i}.example.test") for i in range(300)]
    assert all(0 < realid <= MAX_REALID for realid in ids)
    assert len(set(ids)) == len(ids)
    assert ids != sorted(ids)
    steps = [b - a for a, b in itertools.pairwise(ids)]
    assert sum(1 for step in steps if abs(step) == 1) < 3  # not sequential
    assert max(ids) - min(ids) > 1 << 20  # spread over the 24-bit space


async def test_targets_round_trip_as_the_same_type(redis_server: RedisServer) -> None:
    owner = OWNERS[0]
    async with authority(redis_server.url, FakeClock()) as table:
        valid = TARGETS[:9]
        ids = [await table.associate(owner, target) for target in valid]
        for target, realid in zip(valid, ids, strict=True):
            found = await table.lookup(owner, realid)
            expected = target.lower() if isinstance(target, str) else target
            assert type(found) is type(expected) and str(found) == str(expected)
            assert await table.associate(owner, target) == realid  # the same ID again
        zoned = await table.lookup(owner, ids[3])
        assert isinstance(zoned, IPv6Address) and zoned.scope_id == "eth0"
        assert ids[5] == ids[6]  # names are case-insensitive
        # Otherwise every target has its own ID: v4 vs ::ffff:v4, zone vs none.
        assert len({*ids[:6], *ids[7:]}) == 8
        for bad in (NAME_256, "", 42, b"www.example.test"):
            with pytest.raises(InvalidTarget):
                await table.associate(owner, cast(Target, bad))


async def test_another_owner_sees_nothing(redis_server: RedisServer) -> None:
    clock = FakeClock()
    async with authority(redis_server.url, clock) as table:
        realid = await table.associate(ALICE, "www.example.test")
        for other in (Owner("192.0.2.1"), Owner("192.0.2.1", ""), BOB):
            assert await table.lookup(other, realid) is None
            assert await table.associate(other, "www.example.test") != realid
        # Another owner's uses do not keep the ID alive, nor free it.
        clock.now += 6
        await table.touch([(BOB, realid)])
        assert await table.lookup(BOB, realid) is None
        assert await table.lookup(ALICE, realid) == "www.example.test"
        clock.now += 10
        await table.touch([(BOB, realid)])
        assert await table.lookup(ALICE, realid) is None


async def test_idle_ttl_is_exact_and_counted_from_last_use(redis_server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with authority(redis_server.url, clock, ttl=10.0) as table:
        realid = await table.associate(ALICE, "www.example.test")
        clock.now = 1009.75
        assert await table.lookup(ALICE, realid) == "www.example.test"  # refreshed
        clock.now = 1019.5
        await table.touch([(ALICE, realid)])  # refreshed
        clock.now = 1029.25
        assert await table.associate(ALICE, "www.example.test") == realid  # a use too
        clock.now = 1039.25  # idle exactly ttl: gone
        assert await table.lookup(ALICE, realid) is None
        stats = await table.stats()
        assert (stats.live, stats.owners, stats.freed, stats.quarantined) == (0, 0, 1, 1)
        assert await table.associate(ALICE, "www.example.test") != realid

        ids = [await table.associate(BOB, f"h{i}.example.test") for i in range(3)]
        clock.now += 9.75
        assert await table.expire() == 0
        await table.touch([(BOB, ids[0])])
        clock.now += 0.25
        assert await table.expire() == 3  # ALICE's entry and two of BOB's
        assert await table.lookup(BOB, ids[0]) == "h0.example.test"


async def test_expire_does_bounded_work(redis_server: RedisServer) -> None:
    clock = FakeClock()
    async with authority(redis_server.url, clock, quarantine=5.0) as table:
        table.SWEEP_BUDGET = 5
        for i in range(12):
            await table.associate(BOB, f"h{i}.example.test")
        clock.now += 10
        assert [await table.expire() for _ in range(4)] == [5, 5, 2, 0]
        assert (await table.stats()).quarantined == 12
        clock.now += 5
        await table.expire()
        assert (await table.stats()).quarantined == 7
        await table.expire()
        await table.expire()
        assert await table.stats() == TableStats(0, 0, 0, 0, 12, 0, 0)


async def test_a_freed_id_stays_in_quarantine(redis_server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with (
        authority(redis_server.url, clock, ttl=10.0, quarantine=20.0) as plain,
        raw_client(redis_server.url) as raw,
    ):
        table = ScriptedIds(redis_server.url, clock=clock, ttl=10.0, quarantine=20.0,
                            per_owner_quota=10, capacity=100, prefix=plain.prefix)  # fmt: skip
        try:
            table.draws = [[0, MAX_REALID + 1, 111]]  # 0 and out-of-range draws are skipped
            assert await table.associate(ALICE, "a.example.test") == 111
            clock.now = 1010.0
            assert await table.expire() == 1
            # Quarantined until it expired (1010) + 20 s, for every owner.
            assert await raw.zscore(f"{table.prefix}q", "111") == 1030.0
            table.draws = [[111, 222], [111, 333]]
            assert await table.associate(ALICE, "a.example.test") == 222
            assert await table.associate(BOB, "b.example.test") == 333
            clock.now = 1029.75
            table.draws = [[111, 444]]
            assert await table.associate(CAROL, "c.example.test") == 444
            clock.now = 1030.0  # free again, even before expire() removes it
            table.draws = [[222, 111]]  # 222 is live
            assert await table.associate(CAROL, "d.example.test") == 111
            assert await table.lookup(CAROL, 111) == "d.example.test"
            assert await raw.zscore(f"{table.prefix}q", "111") is None

            # An entry noticed late is quarantined from when it expired, not when seen.
            clock.now = 2000.0
            table.draws = [[555]]
            await table.associate(BOB, "e.example.test")
            clock.now = 2100.0
            assert await table.lookup(BOB, 555) is None
            assert await raw.zscore(f"{table.prefix}q", "555") == 2030.0
            table.draws = [[555]]
            assert await table.associate(BOB, "e.example.test") == 555
        finally:
            await table.close()


async def test_no_free_id_is_an_id_space_refusal(redis_server: RedisServer) -> None:
    clock = FakeClock()
    table = ScriptedIds(redis_server.url, clock=clock, ttl=10.0, quarantine=20.0,
                        per_owner_quota=10, capacity=100, prefix=prefix())  # fmt: skip
    try:
        table.draws = [[7]]
        assert await table.associate(ALICE, "a.example.test") == 7
        table.draws = [[7, 7]] * table.DRAW_ROUNDS
        table.drawn = 0
        with pytest.raises(CapacityExceeded) as refused:
            await table.associate(ALICE, "b.example.test")
        assert (refused.value.limit, refused.value.value) == ("id_space", MAX_REALID)
        assert table.drawn == table.DRAW_ROUNDS
        assert (await table.stats()).capacity_refusals == 1
        table.draws = [[7], [8]]  # a later draw may succeed
        assert await table.associate(ALICE, "b.example.test") == 8
    finally:
        await table.close()


async def test_quota_counts_live_entries_only(redis_server: RedisServer) -> None:
    clock = FakeClock()
    async with authority(redis_server.url, clock, per_owner_quota=2) as table:
        first = await table.associate(ALICE, "a.example.test")
        clock.now += 5
        await table.associate(ALICE, "b.example.test")
        with pytest.raises(QuotaExceeded) as refused:
            await table.associate(ALICE, "c.example.test")
        assert (refused.value.limit, refused.value.value) == ("per_owner_quota", 2)
        assert refused.value.owner == ALICE
        await table.associate(BOB, "c.example.test")  # another owner's quota
        clock.now += 5  # a.example.test (used at +0) has expired; nobody called expire()
        await table.associate(ALICE, "c.example.test")
        with pytest.raises(QuotaExceeded):
            await table.associate(ALICE, "a.example.test")
        assert await table.associate(ALICE, "b.example.test") != first  # known: no refusal
        stats = await table.stats()
        assert (stats.quota_refusals, stats.capacity_refusals, stats.freed) == (2, 0, 1)


async def test_capacity_counts_live_entries_only(redis_server: RedisServer) -> None:
    clock = FakeClock()
    async with authority(redis_server.url, clock, capacity=5) as table:
        table.SWEEP_BUDGET = 2  # fewer than are due below: the rest is counted out
        for owner in OWNERS:
            await table.associate(owner, "a.example.test")
        clock.now += 5
        await table.associate(ALICE, "b.example.test")
        with pytest.raises(CapacityExceeded) as refused:
            await table.associate(BOB, "b.example.test")
        assert (refused.value.limit, refused.value.value) == ("capacity", 5)
        clock.now += 5  # the four entries of +0 have expired
        for target in ("b.example.test", "c.example.test", "d.example.test", "e.example.test"):
            await table.associate(BOB, target)
        with pytest.raises(CapacityExceeded):
            await table.associate(CAROL, "b.example.test")
        stats = await table.stats()
        assert (stats.capacity_refusals, stats.quota_refusals, stats.freed) == (2, 0, 4)
        assert stats.live == 5


async def test_two_gateways_share_one_table(redis_server: RedisServer) -> None:
    clock = FakeClock()
    shared = prefix()
    async with (
        authority(redis_server.url, clock, prefix=shared) as one,
        authority(redis_server.url, clock, prefix=shared) as two,
        authority(redis_server.url, clock) as elsewhere,
    ):
        realid = await one.associate(ALICE, IPv6Address("2001:db8::80"))
        assert await two.lookup(ALICE, realid) == IPv6Address("2001:db8::80")
        assert await two.associate(ALICE, IPv6Address("2001:db8::80")) == realid
        clock.now += 8
        await two.touch([(ALICE, realid)])
        clock.now += 8
        assert await one.lookup(ALICE, realid) == IPv6Address("2001:db8::80")
        # Both at once, many times: one entry, one ID.
        racing = await asyncio.gather(
            *(gw.associate(BOB, "race.example.test") for gw in (one, two) * 10)
        )
        assert len(set(racing)) == 1
        assert (await one.stats()).live == (await two.stats()).live == 2
        # Another prefix is another table.
        assert await elsewhere.lookup(ALICE, realid) is None
        assert (await elsewhere.stats()).live == 0
        clock.now += 20
        assert await elsewhere.expire() == 0
        assert await two.expire() == 2
        assert (await one.stats()).freed == 2


async def test_every_key_is_under_the_prefix(redis_server: RedisServer) -> None:
    clock = FakeClock()
    async with (
        authority(redis_server.url, clock, prefix="first:") as first,
        authority(redis_server.url, clock, prefix="second:") as second,
        raw_client(redis_server.url) as raw,
    ):
        for table in (first, second):
            for owner in OWNERS:
                realid = await table.associate(owner, "www.example.test")
                await table.lookup(owner, realid)
            clock.now += 10
            await table.associate(ALICE, "mail.example.test")  # frees one at the quota check
            await table.expire()
        keys = [key async for key in raw.scan_iter()]
        assert keys and all(key.startswith((b"first:", b"second:")) for key in keys)
        assert await first.stats() == await second.stats()


async def test_touch_is_one_round_trip(redis_server: RedisServer) -> None:
    async with (
        authority(redis_server.url, FakeClock()) as table,
        raw_client(redis_server.url) as raw,
    ):
        ids = [await table.associate(OWNERS[i % 4], f"h{i}.example.test") for i in range(40)]
        uses = [(OWNERS[i % 4], realid) for i, realid in enumerate(ids)]
        uses += [(BOB, ids[0]), (ALICE, 0), (ALICE, MAX_REALID + 1), (ALICE, 12345)]
        await table.touch(uses)  # loads the script if it was not loaded yet

        async def evalsha_calls() -> int:
            stats = await raw.info("commandstats")
            return int(stats["cmdstat_evalsha"]["calls"])

        before = await evalsha_calls()
        await table.touch(uses)
        assert await evalsha_calls() == before + 1
        await table.touch([])
        assert await evalsha_calls() == before + 1


async def test_outage_raises_table_unavailable_then_recovers(redis_server: RedisServer) -> None:
    clock = FakeClock()
    timeout = 0.5
    async with authority(redis_server.url, clock, timeout=timeout) as table:
        realid = await table.associate(ALICE, "www.example.test")
        redis_server.stop()
        calls: list[Awaitable[Any]] = [
            table.associate(ALICE, "www.example.test"),
            table.lookup(ALICE, realid),
            table.touch([(ALICE, realid)]),
            table.expire(),
            table.stats(),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(TableUnavailable) as failed:
                async with asyncio.timeout(5):
                    await call
            assert time.monotonic() - started < timeout + 1.0
            assert f"127.0.0.1:{redis_server.port}" in str(failed.value)
        redis_server.start()  # the same port; an empty table (no persistence)
        async with asyncio.timeout(5):
            assert await table.lookup(ALICE, realid) is None
            again = await table.associate(ALICE, "www.example.test")
            assert await table.lookup(ALICE, again) == "www.example.test"


async def test_a_hung_server_times_out_then_recovers(redis_server: RedisServer) -> None:
    timeout = 0.3
    async with authority(redis_server.url, FakeClock(), timeout=timeout) as table:
        realid = await table.associate(ALICE, "www.example.test")
        redis_server.pause()
        try:
            for _ in range(2):  # on the open connection, then on a new one
                started = time.monotonic()
                with pytest.raises(TableUnavailable):
                    async with asyncio.timeout(5):
                        await table.lookup(ALICE, realid)
                assert time.monotonic() - started < timeout + 1.0
        finally:
            redis_server.resume()
        async with asyncio.timeout(5):
            assert await table.lookup(ALICE, realid) == "www.example.test"


async def test_messages_never_show_the_password(redis_server: RedisServer) -> None:
    url = f"redis://:s3cret@127.0.0.1:{redis_server.port}/0"
    redis_server.stop()
    async with authority(url, FakeClock()) as table:
        with pytest.raises(TableUnavailable) as down:
            await table.stats()
    assert "s3cret" not in str(down.value)
    assert f"redis://:***@127.0.0.1:{redis_server.port}/0" in str(down.value)
    assert redact("redis://u:pw@h:1/0?password=pw&db=2") == (
        "redis://u:***@h:1/0?password=%2A%2A%2A&db=2"
    )


@pytest.mark.parametrize(
    "bad",
    [{"ttl": 0.0}, {"quarantine": -1.0}, {"per_owner_quota": 0}, {"capacity": 0},
     {"capacity": (1 << 23) + 1}, {"timeout": 0.0}],
)  # fmt: skip
def test_settings_are_checked(bad: dict[str, Any]) -> None:
    settings_: dict[str, Any] = {
        "ttl": 10.0,
        "quarantine": 20.0,
        "per_owner_quota": 10,
        "capacity": 100,
        **bad,
    }
    with pytest.raises(ValueError):
        RedisAuthority("redis://127.0.0.1:1/0", **settings_)
