"""A fake-IP pool: IPv4 addresses that stand for domain names, as aliases of ADDRESS IDs.

The transparent front hands an IPv4-only client an address from the pool (198.18.0.0/15
by default) for a name that has no A record; a flow to that address is a flow to the
name. Each bound address is an *alias* of one ADDRESS ID the pool's owner holds in the
:class:`~addrmap.table.AddressTable`, so it lives exactly as the ID does:

* a use (a DNS answer, a flow) refreshes the ID's idle TTL; a pinned ID (open flows)
  never expires;
* when the table frees the ID the address is unbound at that moment (the table tells the
  pool through :meth:`AddressTable.on_free`) and goes into the pool's own quarantine for
  the table's quarantine period before another name may get it: clients cache DNS
  answers far beyond their TTL, and a stale answer must fail, not reach another host;
* the table's capacity counts the pool's IDs like any other; the pool's owner is bounded
  by the pool's size instead of the per-owner quota.

The same name keeps the same address while it is bound. Addresses are handed out in
order from a cursor, skipping bound and quarantined ones (and the network's first and
last address), so a fresh pool reads naturally in logs: .1, .2, ...

Pure Python and no I/O: :meth:`FakeIpPool.snapshot` and :meth:`FakeIpPool.restore` give
and take plain data; the gateway writes it to its state file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from addrmap.errors import InvalidTarget, PoolExhausted, QuotaExceeded
from addrmap.ids import ID_BITS, Quarantine
from addrmap.owner import Owner, Target
from addrmap.table import AddressTable

#: Who holds the pool's IDs: not a client address, so no client can ever be this owner.
POOL_OWNER = Owner("transparent", None)
MAX_POOL_BITS = ID_BITS  # the quarantine's bitmap covers 2**24 offsets: a /8 at most


@dataclass(frozen=True, slots=True)
class Binding:
    """One bound address, as the state file keeps it."""

    address: IPv4Address
    name: str


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """What survives a restart: the bindings, and quarantined addresses with the seconds
    of quarantine they have left."""

    bindings: tuple[Binding, ...]
    quarantined: tuple[tuple[IPv4Address, float], ...]


class FakeIpPool:
    """Bind names to addresses of ``network``; see the module docstring."""

    def __init__(self, table: AddressTable, network: IPv4Network, *, quarantine: float) -> None:
        if network.prefixlen < 32 - MAX_POOL_BITS or network.num_addresses < 4:
            raise ValueError(f"a pool must be a /8 to a /30, not /{network.prefixlen}")
        self._table = table
        self.network = network
        self._base = int(network.network_address)
        self._last = network.num_addresses - 2  # offsets 1..last are usable
        self.size = self._last
        self._clock = table.clock
        self._quarantine = Quarantine(quarantine)
        self._by_id: dict[int, int] = {}  # realid -> offset
        self._by_offset: dict[int, int] = {}  # offset -> realid
        self._cursor = 0
        self.exhausted = 0  # binds refused because no address was free
        self.changes = 0  # bindings made or ended: what the state file lags behind
        table.on_free(self._freed)

    # -- queries -----------------------------------------------------------------------

    def __contains__(self, address: object) -> bool:
        """Whether ``address`` lies in the pool (bound or not)."""
        return isinstance(address, IPv4Address) and address in self.network

    def __len__(self) -> int:
        """Addresses bound now (IDs the table has not freed yet included)."""
        return len(self._by_offset)

    @property
    def quarantined(self) -> int:
        return len(self._quarantine)

    def bind(self, name: str) -> IPv4Address:
        """The address standing for ``name``, bound now if it was not; counts as a use.

        Raises :class:`PoolExhausted` when no address is free, the table's
        :class:`~addrmap.errors.CapacityExceeded` when it is full, and
        :class:`InvalidTarget` for something that is not a domain name.
        """
        if not isinstance(name, str):
            raise InvalidTarget(f"a pool address stands for a name, not {name!r}")
        try:
            realid = self._table.associate(POOL_OWNER, name, quota=self.size)
        except QuotaExceeded:  # as many IDs as addresses: the pool is what is full
            self.exhausted += 1
            raise PoolExhausted(self.size, POOL_OWNER) from None
        offset = self._by_id.get(realid)
        if offset is None:
            offset = self._allocate()  # on PoolExhausted the new ID just idles out
            self._by_id[realid] = offset
            self._by_offset[offset] = realid
            self.changes += 1
        return IPv4Address(self._base + offset)

    def name_of(self, address: IPv4Address) -> str | None:
        """The name ``address`` stands for (a use: refreshes it), or None when unbound."""
        realid = self._realid(address)
        if realid is None:
            return None
        target = self._table.lookup(POOL_OWNER, realid)  # frees it (and us) if expired
        return target if isinstance(target, str) else None

    def address_of(self, name: str) -> IPv4Address | None:
        """The address bound to ``name``, or None; a use, but never binds."""
        realid = self._table.find(POOL_OWNER, name.lower())
        offset = None if realid is None else self._by_id.get(realid)
        return None if offset is None else IPv4Address(self._base + offset)

    def realid_of(self, address: IPv4Address) -> int | None:
        """The ID ``address`` is an alias of, while it is bound."""
        realid = self._realid(address)
        if realid is None or self._table.lookup(POOL_OWNER, realid) is None:
            return None
        return realid

    # -- flows -------------------------------------------------------------------------

    def pin(self, address: IPv4Address) -> int | None:
        """Keep ``address`` bound while a flow uses it; returns the token for unpin()."""
        realid = self._realid(address)
        if realid is None or not self._table.pin(POOL_OWNER, realid):
            return None
        return realid

    def unpin(self, token: int) -> None:
        self._table.unpin(POOL_OWNER, token)

    # -- state -------------------------------------------------------------------------

    def snapshot(self) -> PoolSnapshot:
        """The live bindings and the quarantine, for the state file (not a use)."""
        now = self._clock()
        bindings = []
        for offset, realid in self._by_offset.items():
            target = self._table.peek(POOL_OWNER, realid)
            if isinstance(target, str):
                bindings.append(Binding(IPv4Address(self._base + offset), target))
        quarantined = tuple(
            (IPv4Address(self._base + offset), max(0.0, release - now))
            for offset, release in self._quarantine.items()
        )
        return PoolSnapshot(tuple(bindings), quarantined)

    def restore(self, snapshot: PoolSnapshot) -> int:
        """Take back saved bindings and quarantines; returns how many bindings came back.

        Entries outside this pool (its network changed), names bound twice and addresses
        taken twice are skipped. Each restored binding starts a fresh idle TTL.
        """
        now = self._clock()
        for address, remaining in snapshot.quarantined:
            offset = self._offset(address)
            if offset is not None and offset not in self._quarantine:
                self._quarantine.add(offset, now + remaining - self._quarantine.period)
        restored = 0
        for binding in snapshot.bindings:
            offset = self._offset(binding.address)
            if offset is None or offset in self._by_offset:
                continue
            try:
                realid = self._table.associate(POOL_OWNER, binding.name, quota=self.size)
            except (InvalidTarget, QuotaExceeded):
                continue
            if realid in self._by_id:
                continue
            if offset in self._quarantine:
                continue  # a clash in a hand-edited file: the quarantine wins
            self._by_id[realid] = offset
            self._by_offset[offset] = realid
            restored += 1
        return restored

    # -- internals ---------------------------------------------------------------------

    def _offset(self, address: IPv4Address) -> int | None:
        if not isinstance(address, IPv4Address):
            return None
        offset = int(address) - self._base
        return offset if 1 <= offset <= self._last else None

    def _realid(self, address: IPv4Address) -> int | None:
        offset = self._offset(address)
        return None if offset is None else self._by_offset.get(offset)

    def _allocate(self) -> int:
        now = self._clock()
        self._quarantine.release(now, None)
        if len(self._by_offset) + len(self._quarantine) >= self.size:
            self._table.expire()  # frees expired IDs, and so their addresses
            self._quarantine.release(now, None)
            if len(self._by_offset) + len(self._quarantine) >= self.size:
                self.exhausted += 1
                raise PoolExhausted(self.size, POOL_OWNER)
        cursor = self._cursor
        for _ in range(self.size):
            cursor = cursor + 1 if cursor < self._last else 1
            if cursor not in self._by_offset and cursor not in self._quarantine:
                self._cursor = cursor
                return cursor
        raise AssertionError("pool accounting out of step")  # counted above

    def _freed(self, realid: int, owner: Owner, target: Target) -> None:
        if owner != POOL_OWNER:
            return
        offset = self._by_id.pop(realid, None)
        if offset is not None:
            del self._by_offset[offset]
            self._quarantine.add(offset, self._clock())
            self.changes += 1


def bindings_of(pairs: Iterable[tuple[str, str]]) -> tuple[Binding, ...]:
    """Bindings from (address, name) text pairs, as read from a state file."""
    return tuple(Binding(IPv4Address(address), name.lower()) for address, name in pairs)
