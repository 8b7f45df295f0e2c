"""Unit tests of the ADDRESS ID table (wire profile section 4), on an injected clock."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from itertools import pairwise

import pytest

from addrmap import (
    MAX_REALID,
    AddressTable,
    AddrMapError,
    CapacityExceeded,
    InvalidTarget,
    Owner,
    QuotaExceeded,
    Target,
)

TTL = 10.0
QUARANTINE = 100.0
# Last use is rounded up by at most ttl/16384; step past that when testing expiry.
AFTER_TTL = TTL + 0.01
ALICE = Owner("192.0.2.10", None)
BOB = Owner("2001:db8::20", None)
ALICE_AS_USER = Owner("192.0.2.10", "alice")
WEB = IPv4Address("198.51.100.7")
WEB6 = IPv6Address("2001:db8::7")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedIds:
    """Stands in for the table's ID stream so tests can force collisions."""

    def __init__(self, values: Iterable[int]) -> None:
        self._values: Iterator[int] = iter(values)

    def next(self) -> int:
        return next(self._values)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_table(clock: FakeClock, **overrides: object) -> AddressTable:
    options: dict[str, object] = {
        "ttl": TTL,
        "quarantine": QUARANTINE,
        "per_owner_quota": 8,
        "capacity": 32,
        "secret": b"unit-test",
    }
    options.update(overrides)
    return AddressTable(clock=clock, **options)  # type: ignore[arg-type]


def script_ids(table: AddressTable, values: Iterable[int]) -> None:
    table._ids = ScriptedIds(values)  # type: ignore[assignment]


@pytest.fixture
def table(clock: FakeClock) -> AddressTable:
    return make_table(clock)


# --------------------------------------------------------------------------- IDs


def test_ids_are_in_range_distinct_and_not_sequential(clock: FakeClock) -> None:
    table = make_table(clock, per_owner_quota=1000, capacity=1000)
    ids = [table.associate(ALICE, IPv4Address(0xC6336400 + i)) for i in range(1000)]
    assert all(1 <= realid <= MAX_REALID for realid in ids)
    assert len(set(ids)) == len(ids)
    steps = {b - a for a, b in pairwise(ids)}
    assert len(steps) > 900  # no counter, no fixed stride
    # Spread over the whole 24-bit space, not a low corner of it.
    assert min(ids) < 0x100000 and max(ids) > 0xF00000


def test_same_secret_repeats_the_sequence_and_other_secrets_differ(clock: FakeClock) -> None:
    def first_ids(secret: bytes | None) -> list[int]:
        table = make_table(clock, secret=secret)
        return [table.associate(ALICE, f"h{i}.example") for i in range(8)]

    assert first_ids(b"k1") == first_ids(b"k1")
    assert first_ids(b"k1") != first_ids(b"k2")
    assert first_ids(None) != first_ids(None)  # fresh random key each time


def test_zero_and_ids_in_use_are_never_handed_out(table: AddressTable) -> None:
    script_ids(table, [0, 5, 0, 5, 5, 9])
    assert table.associate(ALICE, WEB) == 5
    assert table.associate(BOB, WEB) == 9  # skipped 0 and the live 5


def test_exhausted_id_space_is_a_capacity_error(table: AddressTable) -> None:
    script_ids(table, [7] * 1000)
    assert table.associate(ALICE, WEB) == 7
    with pytest.raises(CapacityExceeded) as caught:
        table.associate(ALICE, WEB6)
    assert caught.value.limit == "id_space"
    assert caught.value.owner == ALICE
    assert table.stats.capacity_refusals == 1


# ------------------------------------------------------------------ association


def test_same_owner_and_target_get_the_same_id(table: AddressTable) -> None:
    first = table.associate(ALICE, WEB)
    assert table.associate(ALICE, IPv4Address("198.51.100.7")) == first
    assert table.find(ALICE, WEB) == first
    assert len(table) == 1


def test_each_owner_gets_its_own_id_for_a_shared_target(table: AddressTable) -> None:
    ids = {table.associate(owner, WEB) for owner in (ALICE, BOB, ALICE_AS_USER)}
    assert len(ids) == 3
    assert table.stats.owners == 3


def test_names_are_case_insensitive_and_stored_lower_case(table: AddressTable) -> None:
    realid = table.associate(ALICE, "WWW.Example.ORG")
    assert table.associate(ALICE, "www.example.org") == realid
    assert table.find(ALICE, "Www.Example.Org") == realid
    assert table.lookup(ALICE, realid) == "www.example.org"


def test_address_families_are_distinct_targets(table: AddressTable) -> None:
    # Same int value, different family; mapped IPv6 is not its IPv4 address; zones differ.
    targets: list[Target] = [
        IPv4Address("0.0.0.1"),
        IPv6Address("::1"),
        IPv4Address("192.0.2.1"),
        IPv6Address("::ffff:192.0.2.1"),
        IPv6Address("fe80::1"),
        IPv6Address("fe80::1%eth0"),
        "192.0.2.1",
    ]
    ids = [table.associate(ALICE, target) for target in targets]
    assert len(set(ids)) == len(targets)
    for realid, target in zip(ids, targets, strict=True):
        assert table.lookup(ALICE, realid) == target
        assert table.find(ALICE, target) == realid


@pytest.mark.parametrize("bad", ["", "x" * 256, b"example.org", 3232235777])
def test_invalid_targets_are_refused(table: AddressTable, bad: object) -> None:
    with pytest.raises(InvalidTarget):
        table.associate(ALICE, bad)  # type: ignore[arg-type]
    assert issubclass(InvalidTarget, ValueError) and issubclass(InvalidTarget, AddrMapError)
    assert len(table) == 0


def test_longest_name_is_accepted(table: AddressTable) -> None:
    name = "a" * 255
    assert table.lookup(ALICE, table.associate(ALICE, name)) == name


# ---------------------------------------------------------------------- lookups


def test_lookup_of_another_owners_id_looks_unknown(table: AddressTable) -> None:
    realid = table.associate(ALICE, WEB)
    unknown = next(i for i in range(1, 100) if i != realid)
    assert table.lookup(BOB, realid) is None
    assert table.lookup(ALICE_AS_USER, realid) is None  # the user name is part of it
    assert table.lookup(BOB, unknown) is None
    assert table.lookup(ALICE, 0) is None
    assert table.lookup(ALICE, MAX_REALID + 1) is None
    assert table.lookup(ALICE, realid) == WEB
    assert not table.pin(BOB, realid)
    assert table.find(BOB, WEB) is None


def test_ids_need_no_connection_an_equal_owner_built_later_uses_them(
    table: AddressTable,
) -> None:
    realid = table.associate(Owner.from_address("192.0.2.10"), WEB)
    # A later connection builds its own Owner; a v4 client on a dual-stack socket
    # shows up as an IPv4-mapped address and is still the same owner.
    later = Owner.from_address(ip_address("::ffff:192.0.2.10"))
    assert later == ALICE and later is not ALICE
    assert table.lookup(later, realid) == WEB


def test_owner_normalizes_address_text() -> None:
    assert Owner.from_address("2001:DB8:0:0::20") == BOB
    assert Owner.from_address("192.0.2.10", "alice") == ALICE_AS_USER
    with pytest.raises(ValueError):
        Owner.from_address("not-an-address")


# ------------------------------------------------------------------ TTL, expiry


def test_idle_entries_expire_after_ttl(table: AddressTable, clock: FakeClock) -> None:
    realid = table.associate(ALICE, WEB)
    clock.advance(TTL - 0.01)
    assert len(table) == 1 and table.expire() == 0
    clock.advance(0.02)
    assert table.expire() == 1
    assert len(table) == 0
    assert table.lookup(ALICE, realid) is None
    assert table.stats.freed == 1


def test_frequent_sweeps_around_the_deadline_free_the_entry_once(
    table: AddressTable, clock: FakeClock
) -> None:
    table.associate(ALICE, WEB)
    step = table.granularity / 8
    clock.advance(TTL - 2 * table.granularity)
    freed = []
    for _ in range(32):  # sweeps before, at and after the deadline, within one granule
        freed.append(table.expire())
        clock.advance(step)
    assert sum(freed) == 1
    assert len(table) == 0


def test_lookup_sees_expiry_exactly_without_a_sweep(table: AddressTable, clock: FakeClock) -> None:
    realid = table.associate(ALICE, WEB)
    clock.advance(AFTER_TTL)
    assert table.lookup(ALICE, realid) is None
    assert table.find(ALICE, WEB) is None
    assert len(table) == 0  # freed on the spot


def test_every_use_restarts_the_ttl(table: AddressTable, clock: FakeClock) -> None:
    realid = table.associate(ALICE, WEB)
    for use in (
        lambda: table.lookup(ALICE, realid),
        lambda: table.find(ALICE, WEB),
        lambda: table.associate(ALICE, WEB),
    ):
        clock.advance(TTL * 0.9)
        assert use() is not None
        assert table.expire() == 0
    clock.advance(TTL * 0.9)
    assert table.lookup(ALICE, realid) == WEB
    clock.advance(AFTER_TTL)
    assert table.lookup(ALICE, realid) is None


def test_another_owners_lookups_do_not_keep_an_id_alive(
    table: AddressTable, clock: FakeClock
) -> None:
    realid = table.associate(ALICE, WEB)
    for _ in range(3):
        clock.advance(TTL / 2)
        assert table.lookup(BOB, realid) is None
    assert table.lookup(ALICE, realid) is None


def test_reassociating_after_expiry_gives_a_new_id(table: AddressTable, clock: FakeClock) -> None:
    old = table.associate(ALICE, WEB)
    clock.advance(AFTER_TTL)
    new = table.associate(ALICE, WEB)
    assert new != old
    assert table.lookup(ALICE, old) is None
    assert table.lookup(ALICE, new) == WEB


def test_reassociating_an_owners_last_expired_entry(table: AddressTable, clock: FakeClock) -> None:
    # Expired moments ago, not reclaimed yet: freeing it empties the owner's index.
    old = table.associate(ALICE, WEB)
    clock.advance(AFTER_TTL)
    new = table.associate(ALICE, WEB)
    assert table.find(ALICE, WEB) == new != old
    assert table.owner_count(ALICE) == 1
    assert table.associate(ALICE, WEB) == new


def test_owner_at_quota_with_every_entry_expired_can_associate(clock: FakeClock) -> None:
    table = make_table(clock, per_owner_quota=2)
    table.associate(ALICE, "a.example")
    table.associate(ALICE, "b.example")
    clock.advance(AFTER_TTL)
    realid = table.associate(ALICE, "c.example")  # the limit check reclaims a and b
    assert table.find(ALICE, "c.example") == realid
    assert table.owner_count(ALICE) == 1 and len(table) == 1


def test_crowded_id_draw_reclaims_an_owners_expired_entries(
    table: AddressTable, clock: FakeClock
) -> None:
    # After 64 draws of the (expired, unreclaimed) ID 41 the table sweeps, which frees
    # ALICE's only entry; the new one must still land in ALICE's index.
    script_ids(table, [41] + [41] * 65 + [42])
    table.associate(ALICE, WEB)
    clock.advance(AFTER_TTL)
    assert table.associate(ALICE, WEB6) == 42
    assert table.find(ALICE, WEB6) == 42
    assert table.owner_count(ALICE) == 1
    assert table.lookup(ALICE, 41) is None


def test_associate_reclaims_expired_entries_without_expire(clock: FakeClock) -> None:
    table = make_table(clock, per_owner_quota=500, capacity=1000)
    for i in range(200):
        table.associate(ALICE, f"old{i}.example")
    clock.advance(2 * TTL)
    for i in range(200):
        table.associate(BOB, f"new{i}.example")
    # Each associate() does a bounded share of the sweeping: the old ones are gone.
    assert len(table) == 200
    assert table.owner_count(ALICE) == 0


def test_expire_with_a_budget_bounds_each_call(clock: FakeClock) -> None:
    table = make_table(clock, per_owner_quota=100, capacity=100)
    ids = [table.associate(ALICE, f"h{i}.example") for i in range(100)]
    clock.advance(AFTER_TTL)
    assert table.expire(budget=30) == 30
    assert len(table) == 70
    assert sum(table.expire(budget=30) for _ in range(3)) == 70
    assert all(table.lookup(ALICE, realid) is None for realid in ids)


def test_expire_only_counts_what_it_freed(table: AddressTable, clock: FakeClock) -> None:
    ids = [table.associate(ALICE, f"h{i}.example") for i in range(5)]
    clock.advance(AFTER_TTL)
    assert table.lookup(ALICE, ids[0]) is None  # freed by the lookup
    assert table.expire() == 4
    assert table.expire() == 0
    assert table.stats.freed == 5


# ------------------------------------------------------------------------- pins


def test_pinned_entries_never_expire(table: AddressTable, clock: FakeClock) -> None:
    realid = table.associate(ALICE, WEB)
    assert table.pin(ALICE, realid)
    clock.advance(100 * TTL)
    assert table.expire() == 0
    assert table.lookup(ALICE, realid) == WEB
    assert table.associate(ALICE, WEB) == realid
    assert table.stats.pinned == 1


def test_ttl_restarts_when_the_last_pin_goes(table: AddressTable, clock: FakeClock) -> None:
    realid = table.associate(ALICE, WEB)
    assert table.pin(ALICE, realid)
    assert table.pin(ALICE, realid)  # two sessions
    clock.advance(5 * TTL)
    table.unpin(ALICE, realid)
    clock.advance(5 * TTL)
    assert table.expire() == 0  # one pin left
    table.unpin(ALICE, realid)
    assert table.stats.pinned == 0
    clock.advance(TTL - 0.01)
    assert table.expire() == 0
    clock.advance(0.02)
    assert table.expire() == 1
    assert table.lookup(ALICE, realid) is None


def test_pin_refuses_unknown_expired_and_foreign_ids(table: AddressTable, clock: FakeClock) -> None:
    realid = table.associate(ALICE, WEB)
    assert not table.pin(BOB, realid)
    assert not table.pin(ALICE, 0)
    clock.advance(AFTER_TTL)
    assert not table.pin(ALICE, realid)
    assert table.stats.pinned == 0


def test_unpin_by_another_owner_or_of_unpinned_id_does_nothing(
    table: AddressTable, clock: FakeClock
) -> None:
    realid = table.associate(ALICE, WEB)
    table.unpin(ALICE, realid)  # never pinned: no error, nothing changes
    assert table.pin(ALICE, realid)
    table.unpin(BOB, realid)
    clock.advance(3 * TTL)
    assert table.lookup(ALICE, realid) == WEB


# ------------------------------------------------------------------- quarantine


def test_freed_id_is_not_reissued_during_quarantine(table: AddressTable, clock: FakeClock) -> None:
    script_ids(table, [41, 41, 41, 42, 41])
    assert table.associate(ALICE, WEB) == 41
    clock.advance(AFTER_TTL)
    assert table.expire() == 1
    assert table.stats.quarantined == 1
    # 41 is offered twice by the stream and refused: a stale client may still hold it.
    assert table.associate(ALICE, WEB6) == 42
    assert table.lookup(ALICE, 41) is None
    clock.advance(QUARANTINE + 1)
    table.expire()
    assert table.associate(ALICE, WEB) == 41


def test_quarantine_counts_from_expiry_even_if_reclaimed_late(
    table: AddressTable, clock: FakeClock
) -> None:
    script_ids(table, [41, 41, 43, 41])
    assert table.associate(ALICE, WEB) == 41
    clock.advance(QUARANTINE / 2)  # expired long ago, nobody swept
    assert table.expire() == 1
    clock.advance(QUARANTINE / 2 - 1)
    assert table.associate(ALICE, WEB6) == 43  # still quarantined: refused
    clock.advance(TTL + 2)
    table.expire()
    assert table.associate(ALICE, "x.example") == 41


def test_quarantine_zero_allows_immediate_reuse(clock: FakeClock) -> None:
    table = make_table(clock, quarantine=0.0)
    script_ids(table, [41, 41])
    assert table.associate(ALICE, WEB) == 41
    clock.advance(AFTER_TTL)
    table.expire()
    assert table.associate(BOB, WEB6) == 41
    assert table.lookup(ALICE, 41) is None
    assert table.lookup(BOB, 41) == WEB6


# ----------------------------------------------------------------------- limits


def test_per_owner_quota(clock: FakeClock) -> None:
    table = make_table(clock, per_owner_quota=3)
    ids = [table.associate(ALICE, f"h{i}.example") for i in range(3)]
    with pytest.raises(QuotaExceeded) as caught:
        table.associate(ALICE, "h3.example")
    error = caught.value
    assert isinstance(error, AddrMapError)
    assert (error.limit, error.value, error.owner) == ("per_owner_quota", 3, ALICE)
    assert "192.0.2.10" in str(error)
    # Known targets still answer; other owners are not affected.
    assert table.associate(ALICE, "h1.example") == ids[1]
    table.associate(BOB, "h3.example")
    assert table.owner_count(ALICE) == 3
    assert table.stats.quota_refusals == 1


def test_quota_frees_up_when_entries_expire(clock: FakeClock) -> None:
    table = make_table(clock, per_owner_quota=2)
    table.associate(ALICE, "a.example")
    clock.advance(TTL / 2)
    table.associate(ALICE, "b.example")
    clock.advance(TTL / 2 + 0.01)  # a.example has just expired; nothing swept it
    table.associate(ALICE, "c.example")
    with pytest.raises(QuotaExceeded):
        table.associate(ALICE, "d.example")


def test_global_capacity(clock: FakeClock) -> None:
    table = make_table(clock, capacity=4)
    for i, owner in enumerate([ALICE, ALICE, BOB, BOB]):
        table.associate(owner, f"h{i}.example")
    carol = Owner("203.0.113.5", "carol")
    with pytest.raises(CapacityExceeded) as caught:
        table.associate(carol, WEB)
    assert (caught.value.limit, caught.value.value, caught.value.owner) == ("capacity", 4, carol)
    assert table.owner_count(carol) == 0 and table.stats.owners == 2
    clock.advance(AFTER_TTL)
    assert table.lookup(carol, table.associate(carol, WEB)) == WEB


def test_pinned_entries_count_against_limits(clock: FakeClock) -> None:
    table = make_table(clock, per_owner_quota=1)
    assert table.pin(ALICE, table.associate(ALICE, WEB))
    clock.advance(10 * TTL)
    with pytest.raises(QuotaExceeded):
        table.associate(ALICE, WEB6)


@pytest.mark.parametrize(
    "options",
    [
        {"ttl": 0},
        {"quarantine": -1},
        {"per_owner_quota": 0},
        {"capacity": 0},
        {"capacity": 1 << 24},
    ],
)
def test_bad_configuration_is_refused(clock: FakeClock, options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_table(clock, **options)


def test_stats_snapshot(table: AddressTable, clock: FakeClock) -> None:
    realid = table.associate(ALICE, WEB)
    table.associate(BOB, WEB)
    table.pin(ALICE, realid)
    clock.advance(AFTER_TTL)
    table.expire()
    stats = table.stats
    assert (stats.live, stats.owners, stats.pinned, stats.quarantined, stats.freed) == (
        1,
        1,
        1,
        1,
        1,
    )
    assert stats.issued == 2  # one live, one expired
    assert table.owner_count(BOB) == 0 and table.owner_count(ALICE) == 1
