"""Bounded LRU caches of UDP peers, charged to shared budgets.

A UDP association remembers things about the peers it talks to: the policy's verdict, how
the client named a peer, the header a peer's datagrams are framed with, a route for the
fast path. Each of those maps is a :class:`PeerCache`, and every entry of every cache is
charged to a :class:`PeerBudget`: the budget of the association's client, shared by all of
that client's associations, whose parent is the gateway-wide budget. What one client, and
the whole gateway, remember is bounded however many associations and peers there are.

:class:`PeerBudgets` keeps one budget per client address under the gateway-wide one; a
client's budget lives while the client has an association (``attach``/``detach``).

Eviction. A new entry that would overrun a budget first evicts one entry, the least
recently used entry of a cache chosen so that whoever holds the most pays:

* the client's budget is full: one of the client's own caches, the larger of the cache being
  filled and the client's largest cache. Another client's entries are never touched.
* only the gateway-wide budget is full: the larger of this client and the client holding
  the most entries loses an entry (from its largest cache; this very cache if it is this
  client's and at least as large). A client with few entries keeps them while a hog pays.

"Largest" is a hint kept as members grow, not a sorted order: the members are scanned when
the hint has emptied, and once every as many evictions as there are members (the hint
misses a member that stopped growing): finding a victim is O(1) amortized.

An evicted peer costs the slow path the next time: every cache holds something the
association can work out again, except how the client named a peer, which it learns again
from the client's next datagram to the peer (``on_evict`` lets the association drop what
depended on an entry, see relay/udp.py).

Hot path. A hit is ``data.get(key)`` and ``data.move_to_end(key)`` on the cache's
OrderedDict, and callers on a hot path may do exactly that on :attr:`PeerCache.data`
themselves (the :meth:`~PeerCache.get` call costs twice as much as the two). ``data`` is
read-only otherwise: every write goes through :meth:`~PeerCache.put`, :meth:`~PeerCache.pop`
and :meth:`~PeerCache.clear`, which keep ``count`` and the budgets' counts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, overload

from translator.config import UdpConfig

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")

_DEFAULTS = UdpConfig()


class EvictionCounter(Protocol):
    """Where a cache's owner counts the evictions it suffered (``UdpStats`` does)."""

    evictions: int


class _Member(Protocol):
    @property
    def count(self) -> int: ...


class PeerBudget:
    """How many entries the caches charged to it (directly or through child budgets) may
    hold: ``count`` of ``limit``. Charging it charges its ``parent`` too."""

    __slots__ = (
        "_largest",
        "_members",
        "_registry",
        "_since_scan",
        "count",
        "evictions",
        "key",
        "limit",
        "parent",
        "users",
    )

    def __init__(self, limit: int, parent: PeerBudget | None = None, *, key: str = "") -> None:
        self.limit = limit
        self.parent = parent
        self.key = key  # the client it belongs to, for PeerBudgets
        self.count = 0
        self.evictions = 0  # entries evicted from caches under this budget
        self.users = 0  # associations attached (PeerBudgets drops it at zero)
        self._members: dict[_Member, None] = {}  # caches, or child budgets
        self._largest: _Member | None = None  # the member seen largest (a hint)
        self._since_scan = 0  # evictions since the members were last scanned
        self._registry: PeerBudgets | None = None
        if parent is not None:
            parent._members[self] = None

    def __repr__(self) -> str:
        return f"PeerBudget({self.key or 'private'}: {self.count}/{self.limit})"

    @property
    def exhausted(self) -> bool:
        return self.count >= self.limit

    # -- reference count (PeerBudgets) ----------------------------------------------------

    def attach(self) -> None:
        """One more association uses this budget."""
        self.users += 1
        if self.users == 1 and self._registry is not None:
            self._registry._attached(self)

    def detach(self) -> None:
        """An association using this budget ended (its caches closed first)."""
        if self.users <= 0:
            return
        self.users -= 1
        if self.users == 0 and self._registry is not None:
            self._registry._idle(self)

    # -- accounting -------------------------------------------------------------------------

    def _charge(self, member: _Member) -> None:
        """One entry more in ``member`` (a cache of this budget), so in every budget above."""
        node: PeerBudget | None = self
        child = member
        while node is not None:
            node.count += 1
            largest = node._largest
            if largest is None or (largest is not child and child.count > largest.count):
                node._largest = child
            child = node
            node = node.parent

    def _refund(self, entries: int) -> None:
        node: PeerBudget | None = self
        while node is not None:
            node.count -= entries
            node = node.parent

    def _leave(self, member: _Member) -> None:
        self._members.pop(member, None)
        if self._largest is member:
            self._largest = None

    def _largest_member(self) -> _Member | None:
        """The member seen largest: the hint, checked by a scan when it is empty or once
        every len(members) evictions (a member that stopped growing is not seen
        otherwise): O(1) amortized per eviction."""
        largest = self._largest
        self._since_scan += 1
        if largest is None or largest.count <= 0 or self._since_scan > len(self._members):
            largest = max(self._members, key=_count, default=None)
            self._largest = largest
            self._since_scan = 0
        return largest

    def _victim(self, path: list[_Member]) -> PeerCache[object, object] | None:
        """The cache to evict from when this budget is exhausted. ``path`` is the filling
        cache's chain below this budget, nearest first (the cache, its client's budget...)."""
        node = self
        own: _Member | None = path[-1] if path else None
        depth = len(path) - 1
        while True:
            largest = node._largest_member()
            pick: _Member | None
            if own is not None and (largest is None or own.count >= largest.count):
                pick = own
            else:
                pick = largest
            if pick is None or pick.count <= 0:
                return None
            if isinstance(pick, PeerCache):
                return pick
            assert isinstance(pick, PeerBudget)
            if pick is own and depth > 0:
                depth -= 1
                own = path[depth]
            else:
                own = None
            node = pick


def _count(member: _Member) -> int:
    return member.count


class PeerCache(Generic[K, V]):
    """An LRU map whose entries are charged to ``budget``; at most ``capacity`` entries
    of its own as well when given. Evictions are counted in ``counter`` (if any), in the
    cache and in every budget above it, and ``on_evict(key, value)`` is told of each (not
    of ``pop`` or ``clear``): what depends on an entry can be dropped with it."""

    __slots__ = (
        "budget",
        "capacity",
        "closed",
        "count",
        "counter",
        "data",
        "evictions",
        "on_evict",
    )

    def __init__(
        self,
        budget: PeerBudget,
        *,
        capacity: int | None = None,
        counter: EvictionCounter | None = None,
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        self.budget = budget
        self.capacity = capacity
        self.counter = counter
        self.on_evict = on_evict
        self.data: OrderedDict[K, V] = OrderedDict()  # least recently used first
        self.count = 0  # len(data), as budgets read it
        self.evictions = 0
        self.closed = False
        budget._members[self] = None

    def __repr__(self) -> str:
        return f"PeerCache({len(self.data)} entries, {self.budget!r})"

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key: object) -> bool:
        return key in self.data  # a look, not a use: the LRU order is left alone

    @overload
    def get(self, key: K) -> V | None: ...

    @overload
    def get(self, key: K, default: D) -> V | D: ...

    def get(self, key: K, default: object = None) -> object:
        """The entry for ``key``, now the most recently used; ``default`` if none."""
        data = self.data
        value = data.get(key, _MISSING)
        if value is _MISSING:
            return default
        data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> bool:
        """Remember ``key``, as the most recently used entry; a new key is charged to the
        budgets, evicting first if one is full. False if nothing could make room (a budget
        of zero) or the cache is closed: then it is not remembered."""
        data = self.data
        if key in data:
            data[key] = value
            data.move_to_end(key)
            return True
        if self.closed or not self._make_room():
            return False
        data[key] = value
        self.count += 1
        self.budget._charge(self)
        return True

    def pop(self, key: K, default: D) -> V | D:
        """Forget ``key``: its entry (refunded), or ``default``."""
        value = self.data.pop(key, _MISSING)
        if value is _MISSING:
            return default
        self.count -= 1
        self.budget._refund(1)
        return value  # type: ignore[return-value]

    def clear(self) -> None:
        """Forget every entry; the budgets get them back."""
        entries = self.count
        if entries:
            self.data.clear()
            self.count = 0
            self.budget._refund(entries)

    def close(self) -> None:
        """Clear, and leave the budget for good (an association's caches end with it)."""
        self.clear()
        self.closed = True
        self.budget._leave(self)

    # -- eviction -------------------------------------------------------------------------

    def _make_room(self) -> bool:
        """Evict until one more entry fits this cache and every budget above it."""
        if self.capacity is not None:
            while self.count >= self.capacity:
                if not self.count:
                    return False
                self._evict_one()
        while True:
            node: PeerBudget | None = self.budget
            while node is not None and node.count < node.limit:
                node = node.parent
            if node is None:
                return True
            path: list[_Member] = [self]
            below = self.budget
            while below is not node:
                path.append(below)
                assert below.parent is not None
                below = below.parent
            victim = node._victim(path)
            if victim is None:
                return False
            victim._evict_one()

    def _evict_one(self) -> None:
        key, value = self.data.popitem(last=False)
        self.count -= 1
        self.evictions += 1
        if self.counter is not None:
            self.counter.evictions += 1
        node: PeerBudget | None = self.budget
        while node is not None:
            node.count -= 1
            node.evictions += 1
            node = node.parent
        if self.on_evict is not None:
            self.on_evict(key, value)


_MISSING = object()


class PeerBudgets:
    """Every client's :class:`PeerBudget` (by client address) under the gateway-wide one.

    A client's budget is created by :meth:`budget` and dropped when the last association
    attached to it detaches. :meth:`configure` sets the limits: the total at once, a
    client's on its next :meth:`budget` (a reload applies to associations opened after it).
    """

    __slots__ = ("_clients", "per_client", "total")

    def __init__(self, per_client: int | None = None, total: int | None = None) -> None:
        self.per_client = _DEFAULTS.max_peers_per_client if per_client is None else per_client
        self.total = PeerBudget(_DEFAULTS.max_peers_total if total is None else total)
        self._clients: dict[str, PeerBudget] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client: object) -> bool:
        return client in self._clients

    @property
    def evictions(self) -> int:
        """Entries evicted gateway-wide, ever."""
        return self.total.evictions

    @property
    def count(self) -> int:
        """Entries remembered gateway-wide now."""
        return self.total.count

    def configure(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total.limit = total

    def get(self, client: str) -> PeerBudget | None:
        return self._clients.get(client)

    def budget(self, client: str) -> PeerBudget:
        """``client``'s budget, created on first use; its limit is the configured one."""
        budget = self._clients.get(client)
        if budget is None:
            budget = PeerBudget(self.per_client, self.total, key=client)
            budget._registry = self
            self._clients[client] = budget
        else:
            budget.limit = self.per_client
        return budget

    def _attached(self, budget: PeerBudget) -> None:
        # A budget dropped when idle and then attached again (a reused UdpDeps) comes back,
        # unless the client has a new one meanwhile: then it stays on its own, still bounded
        # by its limit and charged to the total.
        if budget.key not in self._clients:
            self._clients[budget.key] = budget
            self.total._members[budget] = None

    def _idle(self, budget: PeerBudget) -> None:
        if self._clients.get(budget.key) is budget:
            del self._clients[budget.key]
        if budget.count == 0:
            self.total._leave(budget)
