"""The fake-IP pool: addresses as aliases of ADDRESS IDs (pure, a fake clock)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from addrmap import (
    POOL_OWNER,
    AddressTable,
    Binding,
    CapacityExceeded,
    FakeIpPool,
    InvalidTarget,
    Owner,
    PoolExhausted,
    PoolSnapshot,
)
from tests.unit.fakes import FakeClock


def make(
    network: str = "198.18.0.0/24",
    *,
    ttl: float = 60,
    quarantine: float = 300,
    capacity: int = 1000,
) -> tuple[FakeClock, AddressTable, FakeIpPool]:
    clock = FakeClock()
    table = AddressTable(
        clock=clock,
        ttl=ttl,
        quarantine=quarantine,
        per_owner_quota=4,
        capacity=capacity,
        secret=b"t",
    )
    return clock, table, FakeIpPool(table, IPv4Network(network), quarantine=quarantine)


def test_a_name_keeps_its_address_while_bound_and_is_case_blind() -> None:
    _, _, pool = make()
    first = pool.bind("v6only.example")
    assert first == IPv4Address("198.18.0.1")
    assert pool.bind("V6ONLY.example") == first
    assert pool.bind("other.example") == IPv4Address("198.18.0.2")
    assert pool.name_of(first) == "v6only.example"
    assert pool.address_of("v6only.example") == first
    assert first in pool and IPv4Address("192.0.2.1") not in pool


def test_each_address_is_an_alias_of_an_id_of_the_pool_owner() -> None:
    _, table, pool = make()
    address = pool.bind("v6only.example")
    realid = pool.realid_of(address)
    assert realid is not None
    assert table.lookup(POOL_OWNER, realid) == "v6only.example"
    assert table.lookup(Owner("192.0.2.10"), realid) is None  # not a client's ID


def test_the_pool_is_bounded_by_its_size_not_the_per_owner_quota() -> None:
    _, _, pool = make("198.18.0.0/28")  # 14 usable addresses, quota 4
    addresses = {pool.bind(f"n{i}.example") for i in range(14)}
    assert len(addresses) == 14
    assert IPv4Address("198.18.0.0") not in addresses  # network and broadcast never used
    assert IPv4Address("198.18.0.15") not in addresses
    with pytest.raises(PoolExhausted):
        pool.bind("one-more.example")
    assert pool.exhausted == 1


def test_an_idle_binding_expires_with_its_id_and_is_quarantined() -> None:
    clock, _, pool = make(ttl=60, quarantine=300)
    address = pool.bind("gone.example")
    clock.now += 61  # last uses are rounded up by ttl/16384: a hair past the TTL
    assert pool.name_of(address) is None
    assert len(pool) == 0 and pool.quarantined == 1
    assert pool.bind("new.example") != address  # not handed out during quarantine
    clock.now += 301
    names = {pool.bind(f"later{i}.example") for i in range(3)}
    assert address not in names  # the cursor moves on: reuse comes only when it wraps


def test_use_refreshes_and_a_pin_holds_a_binding() -> None:
    clock, _, pool = make(ttl=60)
    address = pool.bind("busy.example")
    clock.now += 50
    assert pool.name_of(address) == "busy.example"  # a use: idle time starts again
    clock.now += 50
    token = pool.pin(address)
    assert token is not None
    clock.now += 1000
    assert pool.name_of(address) == "busy.example"  # pinned by an open flow
    pool.unpin(token)
    clock.now += 61
    assert pool.name_of(address) is None


def test_reuse_after_quarantine_in_a_full_pool() -> None:
    clock, _, pool = make("198.18.0.0/30", ttl=60, quarantine=300)  # two addresses
    a = pool.bind("a.example")
    pool.bind("b.example")
    clock.now += 61
    with pytest.raises(PoolExhausted):  # both expired, both in quarantine
        pool.bind("c.example")
    clock.now += 301
    assert pool.bind("c.example") in (a, IPv4Address("198.18.0.2"))


def test_unbound_and_foreign_addresses_name_nothing() -> None:
    _, _, pool = make()
    assert pool.name_of(IPv4Address("198.18.0.200")) is None
    assert pool.name_of(IPv4Address("192.0.2.1")) is None
    assert pool.pin(IPv4Address("198.18.0.200")) is None
    with pytest.raises(InvalidTarget):
        pool.bind("")


def test_the_table_capacity_counts_pool_ids() -> None:
    _, table, pool = make(capacity=2)
    table.associate(Owner("192.0.2.10"), "client.example")
    pool.bind("a.example")
    with pytest.raises(CapacityExceeded):
        pool.bind("b.example")


def test_snapshot_and_restore_keep_addresses_and_quarantines() -> None:
    clock, _, pool = make(ttl=60, quarantine=300)
    kept = pool.bind("kept.example")
    freed = pool.bind("freed.example")
    clock.now += 30
    pool.name_of(kept)
    clock.now += 40  # freed.example idle for 70 s: gone; kept.example for 40 s
    assert pool.name_of(freed) is None
    snapshot = pool.snapshot()
    assert snapshot.bindings == (Binding(kept, "kept.example"),)
    assert [a for a, _ in snapshot.quarantined] == [freed]

    _, _, fresh = make(ttl=60, quarantine=300)
    assert fresh.restore(snapshot) == 1
    assert fresh.name_of(kept) == "kept.example"
    assert fresh.bind("kept.example") == kept
    assert fresh.bind("another.example") not in (kept, freed)  # freed is still quarantined


def test_restore_skips_what_does_not_fit() -> None:
    _, _, pool = make("198.18.0.0/24")
    snapshot = PoolSnapshot(
        (
            Binding(IPv4Address("198.18.0.5"), "a.example"),
            Binding(IPv4Address("198.18.0.6"), "a.example"),  # a name twice
            Binding(IPv4Address("198.18.0.5"), "b.example"),  # an address twice
            Binding(IPv4Address("203.0.113.3"), "c.example"),  # outside the pool
        ),
        (),
    )
    assert pool.restore(snapshot) == 1
    assert pool.address_of("a.example") == IPv4Address("198.18.0.5")
    assert pool.address_of("b.example") is None


def test_changes_count_bindings_made_and_ended() -> None:
    clock, _, pool = make(ttl=60)
    start = pool.changes
    address = pool.bind("a.example")
    pool.bind("a.example")
    assert pool.changes == start + 1
    clock.now += 61
    pool.name_of(address)
    assert pool.changes == start + 2
