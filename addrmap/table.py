"""The ADDRESS ID association table (wire profile, section 4).

Theory of operation
-------------------
An entry binds a REALID (1..0xFFFFFF) to a target (IPv4 address, IPv6 address, or a
lower-cased domain name) for one owner (client IP + authenticated user name).

* REALIDs are **globally unique among live entries**: one dict ``realid -> entry`` serves
  every owner, and a lookup by another owner is answered exactly like an unknown ID.
  IDs are drawn from a keyed SHAKE-256 stream (:class:`addrmap.ids.IdStream`), so they
  are unpredictable and non-sequential; 0 and IDs in use or in quarantine are skipped.
* Each owner has a dict ``target key -> realid`` for idempotent association and
  :meth:`AddressTable.find`. Its size is the owner's quota count.
* Expiry is an idle TTL from last use. Lookups check it lazily and exactly: an entry is
  gone the moment ``now - last_use >= ttl``, whether or not it has been reclaimed yet.
  (``last_use`` is rounded up to a shared stamp at most ``ttl / 16384`` later, so
  entries share float objects; an entry may thus live that much longer, never less.)
  Reclaiming uses a **timing wheel**: every live entry sits in exactly one bucket, keyed
  by ``floor(deadline / granularity)``, where the deadline it was filed under is never
  later than its real one (a refresh only moves the real deadline later). A sweep takes
  due buckets in order from a heap of bucket keys; an entry that was refreshed (or is
  pinned) meanwhile is filed again under its new deadline. So a refresh costs one float
  store, and each entry is examined about once per TTL: no full scans.
* :meth:`AddressTable.associate` does a little sweeping (a fixed budget) when something
  is due; :meth:`AddressTable.expire` sweeps everything due; reaching a limit triggers a
  full sweep before refusing, so limits count only entries that are really live.
* Freed REALIDs go into a **global** quarantine (:class:`addrmap.ids.Quarantine`): they
  are not reissued to anyone, the same owner included, for ``quarantine`` seconds
  counted from the moment the entry expired (released at most ``quarantine / 1024``
  later).
  Global is stricter than the profile asks and needs no per-owner bookkeeping. Each
  entry lives at least ``ttl`` before it is freed, so at most about
  ``capacity * (quarantine / ttl + 1)`` IDs are quarantined at once (7 M with defaults,
  of 16.7 M); if live plus quarantined IDs ever leave no free ID, :class:`CapacityExceeded`
  is raised with ``limit == "id_space"`` rather than cutting a quarantine short.
* Entries are plain ``__slots__`` objects; IP targets are keyed by the address's own int
  (shared with the address object, so the key costs nothing); see docs/performance.md.

IDs belong to the table, not to a connection: they outlive the TCP connection that
created them. Pins (a live session using an ID) are counted; a pinned entry never
expires and its idle time starts again when the last pin is dropped.

The table is not thread-safe; the gateway uses it from its event loop only.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeAlias

from addrmap.errors import CapacityExceeded, InvalidTarget, QuotaExceeded
from addrmap.ids import MAX_REALID, IdStream, Quarantine
from addrmap.owner import Owner, Target

_Key: TypeAlias = int | str | tuple[int, str | None]

_IPV4_TOP = 0xFFFFFFFF
_MAX_NAME = 255  # a domain name must fit ATYP X'03' (1..255 octets)
_SWEEP_BUDGET = 16  # wheel entries / quarantined IDs handled per associate() when due
_ID_DRAWS = 64  # fresh draws before the ID space counts as exhausted
_MAX_CAPACITY = (MAX_REALID + 1) // 2  # keep random draws cheap: at least half stay free


@dataclass(frozen=True, slots=True)
class TableStats:
    """A snapshot of the table's counters."""

    live: int
    """Entries held (expired ones not yet reclaimed included; :meth:`expire` first)."""
    owners: int
    """Owners holding at least one entry."""
    pinned: int
    """Entries with at least one pin."""
    quarantined: int
    """Freed REALIDs not yet reusable."""
    freed: int
    """Entries freed since the table was created."""
    quota_refusals: int
    """Associations refused by the per-owner quota."""
    capacity_refusals: int
    """Associations refused by the capacity or the ID space."""

    @property
    def issued(self) -> int:
        """Entries created since the table was created: each is live or was freed."""
        return self.live + self.freed


class _OwnerState:
    __slots__ = ("by_target", "owner")

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.by_target: dict[_Key, int] = {}


_FREED = Owner("", "\0freed")  # marks entries left behind in the wheel (compared by identity)


class _Entry:
    # Three slots keep an entry at 56 octets; the REALID is recoverable from the owner's
    # target index, and pins live in a separate dict (few entries are pinned).
    __slots__ = ("last_use", "owner", "target")

    def __init__(self, owner: Owner, target: Target, last_use: float) -> None:
        self.owner = owner
        self.target = target
        self.last_use = last_use


def _slot_getter(name: str, expected: object, *probes: object) -> Callable[[Any], Any] | None:
    """A C-level getter for ipaddress's private slot ``name``, if it holds ``expected``.

    ``int(address)`` and ``address.scope_id`` run Python code (about 120 and 60 ns), and
    run on every association; reading the slot costs about 10 ns and yields the very
    same object. A future ipaddress without the slot falls back to the public API.
    """
    getter = operator.attrgetter(name)
    try:
        return getter if all(getter(probe) == expected for probe in probes) else None
    except AttributeError:
        return None


_address_int: Callable[[IPv4Address | IPv6Address], int] = (
    _slot_getter("_ip", 1, IPv4Address(1), IPv6Address(1)) or int
)
_scope_id: Callable[[IPv6Address], str | None] = _slot_getter(
    "_scope_id", "eth0", IPv6Address("fe80::1%eth0")
) or (lambda address: address.scope_id)


def _key_of(target: Target) -> _Key:
    """The index key of a stored (already normalized) target.

    IPv4 addresses and ordinary IPv6 addresses use the address's own int object (no
    extra memory). IPv6 addresses that could collide with an IPv4 int (::/96) or carry a
    zone are keyed by a tuple instead; names are keyed by themselves.
    """
    if isinstance(target, str):
        return target
    value = _address_int(target)
    if isinstance(target, IPv4Address):
        return value
    scope = _scope_id(target)
    if value > _IPV4_TOP and scope is None:
        return value
    return (value, scope)


def _normalize(target: Target) -> tuple[Target, _Key]:
    kind = type(target)  # exact types first: this runs on every association
    if kind is IPv4Address or kind is IPv6Address:
        return target, _key_of(target)
    if isinstance(target, str):
        name = target if target.islower() else target.lower()
        if not 0 < len(name) <= _MAX_NAME:
            raise InvalidTarget(f"domain name must be 1..{_MAX_NAME} characters: {target!r}")
        return name, name
    if isinstance(target, IPv4Address | IPv6Address):
        return target, _key_of(target)
    raise InvalidTarget(f"target must be an IP address or a domain name, not {target!r}")


class AddressTable:
    """REALID <-> (owner, target) associations with idle expiry, quarantine and limits."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        ttl: float = 600.0,
        quarantine: float = 3600.0,
        per_owner_quota: int = 4096,
        capacity: int = 1_000_000,
        secret: bytes | None = None,
    ) -> None:
        """Create an empty table.

        ``clock`` returns seconds (monotonic). ``ttl`` is the idle lifetime, ``quarantine``
        how long a freed REALID stays unusable (0 disables it). ``secret`` keys the ID
        stream: the same secret gives the same sequence of IDs (tests); ``None`` draws a
        random key.
        """
        if not ttl > 0:
            raise ValueError("ttl must be positive")
        if not quarantine >= 0:
            raise ValueError("quarantine must be >= 0")
        if per_owner_quota < 1:
            raise ValueError("per_owner_quota must be >= 1")
        if not 1 <= capacity <= _MAX_CAPACITY:
            raise ValueError(f"capacity must be in 1..{_MAX_CAPACITY}")
        self._clock = clock
        self._ttl = float(ttl)
        self._quota = per_owner_quota
        self._capacity = capacity
        # Reclaim lag is at most one granularity; a few hundred buckets span a TTL.
        self._granularity = min(1.0, self._ttl / 64)
        # Last-use times are rounded *up* to a shared float per window of `resolution`, so
        # live entries (all used within one TTL) share at most ~16384 float objects
        # instead of owning one each (24 octets). Entries live at most this much longer.
        self._resolution = self._ttl / 16384
        self._stamp = float("-inf")
        self._ids = IdStream(secret)
        self._quarantine = Quarantine(float(quarantine))
        self._by_id: dict[int, _Entry] = {}
        self._owners: dict[Owner, _OwnerState] = {}
        self._pins: dict[int, int] = {}
        self._buckets: dict[int, list[_Entry]] = {}
        self._bucket_heap: list[int] = []
        self._due = float("inf")  # earliest time associate() has sweeping to do
        self._freed = 0
        self._quota_refusals = 0
        self._capacity_refusals = 0
        #: told of every entry freed (expired or reclaimed), as it is freed; see on_free()
        self._free_listener: Callable[[int, Owner, Target], None] | None = None

    # ----------------------------------------------------------------- public API

    @property
    def clock(self) -> Callable[[], float]:
        """The table's time source (aliases kept beside it use the same)."""
        return self._clock

    @property
    def ttl(self) -> float:
        """Idle lifetime of an entry, in seconds."""
        return self._ttl

    @property
    def quarantine_period(self) -> float:
        """How long a freed REALID stays unusable, in seconds (0: not at all)."""
        return self._quarantine.period

    @property
    def granularity(self) -> float:
        """Longest delay between an entry expiring and :meth:`expire` freeing it.

        Only memory and :meth:`__len__` see this delay; lookups and limits are exact.
        """
        return self._granularity

    def on_free(self, listener: Callable[[int, Owner, Target], None] | None) -> None:
        """Call ``listener(realid, owner, target)`` whenever an entry is freed.

        An alias kept outside the table (a fake-IP pool address) learns here that its ID
        is gone, at the moment the table frees it. The listener must not call the table.
        """
        self._free_listener = listener

    def associate(self, owner: Owner, target: Target, *, quota: int | None = None) -> int:
        """Return the owner's REALID for ``target``, creating it if needed.

        The same owner and target give the same ID while it lives; the call counts as a
        use. Raises :class:`QuotaExceeded` or :class:`CapacityExceeded` when a limit is
        reached (after reclaiming expired entries), :class:`InvalidTarget` for a bad one.
        ``quota`` replaces the per-owner quota for this owner (the gateway's own fake-IP
        pool is bounded by its size instead).
        """
        stored, key = _normalize(target)
        now = self._clock()
        if now >= self._due:
            self._maintain(now)
        owners = self._owners
        by_id = self._by_id
        state = owners.get(owner)
        if state is not None:
            realid = state.by_target.get(key)
            if realid is not None:
                entry = by_id[realid]
                if now - entry.last_use < self._ttl or realid in self._pins:
                    entry.last_use = self._stamp_for(now)
                    return realid
                self._free(realid, entry, now)
                state = owners.get(owner)  # dropped if that was its last entry
        # Below, any sweep may drop the owner's state (when it empties): fetch it again.
        limit = self._quota if quota is None else quota
        if (state is not None and len(state.by_target) >= limit) or len(by_id) >= self._capacity:
            self._check_limits(owner, now, limit)
            state = owners.get(owner)
        realid = self._ids.next()
        bitmap = self._quarantine.bitmap
        if not realid or realid in by_id or bitmap[realid >> 3] & (1 << (realid & 7)):
            realid = self._draw_id(owner, now)  # rarely needed: the first draw is free
            state = owners.get(owner)
        if state is None:
            state = owners[owner] = _OwnerState(owner)
        stamp = self._stamp  # inlined _stamp_for()
        if now >= stamp:
            stamp = self._stamp = now + self._resolution
        entry = _Entry(state.owner, stored, stamp)
        by_id[realid] = entry
        state.by_target[key] = realid
        bucket = int((stamp + self._ttl) // self._granularity)
        filed = self._buckets.get(bucket)
        if filed is None:
            self._file_in(entry, bucket)
        else:
            filed.append(entry)
        return realid

    def lookup(self, owner: Owner, realid: int) -> Target | None:
        """Return the target ``realid`` names for ``owner``, refreshing its last use.

        ``None`` when the ID is unknown, expired or belongs to another owner; the three
        cases are indistinguishable by design.
        """
        entry = self._by_id.get(realid)
        if entry is None or entry.owner != owner:
            return None
        now = self._clock()
        if now - entry.last_use >= self._ttl and realid not in self._pins:
            self._free(realid, entry, now)
            return None
        stamp = self._stamp  # inlined _stamp_for(): this is the hot path
        if now >= stamp:
            stamp = self._stamp = now + self._resolution
        entry.last_use = stamp
        return entry.target

    def peek(self, owner: Owner, realid: int) -> Target | None:
        """What ``realid`` names for ``owner``, without counting a use (saving state)."""
        entry = self._by_id.get(realid)
        if entry is None or entry.owner != owner:
            return None
        if self._clock() - entry.last_use >= self._ttl and realid not in self._pins:
            return None
        return entry.target

    def find(self, owner: Owner, target: Target) -> int | None:
        """Return the owner's live REALID for ``target`` (refreshing it), else ``None``.

        Raises :class:`InvalidTarget` for a target :meth:`associate` would refuse.
        """
        _stored, key = _normalize(target)
        state = self._owners.get(owner)
        if state is None:
            return None
        realid = state.by_target.get(key)
        if realid is None:
            return None
        entry = self._by_id[realid]
        now = self._clock()
        if now - entry.last_use >= self._ttl and realid not in self._pins:
            self._free(realid, entry, now)
            return None
        entry.last_use = self._stamp_for(now)
        return realid

    def pin(self, owner: Owner, realid: int) -> bool:
        """Mark ``realid`` as used by a live session: it will not expire while pinned.

        Pins are counted; each successful pin needs one :meth:`unpin`. Returns ``False``
        (and pins nothing) when the ID is unknown, expired or another owner's.
        """
        entry = self._by_id.get(realid)
        if entry is None or entry.owner != owner:
            return False
        now = self._clock()
        pins = self._pins
        if now - entry.last_use >= self._ttl and realid not in pins:
            self._free(realid, entry, now)
            return False
        pins[realid] = pins.get(realid, 0) + 1
        entry.last_use = self._stamp_for(now)
        return True

    def unpin(self, owner: Owner, realid: int) -> None:
        """Drop one pin; when the last goes, the idle TTL starts again from now.

        Unpinning an ID that is not pinned by ``owner`` does nothing.
        """
        count = self._pins.get(realid)
        if count is None:
            return
        entry = self._by_id[realid]
        if entry.owner != owner:
            return
        if count > 1:
            self._pins[realid] = count - 1
        else:
            del self._pins[realid]
            entry.last_use = self._stamp_for(self._clock())

    def expire(self, budget: int | None = None) -> int:
        """Free every entry idle for at least ``ttl`` and end due quarantines.

        Returns how many entries this call freed (entries a lookup already found expired
        were freed then, and are not counted again). Cost is proportional to the entries
        due, not to the table's size: a few microseconds each. ``budget`` caps the entries
        examined (and the quarantined IDs released) by this call, bounding the pause when
        very many fall due at once; call again later for the rest.
        """
        now = self._clock()
        freed = self._sweep(now, exact=True, budget=budget)
        self._quarantine.release(now, budget)
        self._update_due()
        return freed

    def __len__(self) -> int:
        """Entries held, expired ones not yet reclaimed included (call :meth:`expire`)."""
        return len(self._by_id)

    def owner_count(self, owner: Owner) -> int:
        """How many entries ``owner`` holds (what its quota is checked against)."""
        state = self._owners.get(owner)
        return 0 if state is None else len(state.by_target)

    @property
    def stats(self) -> TableStats:
        """Current counters."""
        return TableStats(
            live=len(self._by_id),
            owners=len(self._owners),
            pinned=len(self._pins),
            quarantined=len(self._quarantine),
            freed=self._freed,
            quota_refusals=self._quota_refusals,
            capacity_refusals=self._capacity_refusals,
        )

    # ------------------------------------------- state hooks (addrmap.snapshot only)

    def _held(self) -> Iterator[tuple[int, Owner, Target, float, bool]]:
        """``(realid, owner, target, last_use, pinned)`` of every entry held.

        Expired entries not reclaimed yet are included: the caller tells them apart.
        """
        pins = self._pins
        for realid, entry in self._by_id.items():
            yield realid, entry.owner, entry.target, entry.last_use, realid in pins

    def _quarantined(self) -> list[tuple[int, float]]:
        """``(realid, release time)`` of every quarantined REALID."""
        return self._quarantine.items()

    def _restore_entry(self, realid: int, owner: Owner, target: Target, last_use: float) -> None:
        """Hold an entry made by an earlier process, exactly as if associate() had made it:
        indexed by ID and by owner + target, and filed in the wheel under its deadline."""
        stored, key = _normalize(target)
        state = self._owners.get(owner)
        if not 0 < realid <= MAX_REALID or realid in self._by_id or realid in self._quarantine:
            raise ValueError(f"REALID {realid} is out of range, live or quarantined")
        if state is not None and key in state.by_target:
            raise ValueError(f"{owner} already holds an ID for {stored}")
        if state is None:
            state = self._owners[owner] = _OwnerState(owner)
        entry = _Entry(state.owner, stored, last_use)
        self._by_id[realid] = entry
        state.by_target[key] = realid
        self._file_in(entry, int((last_use + self._ttl) // self._granularity))

    def _restore_quarantined(self, realid: int, freed_at: float) -> None:
        """Quarantine ``realid`` as if an entry holding it had been freed at ``freed_at``."""
        if not 0 < realid <= MAX_REALID or realid in self._by_id or realid in self._quarantine:
            raise ValueError(f"REALID {realid} is out of range, live or quarantined")
        release = self._quarantine.add(realid, freed_at)
        if release < self._due:
            self._due = release

    # ---------------------------------------------------------------- internals

    def _stamp_for(self, now: float) -> float:
        """The shared last-use stamp for ``now``: in ``(now, now + resolution]``."""
        if now >= self._stamp:
            self._stamp = now + self._resolution
        return self._stamp

    def _check_limits(self, owner: Owner, now: float, quota: int) -> None:
        """At a limit: reclaim everything expired, then refuse if still there."""
        self._sweep(now, exact=True)
        self._update_due()
        if self.owner_count(owner) >= quota:
            self._quota_refusals += 1
            raise QuotaExceeded(quota, owner)
        if len(self._by_id) >= self._capacity:
            self._capacity_refusals += 1
            raise CapacityExceeded(self._capacity, owner)

    def _draw_id(self, owner: Owner, now: float) -> int:
        by_id = self._by_id
        quarantine = self._quarantine
        for attempt in range(2 * _ID_DRAWS):
            if attempt == _ID_DRAWS:
                # Crowded ID space: reclaim whatever is due, then try again.
                self._sweep(now, exact=True)
                quarantine.release(now, None)
                self._update_due()
            realid = self._ids.next()
            if realid and realid not in by_id and realid not in quarantine:
                return realid
        self._capacity_refusals += 1
        raise CapacityExceeded(MAX_REALID, owner, limit="id_space")

    def _free(self, realid: int, entry: _Entry, now: float) -> None:
        self._free_known(realid, entry, self._owners[entry.owner], _key_of(entry.target), now)

    def _free_known(
        self, realid: int, entry: _Entry, state: _OwnerState, key: _Key, now: float
    ) -> None:
        del self._by_id[realid]
        by_target = state.by_target
        del by_target[key]
        if not by_target:
            del self._owners[state.owner]
        entry.owner = _FREED  # the wheel may still hold it; the sweep skips it
        # Quarantine counts from the moment the entry expired, not from when a sweep got
        # to it, so when an ID becomes reusable does not depend on sweep timing.
        release = self._quarantine.add(realid, min(now, entry.last_use + self._ttl))
        self._freed += 1
        if release < self._due:
            self._due = release
        if self._free_listener is not None:
            self._free_listener(realid, state.owner, entry.target)

    def _file_in(self, entry: _Entry, bucket: int) -> None:
        entries = self._buckets.get(bucket)
        if entries is None:
            self._buckets[bucket] = [entry]
            heapq.heappush(self._bucket_heap, bucket)
            # A bucket can be swept incrementally once it is complete.
            ready = (bucket + 1) * self._granularity
            if ready < self._due:
                self._due = ready
        else:
            entries.append(entry)

    def _maintain(self, now: float) -> None:
        """associate()'s share of the sweeping: bounded work, complete buckets only."""
        self._sweep(now, exact=False, budget=_SWEEP_BUDGET)
        self._quarantine.release(now, _SWEEP_BUDGET)
        self._update_due()

    def _update_due(self) -> None:
        wheel = float("inf")
        if self._bucket_heap:
            wheel = (self._bucket_heap[0] + 1) * self._granularity
        self._due = min(wheel, self._quarantine.next_release())

    def _sweep(self, now: float, *, exact: bool, budget: int | None = None) -> int:
        """Examine due wheel buckets; return how many entries were freed.

        ``exact`` includes the bucket the current time falls in, so everything expired
        by ``now`` is freed; entries of that bucket not yet expired are filed back into
        it (a later exact sweep looks at them again). Otherwise only complete buckets
        are taken, which never needs such a hold-over.
        """
        granularity = self._granularity
        current = int(now // granularity)
        last = current if exact else current - 1
        heap = self._bucket_heap
        buckets = self._buckets
        pins = self._pins
        owners = self._owners
        ttl = self._ttl
        held_over: list[_Entry] = []
        freed = 0
        work = 0
        while heap and heap[0] <= last and (budget is None or work < budget):
            entries = buckets[heap[0]]
            while entries and (budget is None or work < budget):
                work += 1
                entry = entries.pop()
                if entry.owner is _FREED:
                    continue
                state = owners[entry.owner]
                key = _key_of(entry.target)
                realid = state.by_target[key]
                if realid in pins:
                    deadline = now + ttl
                elif now - entry.last_use >= ttl:
                    self._free_known(realid, entry, state, key, now)
                    freed += 1
                    continue
                else:
                    deadline = entry.last_use + ttl
                bucket = int(deadline // granularity)
                if bucket > last:
                    self._file_in(entry, bucket)
                elif exact:
                    held_over.append(entry)
                else:  # only reachable through float rounding
                    self._file_in(entry, last + 1)
            if not entries:
                del buckets[heapq.heappop(heap)]
        for entry in held_over:
            self._file_in(entry, current)
        return freed
