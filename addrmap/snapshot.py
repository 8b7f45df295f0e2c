"""The ADDRESS ID table as plain data, so it survives a restart (wire profile section 4).

A client may keep an ID for as long as it keeps using it, across gateway restarts; a
restart must neither forget a live ID (the client would get REP X'09' for an ID it was
given minutes ago) nor hand a quarantined REALID to another target (a stale ID would
silently reach another host). :func:`snapshot` turns a table into a
:class:`TableSnapshot`; :func:`restore` puts one back into a fresh table, ageing it by
the time the gateway was down. Both are pure: no I/O, and no clock but the table's.
:mod:`translator.idtable.statefile` writes snapshots to disk.

Times are relative (idle seconds, seconds of quarantine left), never clock readings:
the table's clock is monotonic and starts again with the process, so an absolute time
would mean nothing to the next one. The caller measures the downtime with the wall
clock and passes it to :func:`restore` as ``elapsed``.

Choices:

* Entries of :data:`~addrmap.fakeip.POOL_OWNER` are left out: the transparent front
  saves its own bindings and binds them again on start (new IDs behind the same
  addresses; no client ever sees a pool entry's REALID).
* An entry that has expired but was not reclaimed yet is gone for every lookup, so it
  is reported as *quarantined*, with the quarantine it has left counted from the moment
  it expired, exactly as the table will count it when it gets to reclaim it. Leaving it
  out would let the next process hand its REALID to another target at once.
* A pinned entry is in use by a session, and sessions end with the process: it is saved
  with no idle time and, on restore, its idle time starts at the snapshot.
* Restored entries count against the quota and the capacity like any other, but are not
  refused by them: if the limits were lowered meanwhile, new associations are refused
  until enough restored entries expire, and no live ID is forgotten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Literal, NamedTuple, TypeAlias

from addrmap.fakeip import POOL_OWNER
from addrmap.ids import MAX_REALID
from addrmap.owner import Owner, Target
from addrmap.table import AddressTable, _normalize

TargetKind: TypeAlias = Literal["ipv4", "ipv6", "name"]
TARGET_KINDS: tuple[TargetKind, ...] = ("ipv4", "ipv6", "name")


class SavedEntry(NamedTuple):
    """One live entry: what it names, whose it is, and how long it has been idle.

    A NamedTuple, not a dataclass: a table holds up to a million entries, a tuple is
    built several times faster, and JSON writes it as an array as it is.
    """

    realid: int
    owner_ip: str  # the owner's client address, normalized (Owner.ip)
    owner_user: str | None
    target_kind: TargetKind
    target: str  # an address (an IPv6 zone after "%") or a lower-case name
    # Seconds since the last use; 0 for a pinned entry. May be a hair below 0: the table
    # rounds last-use times up by at most ttl / 16384.
    idle: float
    pinned: bool  # in use by a session at the snapshot: idle time starts at the snapshot

    @property
    def owner(self) -> Owner:
        return Owner(self.owner_ip, self.owner_user)


@dataclass(frozen=True, slots=True)
class TableSnapshot:
    """The live entries and the quarantined REALIDs, with the seconds of quarantine left."""

    entries: tuple[SavedEntry, ...]
    quarantined: tuple[tuple[int, float], ...]


def snapshot(table: AddressTable) -> TableSnapshot:
    """The table's state now (by its own clock), without counting as a use of anything."""
    now = table.clock()
    ttl = table.ttl
    period = table.quarantine_period
    entries: list[SavedEntry] = []
    quarantined: list[tuple[int, float]] = []
    for realid, owner, target, last_use, pinned in table._held():
        if owner == POOL_OWNER:
            continue
        if pinned:
            idle = 0.0
        elif now - last_use >= ttl:
            # Expired, not yet reclaimed: quarantined from the moment it expired.
            left = last_use + ttl + period - now
            if period > 0 and left > 0:
                quarantined.append((realid, left))
            continue
        else:
            idle = now - last_use
        kind, text = target_text(target)
        entries.append(SavedEntry(realid, owner.ip, owner.user, kind, text, idle, pinned))
    for realid, release in table._quarantined():
        if release > now:  # an ID due for release is free already, only not swept yet
            quarantined.append((realid, release - now))
    return TableSnapshot(tuple(entries), tuple(quarantined))


def restore(table: AddressTable, snap: TableSnapshot, elapsed: float) -> int:
    """Load ``snap`` into an empty ``table``, aged by ``elapsed`` seconds of downtime.

    An entry idle for at least the TTL once ``elapsed`` is added is not restored; its
    REALID is quarantined for what it would have had left. Quarantines are shortened by
    ``elapsed`` (and never run longer than the table's own period). Returns how many
    entries were restored live.

    Raises ValueError, leaving the table untouched, when the table is not empty (no
    entries and nothing quarantined), ``elapsed`` is negative or not finite, or the
    snapshot does not make sense (see :func:`check`).
    """
    if not (math.isfinite(elapsed) and elapsed >= 0):
        raise ValueError(f"elapsed must be a finite number of seconds >= 0, not {elapsed!r}")
    if len(table) or table.stats.quarantined:
        raise ValueError("a snapshot can only be restored into an empty table")
    targets = check(snap)
    now = table.clock()
    ttl = table.ttl
    period = table.quarantine_period
    # A (hand-made) idle time far below zero must not give an entry a longer life than
    # the wheel's granularity; snapshot() never writes one below -ttl/16384.
    floor = -table.granularity
    owners: dict[tuple[str, str | None], Owner] = {}  # one Owner object per owner
    restored = 0
    for saved, target in zip(snap.entries, targets, strict=True):
        idle = elapsed if saved.pinned else max(saved.idle, floor) + elapsed
        if idle < ttl:
            who = (saved.owner_ip, saved.owner_user)
            owner = owners.get(who)
            if owner is None:
                owner = owners[who] = Owner(*who)
            table._restore_entry(saved.realid, owner, target, now - idle)
            restored += 1
            continue
        expired_at = now - idle + ttl
        if period > 0 and expired_at + period > now:
            table._restore_quarantined(saved.realid, expired_at)
    for realid, remaining in snap.quarantined:
        left = min(remaining, period) - elapsed
        if left > 0:
            # The quarantine ends ``period`` after the ID was freed: date the freeing back.
            table._restore_quarantined(realid, now + left - period)
    return restored


def check(snap: TableSnapshot) -> list[Target]:
    """The targets of ``snap.entries``, parsed; ValueError when ``snap`` is inconsistent.

    Every REALID an int in 1..MAX_REALID and present at most once (live or quarantined),
    every target valid for its kind by the table's own rules, no owner holding two IDs
    for one target, finite times. Both the state file's loader and :func:`restore` run
    it before anything is restored, so a bad snapshot changes nothing.
    """
    seen = bytearray((MAX_REALID >> 3) + 1)  # a bitmap: 2 MiB, whatever the table's size
    held: dict[tuple[str, str | None], set[object]] = {}
    targets: list[Target] = []
    realids = [saved.realid for saved in snap.entries]
    realids.extend(realid for realid, _left in snap.quarantined)
    for realid in realids:
        if type(realid) is not int or not 0 < realid <= MAX_REALID:
            raise ValueError(f"REALID {realid!r} is not an integer in 1..{MAX_REALID}")
        bit = 1 << (realid & 7)
        if seen[realid >> 3] & bit:
            raise ValueError(f"REALID {realid} appears twice")
        seen[realid >> 3] |= bit
    for saved in snap.entries:
        if not _finite(saved.idle):
            raise ValueError(f"REALID {saved.realid}: idle time {saved.idle!r} is not finite")
        stored, key = _normalize(parse_target(saved.target_kind, saved.target))
        keys = held.setdefault((saved.owner_ip, saved.owner_user), set())
        if key in keys:
            raise ValueError(f"{saved.owner} holds two IDs for {stored}")
        keys.add(key)
        targets.append(stored)
    for realid, remaining in snap.quarantined:
        if not _finite(remaining):
            raise ValueError(f"REALID {realid}: quarantine left {remaining!r} is not finite")
    return targets


def target_text(target: Target) -> tuple[TargetKind, str]:
    """A target's kind and text, as a snapshot keeps it (the inverse of parse_target)."""
    if isinstance(target, IPv4Address):
        return "ipv4", str(target)
    if isinstance(target, IPv6Address):
        return "ipv6", str(target)  # with "%zone" when it has one
    return "name", target


def parse_target(kind: str, text: str) -> Target:
    """The target ``text`` of ``kind`` names; ValueError when it does not parse."""
    if type(text) is not str:
        raise ValueError(f"target {text!r} is not text")
    # ipaddress, not socket.inet_pton (faster): addrmap stays free of I/O modules
    if kind == "ipv4":
        return IPv4Address(text)
    if kind == "ipv6":
        return IPv6Address(text)
    if kind == "name":
        return text.lower()
    raise ValueError(f"target kind {kind!r} is not one of {', '.join(TARGET_KINDS)}")


def _finite(value: object) -> bool:
    """A real number of seconds (bool excluded; exact types: cheap for a million)."""
    return (type(value) is float or type(value) is int) and math.isfinite(value)
