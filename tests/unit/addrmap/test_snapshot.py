"""The ADDRESS ID table survives a restart: snapshot, age by the downtime, restore.

What must hold (wire profile section 4): a restart neither forgets a live ID nor hands a
quarantined REALID to another target. The table's ``secret=`` seam makes the second
point testable: a table keyed like the one that issued an ID draws that same ID first,
so a restored table that did not know the ID was quarantined would reissue it.
"""

from __future__ import annotations

import math
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addrmap import (
    POOL_OWNER,
    AddressTable,
    LimitExceeded,
    Owner,
    QuotaExceeded,
    SavedEntry,
    TableSnapshot,
    Target,
)
from addrmap.snapshot import parse_target, restore, snapshot, target_text
from tests.unit.fakes import FakeClock

TTL = 10.0
QUARANTINE = 100.0
# Last use is rounded up by at most ttl/16384, and a quarantine ends at most
# quarantine/1024 late: the slack of the assertions below.
HAIR = 0.01
SECRET = b"snapshot-test"
ALICE = Owner("192.0.2.10", None)
ALICE_AS_USER = Owner("192.0.2.10", "alice")
BOB = Owner("2001:db8::20", "bob")
WEB = IPv4Address("198.51.100.7")
WEB6 = IPv6Address("2001:db8::7")
WEB6_ZONED = IPv6Address("2001:db8::7%eth0")
NAME = "www.example.test"
TARGETS: list[Target] = [WEB, WEB6, WEB6_ZONED, NAME]


def make_table(clock: FakeClock, **overrides: object) -> AddressTable:
    options: dict[str, object] = {
        "ttl": TTL,
        "quarantine": QUARANTINE,
        "per_owner_quota": 8,
        "capacity": 32,
        "secret": SECRET,
    }
    options.update(overrides)
    return AddressTable(clock=clock, **options)  # type: ignore[arg-type]


def new_process(**overrides: object) -> tuple[AddressTable, FakeClock]:
    """A table in a process started later: its monotonic clock has nothing in common with
    the old one's, so only relative times can carry over."""
    clock = FakeClock(now=37.0)
    return make_table(clock, **overrides), clock


def first_id_drawn(secret: bytes = SECRET) -> int:
    """The REALID a fresh table keyed with ``secret`` hands out first."""
    return make_table(FakeClock(), secret=secret).associate(BOB, "fresh.example.test")


# ------------------------------------------------------------------ round trip


def test_round_trip_keeps_ids_targets_and_owners() -> None:
    clock = FakeClock()
    table = make_table(clock)
    ids = {
        (owner, target): table.associate(owner, target)
        for owner in (ALICE, ALICE_AS_USER, BOB)
        for target in TARGETS
    }
    assert table.associate(ALICE, "WWW.Example.TEST") == ids[ALICE, NAME]
    snap = snapshot(table)
    assert {(e.target_kind, e.target) for e in snap.entries} == {
        ("ipv4", "198.51.100.7"),
        ("ipv6", "2001:db8::7"),
        ("ipv6", "2001:db8::7%eth0"),
        ("name", "www.example.test"),
    }
    assert {e.owner for e in snap.entries} == {ALICE, ALICE_AS_USER, BOB}
    assert {(e.owner_ip, e.owner_user) for e in snap.entries} == {
        ("192.0.2.10", None),
        ("192.0.2.10", "alice"),
        ("2001:db8::20", "bob"),
    }
    assert snap.quarantined == ()

    restored, _ = new_process(secret=b"another key")
    assert restore(restored, snap, 0.0) == len(ids) == len(restored)
    assert snapshot(restored) == snap
    assert restored.stats.owners == 3
    for owner in (ALICE, ALICE_AS_USER, BOB):
        assert restored.owner_count(owner) == len(TARGETS)
    for (owner, target), realid in ids.items():
        assert restored.lookup(owner, realid) == target
        assert restored.find(owner, target) == realid
        assert restored.associate(owner, target) == realid  # idempotent, as before
        other = BOB if owner != BOB else ALICE
        assert restored.lookup(other, realid) is None  # another owner's ID looks unknown
    zoned = restored.lookup(BOB, ids[BOB, WEB6_ZONED])
    assert isinstance(zoned, IPv6Address) and zoned.scope_id == "eth0"
    assert len(restored) == len(ids)  # nothing was associated twice


def test_an_empty_table_gives_an_empty_snapshot() -> None:
    table = make_table(FakeClock())
    assert snapshot(table) == TableSnapshot((), ())
    restored, _ = new_process()
    assert restore(restored, TableSnapshot((), ()), 5.0) == 0


@pytest.mark.parametrize("target", [WEB, WEB6, WEB6_ZONED, NAME])
def test_target_text_and_parse_target_are_inverses(target: Target) -> None:
    assert parse_target(*target_text(target)) == target


def test_the_pools_entries_are_left_to_the_pool() -> None:
    table = make_table(FakeClock())
    table.associate(POOL_OWNER, "v6only.example.test", quota=16)
    mine = table.associate(ALICE, WEB)
    assert [(e.realid, e.owner) for e in snapshot(table).entries] == [(mine, ALICE)]


# ------------------------------------------------------------------ idle times


def test_idle_time_is_carried_and_the_entry_expires_on_time() -> None:
    clock = FakeClock()
    table = make_table(clock)
    realid = table.associate(ALICE, WEB)
    clock.now += 6.0
    snap = snapshot(table)
    assert snap.entries[0].idle == pytest.approx(6.0, abs=HAIR)

    restored, later = new_process()
    assert restore(restored, snap, elapsed=3.0) == 1  # idle 9 of 10 s now
    later.now += 1.0 - HAIR
    assert restored.peek(ALICE, realid) == WEB
    assert restored.expire() == 0
    later.now += 2 * HAIR
    assert restored.peek(ALICE, realid) is None
    assert restored.expire() == 1  # reclaimed through the wheel like any entry
    assert (len(restored), restored.stats.freed, restored.stats.quarantined) == (0, 1, 1)


def test_a_restored_entry_is_refreshed_by_use_like_any_other() -> None:
    clock = FakeClock()
    table = make_table(clock)
    realid = table.associate(ALICE, NAME)
    clock.now += 9.0
    restored, later = new_process()
    restore(restored, snapshot(table), elapsed=0.5)
    later.now += 0.25
    assert restored.lookup(ALICE, realid) == NAME  # a use: the TTL starts again
    later.now += TTL - HAIR
    assert restored.expire() == 0
    assert restored.peek(ALICE, realid) == NAME
    later.now += 2 * HAIR
    assert restored.expire() == 1


def test_pinned_entries_restart_their_idle_time_at_the_snapshot() -> None:
    clock = FakeClock()
    table = make_table(clock)
    realid = table.associate(ALICE, WEB6)
    assert table.pin(ALICE, realid)
    clock.now += 5 * TTL  # pinned: never expires, however long
    [saved] = snapshot(table).entries
    assert (saved.pinned, saved.idle) == (True, 0.0)

    restored, later = new_process()
    assert restore(restored, snapshot(table), elapsed=4.0) == 1
    assert restored.stats.pinned == 0  # its sessions ended with the old process
    later.now += TTL - 4.0 - HAIR
    assert restored.peek(ALICE, realid) == WEB6
    later.now += 2 * HAIR
    assert restored.peek(ALICE, realid) is None


def test_a_pinned_entry_down_longer_than_the_ttl_is_quarantined() -> None:
    clock = FakeClock()
    table = make_table(clock)
    realid = table.associate(ALICE, WEB6)
    table.pin(ALICE, realid)
    restored, _ = new_process()
    assert restore(restored, snapshot(table), elapsed=TTL + 1.0) == 0
    [(quarantined, left)] = snapshot(restored).quarantined
    assert quarantined == realid
    assert left == pytest.approx(QUARANTINE - 1.0, abs=2 * QUARANTINE / 1024)


# ------------------------------------------------------------------ quarantine


def test_quarantined_ids_are_not_reissued_after_a_restart() -> None:
    clock = FakeClock()
    table = make_table(clock)
    realid = table.associate(ALICE, WEB)
    assert realid == first_id_drawn()  # the seam: the same key draws the same ID first
    clock.now += TTL + HAIR
    assert table.expire() == 1
    snap = snapshot(table)
    assert snap.entries == ()
    [(quarantined, left)] = snap.quarantined
    assert quarantined == realid
    assert left == pytest.approx(QUARANTINE, abs=2 * QUARANTINE / 1024)

    restored, _ = new_process()  # keyed the same: its first draw is ``realid``
    assert restore(restored, snap, elapsed=1.0) == 0
    assert restored.stats.quarantined == 1
    assert restored.associate(BOB, "other.example.test") != realid
    assert restored.lookup(ALICE, realid) is None


def test_an_expired_entry_not_yet_reclaimed_is_saved_as_quarantined() -> None:
    clock = FakeClock()
    table = make_table(clock)
    realid = table.associate(ALICE, WEB)
    clock.now += TTL + 30.0  # expired 30 s ago, no sweep since
    assert len(table) == 1
    snap = snapshot(table)
    assert snap.entries == ()
    [(quarantined, left)] = snap.quarantined
    assert quarantined == realid
    assert left == pytest.approx(QUARANTINE - 30.0, abs=HAIR)  # counted from expiry

    restored, _ = new_process()
    restore(restored, snap, elapsed=0.0)
    assert restored.associate(BOB, "other.example.test") != realid


def test_elapsed_beyond_the_ttl_moves_entries_to_quarantine() -> None:
    clock = FakeClock()
    table = make_table(clock)
    realid = table.associate(ALICE, WEB)
    clock.now += 2.0
    restored, _ = new_process()
    # Idle 2 s, down TTL + 20 s: it expired 22 s ago, in the gap.
    assert restore(restored, snapshot(table), elapsed=TTL + 20.0) == 0
    assert len(restored) == 0
    [(quarantined, left)] = snapshot(restored).quarantined
    assert quarantined == realid
    assert left == pytest.approx(QUARANTINE - 22.0, abs=2 * QUARANTINE / 1024)
    assert left >= QUARANTINE - 22.0 - HAIR  # never shorter than it should be
    assert restored.associate(BOB, "other.example.test") != realid


def test_quarantines_are_shortened_by_the_downtime() -> None:
    clock = FakeClock()
    table = make_table(clock)
    realid = table.associate(ALICE, WEB)
    clock.now += TTL + HAIR
    table.expire()
    restored, later = new_process()
    restore(restored, snapshot(table), elapsed=60.0)
    [(_, left)] = snapshot(restored).quarantined
    assert left == pytest.approx(QUARANTINE - 60.0, abs=2 * QUARANTINE / 1024)
    later.now += left + HAIR
    restored.expire()
    assert restored.stats.quarantined == 0
    assert restored.associate(BOB, "other.example.test") == realid  # free again


@pytest.mark.parametrize("reclaimed", [True, False])
def test_elapsed_beyond_the_quarantine_frees_the_ids(reclaimed: bool) -> None:
    clock = FakeClock()
    table = make_table(clock)
    realid = table.associate(ALICE, WEB)
    table.associate(ALICE, WEB6)
    clock.now += TTL + HAIR
    if reclaimed:
        table.expire()  # else saved as expired entries, with the same quarantine left
    restored, _ = new_process()
    assert restore(restored, snapshot(table), elapsed=TTL + QUARANTINE + 1.0) == 0
    assert (len(restored), restored.stats.quarantined) == (0, 0)
    assert restored.associate(BOB, "other.example.test") == realid  # may be reissued


def test_a_longer_saved_quarantine_is_cut_to_the_tables_own() -> None:
    snap = TableSnapshot((), ((4242, 10 * QUARANTINE),))
    restored, _ = new_process()
    restore(restored, snap, elapsed=0.0)
    [(_, left)] = snapshot(restored).quarantined
    assert left <= QUARANTINE + 2 * QUARANTINE / 1024


def test_with_quarantine_disabled_nothing_is_quarantined() -> None:
    clock = FakeClock()
    table = make_table(clock, quarantine=0.0)
    table.associate(ALICE, WEB)
    clock.now += TTL + HAIR
    assert snapshot(table).quarantined == ()
    restored, _ = new_process(quarantine=0.0)
    restore(restored, TableSnapshot((), ((4242, 50.0),)), elapsed=0.0)
    assert restored.stats.quarantined == 0


# ------------------------------------------------------------------ limits


def test_restored_entries_count_against_the_quota() -> None:
    clock = FakeClock()
    table = make_table(clock)
    for i in range(8):
        table.associate(ALICE, f"h{i}.example.test")
    restored, later = new_process()
    restore(restored, snapshot(table), elapsed=0.0)
    with pytest.raises(QuotaExceeded):
        restored.associate(ALICE, "one-more.example.test")
    later.now += TTL + HAIR
    assert restored.associate(ALICE, "one-more.example.test")  # they expired: room again


def test_lowered_limits_keep_every_live_id_but_refuse_new_ones() -> None:
    clock = FakeClock()
    table = make_table(clock)
    ids = [table.associate(ALICE, f"h{i}.example.test") for i in range(6)]
    restored, _ = new_process(per_owner_quota=2, capacity=4)
    assert restore(restored, snapshot(table), elapsed=0.0) == 6
    assert all(restored.lookup(ALICE, realid) for realid in ids)
    with pytest.raises(LimitExceeded):
        restored.associate(ALICE, "one-more.example.test")


# ------------------------------------------------------------------ refusals


def test_restoring_into_a_table_with_entries_raises() -> None:
    restored, _ = new_process()
    restored.associate(ALICE, WEB)
    with pytest.raises(ValueError, match="empty"):
        restore(restored, TableSnapshot((), ()), 0.0)


def test_restoring_into_a_table_with_quarantined_ids_raises() -> None:
    restored, later = new_process()
    restored.associate(ALICE, WEB)
    later.now += TTL + HAIR
    restored.expire()
    with pytest.raises(ValueError, match="empty"):
        restore(restored, TableSnapshot((), ()), 0.0)


@pytest.mark.parametrize("elapsed", [-1.0, math.nan, math.inf])
def test_elapsed_must_be_a_finite_positive_time(elapsed: float) -> None:
    restored, _ = new_process()
    with pytest.raises(ValueError, match="elapsed"):
        restore(restored, TableSnapshot((), ()), elapsed)


GOOD = SavedEntry(5, "192.0.2.10", None, "ipv4", "198.51.100.7", 1.0, False)


@pytest.mark.parametrize(
    "snap",
    [
        TableSnapshot((GOOD, GOOD._replace(target="198.51.100.8")), ()),  # ID twice
        TableSnapshot((GOOD,), ((5, 10.0),)),  # live and quarantined
        TableSnapshot((GOOD, GOOD._replace(realid=6)), ()),  # one owner, one target, two IDs
        TableSnapshot((GOOD._replace(realid=0),), ()),
        TableSnapshot((GOOD._replace(realid=1 << 24),), ()),
        TableSnapshot((), ((True, 10.0),)),
        TableSnapshot((GOOD._replace(target_kind="url"),), ()),  # type: ignore[arg-type]
        TableSnapshot((GOOD._replace(target="2001:db8::7"),), ()),  # not IPv4
        TableSnapshot((GOOD._replace(target_kind="name", target=""),), ()),
        TableSnapshot((GOOD._replace(target_kind="name", target="x" * 256),), ()),
        TableSnapshot((GOOD._replace(idle=math.nan),), ()),
        TableSnapshot((), ((7, math.inf),)),
    ],
)
def test_an_inconsistent_snapshot_is_refused_and_changes_nothing(snap: TableSnapshot) -> None:
    restored, _ = new_process()
    with pytest.raises(ValueError):
        restore(restored, snap, 0.0)
    assert (len(restored), restored.stats.quarantined, restored.stats.owners) == (0, 0, 0)


def test_the_same_target_as_a_name_and_as_an_address_are_two_targets() -> None:
    as_name = GOOD._replace(realid=6, target_kind="name", target="198.51.100.7")
    restored, _ = new_process()
    assert restore(restored, TableSnapshot((GOOD, as_name), ()), 0.0) == 2


# ------------------------------------------------------------------ property

# Clock steps are multiples of 1/64 s and the TTL is 16 s, so the table's rounding of
# last-use times (up by ttl/16384 = 1/1024 s) never decides which side of the TTL a
# step lands on (as in tests/fuzz/test_addrmap_props.py).
P_TTL = 16.0
P_QUARANTINE = 40.0
P_OWNERS = [Owner("192.0.2.1", None), Owner("192.0.2.1", "alice"), Owner("2001:db8::1", None)]
P_TARGETS: list[Target] = [
    IPv4Address("192.0.2.80"),
    IPv6Address("2001:db8::80"),
    IPv6Address("2001:db8::80%eth0"),
    "www.example.test",
    "WWW.Example.TEST",  # the same target as the one above
    "mail.example.test",
]
P_STEPS = [1 / 64, 0.5, 4.0, 8.0, 15.5, 16.0, 16 + 1 / 64, 20.0, 45.0]

Op = tuple[str, int, int]
owner_index = st.integers(0, len(P_OWNERS) - 1)
id_index = st.integers(0, 30)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("associate"), owner_index, st.integers(0, len(P_TARGETS) - 1)),
        st.tuples(st.just("lookup"), owner_index, id_index),
        st.tuples(st.just("find"), owner_index, st.integers(0, len(P_TARGETS) - 1)),
        st.tuples(st.just("pin"), owner_index, id_index),
        st.tuples(st.just("unpin"), owner_index, id_index),
        st.tuples(st.just("advance"), st.integers(0, len(P_STEPS) - 1), st.just(0)),
        st.tuples(st.just("expire"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


def property_table(clock: FakeClock, secret: bytes) -> AddressTable:
    return AddressTable(
        clock=clock,
        ttl=P_TTL,
        quarantine=P_QUARANTINE,
        per_owner_quota=3,
        capacity=6,
        secret=secret,
    )


def step(table: AddressTable, op: Op, ids: list[int]) -> object:
    """Apply ``op`` (not a clock step); the answer names IDs by their place in ``ids``
    (the order in which the table first handed them out), so two tables drawing
    different fresh IDs can still be compared."""
    kind, a, b = op
    if kind == "expire":
        table.expire()
        return len(table)  # once swept, both hold exactly the live entries
    owner = P_OWNERS[a]
    if kind == "associate":
        try:
            realid = table.associate(owner, P_TARGETS[b])
        except LimitExceeded as error:
            return ("refused", error.limit)
        if realid not in ids:
            ids.append(realid)
        return ids.index(realid)
    if kind == "find":
        found = table.find(owner, P_TARGETS[b])
        return None if found is None else ids.index(found)
    if not ids:
        return None
    realid = ids[b % len(ids)]
    if kind == "lookup":
        return table.lookup(owner, realid)
    if kind == "pin":
        return table.pin(owner, realid)
    table.unpin(owner, realid)
    return table.stats.pinned


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=OPS, after=OPS)
def test_a_restored_table_answers_like_the_original(before: list[Op], after: list[Op]) -> None:
    clock = FakeClock(now=1000.0)
    original = property_table(clock, b"original")
    ids: list[int] = []
    for op in before:
        if op[0] == "advance":
            clock.now += P_STEPS[op[1]]
        else:
            step(original, op, ids)

    snap = snapshot(original)
    restored = property_table(clock, b"restored")  # another key: fresh IDs differ
    live = restore(restored, snap, elapsed=0.0)
    assert live == len(snap.entries) == len(restored)
    # The original's sessions end with it, as the restored table assumes.
    for realid, count in list(original._pins.items()):
        for _ in range(count):
            original.unpin(original._by_id[realid].owner, realid)

    again = snapshot(restored)
    assert [e._replace(idle=0.0, pinned=False) for e in again.entries] == [
        e._replace(idle=0.0, pinned=False) for e in snap.entries
    ]
    for saved, now_saved in zip(snap.entries, again.entries, strict=True):
        assert now_saved.idle == (0.0 if saved.pinned else saved.idle)
    # Every quarantine carried over, none shortened (release may round up a bucket).
    carried = dict(again.quarantined)
    for realid, left in snap.quarantined:
        assert carried[realid] >= left

    # Off the grid the old pins ended on, then compare answer by answer.
    clock.now += 1 / 128
    restored_ids = list(ids)
    for op in after:
        if op[0] == "advance":
            clock.now += P_STEPS[op[1]]  # one clock: both tables see the same time
            continue
        assert step(original, op, ids) == step(restored, op, restored_ids), op
        assert original.stats.pinned == restored.stats.pinned
    for owner in P_OWNERS:
        for target in P_TARGETS:
            a = original.find(owner, target)
            b = restored.find(owner, target)
            if a is None or b is None:
                assert a is b
            else:
                assert ids.index(a) == restored_ids.index(b)
