"""Stateful property test of the ADDRESS ID table against a plain model.

Invariants checked after random sequences of associate / lookup / find / pin / unpin /
clock moves / expire:

* no live REALID is ever handed out twice (for any owner), and never 0;
* a REALID freed from an owner is not handed to that owner again within the quarantine;
  the ID space counts as exhausted only when every ID is live or (still) quarantined;
* lookup and find return exactly what was associated until it expires (idle TTL, pins);
  another owner's ID looks unknown;
* the same owner and target get the same ID while it lives;
* QuotaExceeded / CapacityExceeded happen exactly when the model is at the limit.

To make ID collisions (and so the in-use and quarantine checks) frequent, the table's
ID stream is replaced by random draws from 0..9 (0 must be skipped) in blocks that hold
every value, so running out of IDs is deterministic and can be checked. Clock steps are
multiples of 1/64 s (exact in binary) and the TTL is 16 s, so the table's rounding of
last-use times (up by ttl/16384 = 1/1024 s) never changes which side of the TTL a step
lands on: an entry is expired iff idle for more than 16 s. Short steps land inside the
table's sweep granule (ttl/64), where expired entries are not yet reclaimed.

Profiles: the default is fast (a few seconds); ``HYPOTHESIS_PROFILE=deep`` runs longer.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from addrmap import AddressTable, CapacityExceeded, Owner, QuotaExceeded, Target

TTL = 16.0
QUARANTINE = 40.0
QUOTA = 3
CAPACITY = 6
ID_SPACE = 10
# The table releases quarantined IDs up to two QUARANTINE/1024 buckets late; on the 1/64 s
# grid an ID is surely free again QUARANTINE + 1/8 s after it expired.
RELEASE_SLACK = 0.125

OWNERS = [
    Owner("192.0.2.1", None),
    Owner("192.0.2.1", "alice"),
    Owner("2001:db8::1", None),
]
TARGETS: list[Target] = [
    IPv4Address("192.0.2.80"),
    IPv4Address("0.0.0.1"),
    IPv6Address("::1"),
    IPv6Address("2001:db8::80"),
    "www.example.org",
    "WWW.Example.ORG",  # the same target as the one above
    "mail.example.org",
]
STEPS = [1 / 64, 0.125, 0.5, 1.0, 4.0, 8.0, 15.5, 16.0, 16 + 1 / 64, 16.125, 16.5, 20.0, 45.0]

settings.register_profile(
    "addrmap-fast",
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "addrmap-deep",
    max_examples=3000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Applied to this machine only, so other suites keep their own settings.
PROFILE = settings.get_profile(
    "addrmap-deep" if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else "addrmap-fast"
)


def canonical(target: Target) -> Target:
    return target.lower() if isinstance(target, str) else target


class SmallIds:
    """Random draws from 0..ID_SPACE-1, in blocks of 2 * ID_SPACE that contain every value.

    Random, so a draw often hits a live or quarantined ID; complete blocks, so the
    table's 64 draws before giving up see every ID and running out is deterministic.
    """

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._pending: list[int] = []

    def next(self) -> int:
        if not self._pending:
            block = list(range(ID_SPACE)) + [self._rng.randrange(ID_SPACE) for _ in range(ID_SPACE)]
            self._rng.shuffle(block)
            self._pending = block
        return self._pending.pop()


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ModelEntry:
    realid: int
    last_use: float
    pins: int = 0


class AddressTableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.table = AddressTable(
            clock=self.clock,
            ttl=TTL,
            quarantine=QUARANTINE,
            per_owner_quota=QUOTA,
            capacity=CAPACITY,
        )
        self.live: dict[tuple[Owner, Target], ModelEntry] = {}
        # (owner, realid) -> when its entry expired: not reissued to that owner before
        # expired + QUARANTINE. The table's quarantine is global: realid -> expiry too.
        self.expired_at: dict[tuple[Owner, int], float] = {}
        self.id_expired_at: dict[int, float] = {}
        self.ever_issued: set[int] = set()

    @initialize(seed=st.integers(0, 2**32 - 1))
    def use_small_id_space(self, seed: int) -> None:
        self.table._ids = SmallIds(seed)  # type: ignore[assignment]

    # ------------------------------------------------------------------ model

    def _expire_model(self) -> None:
        """Drop model entries idle for more than TTL (pinned ones never expire)."""
        now = self.clock.now
        for key, entry in list(self.live.items()):
            if entry.pins == 0 and now - entry.last_use > TTL:
                del self.live[key]
                self.expired_at[(key[0], entry.realid)] = entry.last_use + TTL
                self.id_expired_at[entry.realid] = entry.last_use + TTL

    def _by_id(self, realid: int) -> tuple[tuple[Owner, Target], ModelEntry] | None:
        for key, entry in self.live.items():
            if entry.realid == realid:
                return key, entry
        return None

    def _known_ids(self) -> list[int]:
        return sorted(self.ever_issued) or [1]

    # ------------------------------------------------------------------ rules

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(TARGETS))
    def associate(self, owner: Owner, name: Target) -> None:
        target = name  # rule() reserves the keyword "target"
        self._expire_model()
        key = (owner, canonical(target))
        existing = self.live.get(key)
        owned = sum(1 for o, _ in self.live if o == owner)
        try:
            realid = self.table.associate(owner, target)
        except QuotaExceeded as error:
            assert existing is None and owned >= QUOTA, "quota refused below the quota"
            assert error.owner == owner and error.limit == "per_owner_quota"
            event("refused: quota")
            return
        except CapacityExceeded as error:
            assert existing is None
            if error.limit == "capacity":
                assert len(self.live) >= CAPACITY, "capacity refused below the capacity"
                event("refused: capacity")
                return
            assert error.limit == "id_space"
            live_ids = {entry.realid for entry in self.live.values()}
            now = self.clock.now
            for realid in range(1, ID_SPACE):
                expired = self.id_expired_at.get(realid)
                held = expired is not None and now < expired + QUARANTINE + RELEASE_SLACK
                assert realid in live_ids or held, f"ID space 'exhausted' but {realid} free"
            event("refused: ID space")
            return
        if existing is not None:
            assert realid == existing.realid, "same owner and target, different ID"
            existing.last_use = self.clock.now
            return
        assert owned < QUOTA, "quota not enforced"
        assert len(self.live) < CAPACITY, "capacity not enforced"
        assert 1 <= realid < ID_SPACE
        clash = self._by_id(realid)
        assert clash is None, f"live ID {realid} handed out twice ({clash})"
        expired = self.expired_at.get((owner, realid))
        if expired is not None:
            assert self.clock.now >= expired + QUARANTINE, f"ID {realid} reissued in quarantine"
            event("ID reissued to its former owner after quarantine")
        self.live[key] = ModelEntry(realid, self.clock.now)
        self.ever_issued.add(realid)

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(TARGETS))
    def associate_again(self, owner: Owner, name: Target) -> None:
        """The same rule twice, so associations make up a larger share of the steps."""
        self.associate(owner, name)

    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def lookup(self, owner: Owner, data: st.DataObject) -> None:
        self._expire_model()
        realid = data.draw(st.sampled_from(self._known_ids()) | st.integers(0, ID_SPACE))
        found = self._by_id(realid)
        result = self.table.lookup(owner, realid)
        if found is not None and found[0][0] == owner:
            assert result == found[0][1], f"lookup({realid}) gave {result!r}"
            found[1].last_use = self.clock.now
        else:
            assert result is None, f"lookup of unknown/foreign/expired ID gave {result!r}"

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(TARGETS))
    def find(self, owner: Owner, name: Target) -> None:
        target = name
        self._expire_model()
        entry = self.live.get((owner, canonical(target)))
        result = self.table.find(owner, target)
        if entry is None:
            assert result is None
        else:
            assert result == entry.realid
            entry.last_use = self.clock.now

    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def pin(self, owner: Owner, data: st.DataObject) -> None:
        self._expire_model()
        realid = data.draw(st.sampled_from(self._known_ids()))
        found = self._by_id(realid)
        pinned = self.table.pin(owner, realid)
        if found is not None and found[0][0] == owner:
            assert pinned
            found[1].pins += 1
            found[1].last_use = self.clock.now
        else:
            assert not pinned

    @precondition(lambda self: any(entry.pins for entry in self.live.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        self._expire_model()
        pinned = [(key, entry) for key, entry in self.live.items() if entry.pins]
        (owner, _target), entry = data.draw(st.sampled_from(pinned))
        self.table.unpin(owner, entry.realid)
        entry.pins -= 1
        if entry.pins == 0:
            entry.last_use = self.clock.now

    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def unpin_foreign_or_unpinned(self, owner: Owner, data: st.DataObject) -> None:
        """Must change nothing (checked by the other rules and invariants)."""
        self._expire_model()
        realid = data.draw(st.sampled_from(self._known_ids()))
        found = self._by_id(realid)
        if found is not None and found[0][0] == owner and found[1].pins:
            return  # a legitimate unpin: covered by the unpin rule
        self.table.unpin(owner, realid)

    @rule(step=st.sampled_from(STEPS))
    def advance(self, step: float) -> None:
        self.clock.now += step

    @rule(budget=st.none() | st.integers(1, 4))
    def expire(self, budget: int | None) -> None:
        self._expire_model()
        before = len(self.table)
        freed = self.table.expire(budget)
        assert len(self.table) == before - freed
        if budget is None:
            assert len(self.table) == len(self.live), "expire() left expired entries behind"
        else:
            assert freed <= budget

    # ------------------------------------------------------------- invariants

    @invariant()
    def counts_agree(self) -> None:
        self._expire_model()
        stats = self.table.stats
        assert stats.pinned == sum(1 for entry in self.live.values() if entry.pins)
        assert stats.live >= len(self.live)  # may still hold expired, unswept entries
        for owner in OWNERS:
            owned = sum(1 for o, _ in self.live if o == owner)
            assert self.table.owner_count(owner) >= owned


AddressTableMachine.TestCase.settings = PROFILE
TestAddressTable = AddressTableMachine.TestCase
