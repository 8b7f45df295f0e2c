"""Peer caches under shared budgets: LRU order, who pays when a budget is full, refunds,
and a UDP association that stays bounded (and correct) under a flood of new peers."""

from __future__ import annotations

import asyncio
import random
import socket
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from tests.unit.fakes import make_ctx, make_services
from translator.gateway.udp import association_deps
from translator.relay.peercache import PeerBudget, PeerBudgets, PeerCache
from translator.relay.udp import UdpAssociation, UdpStats
from translator.wire import UdpDatagram, decode_udp_datagram


def _fill(cache: PeerCache[str, int], *keys: str) -> None:
    for key in keys:
        assert cache.put(key, len(key))


# -- one cache ----------------------------------------------------------------------------


def test_a_hit_makes_an_entry_the_most_recently_used() -> None:
    cache: PeerCache[str, int] = PeerCache(PeerBudget(3))
    _fill(cache, "a", "b", "c")
    assert cache.get("a") == 1
    assert "b" in cache  # a look, not a use
    _fill(cache, "dd")  # full: the least recently used goes
    assert list(cache.data) == ["c", "a", "dd"]
    assert cache.get("b") is None and cache.get("b", 0) == 0
    assert cache.put("c", 7) and list(cache.data) == ["a", "dd", "c"]  # replaced, not charged
    assert cache.budget.count == 3 and cache.evictions == 1


def test_values_that_are_false_or_none_are_hits() -> None:
    cache: PeerCache[str, bool | None] = PeerCache(PeerBudget(4))
    cache.put("denied", False)
    cache.put("unnamed", None)
    missing = object()
    assert cache.get("denied", missing) is False
    assert cache.get("unnamed", missing) is None
    assert cache.get("other", missing) is missing
    assert list(cache.data) == ["denied", "unnamed"]  # both were touched, in order


def test_capacity_bounds_a_cache_below_its_budget() -> None:
    stats = UdpStats()
    cache: PeerCache[str, int] = PeerCache(PeerBudget(100), capacity=2, counter=stats)
    _fill(cache, "a", "b", "c")
    assert list(cache.data) == ["b", "c"] and cache.budget.count == 2
    assert stats.evictions == 1


def test_pop_clear_and_close_refund_every_budget_above() -> None:
    budgets = PeerBudgets(per_client=10, total=100)
    client = budgets.budget("192.0.2.7")
    cache: PeerCache[str, int] = PeerCache(client)
    _fill(cache, "a", "b", "c")
    assert (client.count, budgets.count) == (3, 3)
    assert cache.pop("a", None) == 1 and cache.pop("a", None) is None
    assert (client.count, budgets.count) == (2, 2)
    cache.clear()
    assert (len(cache), client.count, budgets.count) == (0, 0, 0)
    _fill(cache, "d")
    cache.close()
    assert (client.count, budgets.count) == (0, 0)
    assert not cache.put("e", 1) and client.count == 0  # closed: remembers nothing more
    assert budgets.evictions == 0  # none of that was an eviction


def test_the_eviction_hook_hears_of_evictions_only() -> None:
    evicted: list[tuple[str, int]] = []
    cache: PeerCache[str, int] = PeerCache(
        PeerBudget(2), on_evict=lambda key, value: evicted.append((key, value))
    )
    _fill(cache, "a", "bb")
    cache.pop("a", None)
    _fill(cache, "ccc", "dddd")
    cache.clear()
    assert evicted == [("bb", 2)]


def test_a_budget_of_zero_remembers_nothing() -> None:
    cache: PeerCache[str, int] = PeerCache(PeerBudget(0))
    assert not cache.put("a", 1)
    assert len(cache) == 0 and cache.budget.count == 0


# -- one client's budget --------------------------------------------------------------------


def test_a_full_client_budget_evicts_from_its_largest_cache() -> None:
    stats_big, stats_small = UdpStats(), UdpStats()
    client = PeerBudget(4)
    big: PeerCache[str, int] = PeerCache(client, counter=stats_big)
    small: PeerCache[str, int] = PeerCache(client, counter=stats_small)
    _fill(big, "a", "b", "c")
    _fill(small, "x")
    _fill(small, "y")  # full: the larger cache pays, its least recently used entry
    assert list(big.data) == ["b", "c"] and list(small.data) == ["x", "y"]
    _fill(small, "z")  # as large as the other now: it pays itself
    assert list(big.data) == ["b", "c"] and list(small.data) == ["y", "z"]
    assert (stats_big.evictions, stats_small.evictions) == (1, 1)
    assert client.count == 4 and client.evictions == 2


def test_an_idle_hog_cache_pays_for_a_new_cache_of_the_same_client() -> None:
    client = PeerBudget(100)
    idle: PeerCache[int, int] = PeerCache(client)
    for key in range(100):
        idle.put(key, key)
    fresh: PeerCache[int, int] = PeerCache(client)
    for key in range(50):
        fresh.put(key, key)
    assert (len(idle), len(fresh)) == (50, 50)
    assert list(idle.data)[:1] == [50]  # the idle cache lost its oldest entries


def test_a_client_filling_its_budget_never_evicts_another_clients_entries() -> None:
    budgets = PeerBudgets(per_client=3, total=100)
    a: PeerCache[int, int] = PeerCache(budgets.budget("192.0.2.1"))
    b: PeerCache[int, int] = PeerCache(budgets.budget("192.0.2.2"))
    b.put(-1, 0)
    b.put(-2, 0)
    for key in range(1000):
        a.put(key, key)
    assert list(a.data) == [997, 998, 999]
    assert list(b.data) == [-1, -2]
    assert budgets.evictions == 997
    assert budgets.get("192.0.2.1").evictions == 997  # type: ignore[union-attr]
    assert budgets.get("192.0.2.2").evictions == 0  # type: ignore[union-attr]


def test_a_full_gateway_budget_makes_the_largest_client_pay() -> None:
    budgets = PeerBudgets(per_client=10, total=6)
    hog: PeerCache[str, int] = PeerCache(budgets.budget("192.0.2.1"))
    small: PeerCache[str, int] = PeerCache(budgets.budget("192.0.2.2"))
    _fill(hog, "h1", "h2", "h3", "h4")
    _fill(small, "s1", "s2")
    assert budgets.count == 6
    _fill(small, "s3")  # the total is full, not the client's: the hog pays
    assert list(hog.data) == ["h2", "h3", "h4"] and list(small.data) == ["s1", "s2", "s3"]
    _fill(small, "s4")  # as large as the hog now: it pays itself
    assert list(hog.data) == ["h2", "h3", "h4"] and list(small.data) == ["s2", "s3", "s4"]
    _fill(hog, "h5")
    assert list(hog.data) == ["h3", "h4", "h5"]
    assert budgets.count == 6 and budgets.evictions == 3


def test_a_new_client_gets_room_when_the_gateway_budget_is_full() -> None:
    budgets = PeerBudgets(per_client=8, total=16)
    hogs = [PeerCache[int, int](budgets.budget(f"192.0.2.{n}")) for n in (1, 2)]
    for hog in hogs:
        for key in range(100):
            hog.put(key, key)
    assert budgets.count == 16
    newcomer: PeerCache[int, int] = PeerCache(budgets.budget("192.0.2.3"))
    for key in range(5):
        assert newcomer.put(key, key)
    assert len(newcomer) == 5 and budgets.count == 16
    assert sorted(len(hog) for hog in hogs) == [5, 6]  # both hogs paid, the larger first


def test_lowering_the_limits_evicts_down_to_them_on_the_next_put() -> None:
    budgets = PeerBudgets(per_client=10, total=100)
    cache: PeerCache[int, int] = PeerCache(budgets.budget("192.0.2.1"))
    for key in range(10):
        cache.put(key, key)
    budgets.configure(per_client=4, total=100)
    assert budgets.budget("192.0.2.1").limit == 4  # a client's, on its next association
    cache.put(10, 10)
    assert list(cache.data) == [7, 8, 9, 10]
    budgets.configure(per_client=4, total=2)  # the total, at once
    cache.put(11, 11)
    assert list(cache.data) == [10, 11] and budgets.count == 2


# -- the registry -----------------------------------------------------------------------------


def test_a_clients_budget_lives_while_it_has_associations() -> None:
    budgets = PeerBudgets(per_client=10, total=100)
    first = budgets.budget("192.0.2.1")
    assert budgets.budget("192.0.2.1") is first and "192.0.2.1" in budgets
    first.attach()
    first.attach()
    cache: PeerCache[str, int] = PeerCache(first)
    _fill(cache, "a")
    first.detach()
    assert "192.0.2.1" in budgets
    cache.close()
    first.detach()
    assert "192.0.2.1" not in budgets and len(budgets) == 0
    first.detach()  # once too often: nothing happens
    second = budgets.budget("192.0.2.1")
    assert second is not first and second.count == 0 and budgets.count == 0


# -- a UDP association under its client's budget ------------------------------------------------

CLIENT = ("192.0.2.7", 40001)


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str) -> Any:
        return ("0.0.0.0", 50000) if name == "sockname" else None

    def close(self) -> None:
        pass


def _association(services: Any) -> tuple[UdpAssociation, dict[int, FakeTransport]]:
    association = UdpAssociation(
        association_deps(make_ctx(services)), aa=False, real_family=False, client_port=None
    )
    transports = {0: FakeTransport(), socket.AF_INET: FakeTransport()}
    transports[socket.AF_INET6] = FakeTransport()
    association.relay = transports[0]  # type: ignore[assignment]
    association.outbound = {f: transports[f] for f in (socket.AF_INET, socket.AF_INET6)}  # type: ignore[misc]
    return association, transports


def _send(association: UdpAssociation, address: Any, port: int, data: bytes) -> None:
    association.from_client(UdpDatagram(address, port, data).encode(), CLIENT)


def _flood(association: UdpAssociation, count: int) -> None:
    for n in range(count):
        _send(association, IPv4Address("198.51.100.0") + n % 256, 1024 + n, b"junk")


async def test_associations_share_their_clients_budget_and_give_it_back() -> None:
    services, _, _, _ = make_services(udp={"max_peers_per_client": 64})
    budgets = services.peer_budgets
    one, _ = _association(services)
    two, _ = _association(services)
    assert one.peers is two.peers is budgets.get("192.0.2.7")
    _flood(one, 500)
    _flood(two, 500)
    assert 60 < budgets.count == one.peers.count <= 64  # (a naming evicted takes its route)
    assert one.stats.evictions + two.stats.evictions == budgets.evictions > 0
    assert one.stats.to_peers == two.stats.to_peers == 500  # every datagram still went out
    one.close()
    assert "192.0.2.7" in budgets and budgets.count == two.peers.count > 0
    two.close()
    assert "192.0.2.7" not in budgets and budgets.count == 0


async def test_a_flood_of_new_peers_keeps_the_caches_bounded() -> None:
    services, _, _, _ = make_services()
    association, transports = _association(services)
    limit = services.config.udp.max_peers_per_client
    _flood(association, 3 * limit)
    assert limit - 10 < association.peers.count <= limit
    assert sum(len(cache) for cache in association._caches) == association.peers.count
    assert association.stats.to_peers == 3 * limit
    assert len(transports[socket.AF_INET].sent) == 3 * limit
    association.close()


async def test_a_peer_evicted_under_a_flood_is_relayed_and_named_again() -> None:
    services, _, _, _ = make_services(udp={"max_peers_per_client": 32})
    association, transports = _association(services)
    peer = IPv6Address("2001:db8:6::6")
    _send(association, "v6.example.test", 53, b"query")  # resolves in a task
    _send(association, peer, 53, b"by literal")  # the naming it keeps is the first one
    for _ in range(5):  # the name resolves in a task of the association's
        await asyncio.sleep(0)
    assert [d for d, _ in transports[socket.AF_INET6].sent] == [b"by literal", b"query"]
    association.from_peer(b"answer", ("2001:db8:6::6", 53, 0, 0))
    assert decode_udp_datagram(transports[0].sent[-1][0]).address == peer

    _flood(association, 200)
    assert association.stats.evictions > 0
    assert (peer, 53) not in association._named  # how the client named it: evicted
    association.from_peer(b"answer 2", ("2001:db8:6::6", 53, 0, 0))  # its header was not
    got = decode_udp_datagram(transports[0].sent[-1][0])
    assert (got.address, got.data) == (peer, b"answer 2")

    association._headers.clear()  # as a new naming does; and the rendering is evicted too
    association._rendered.clear()
    association.from_peer(b"lost", ("2001:db8:6::6", 53, 0, 0))
    assert association.stats.dropped_unrenderable == 1  # until the client sends to it again
    _send(association, peer, 53, b"again")  # its route went with its naming: relearnt
    assert transports[socket.AF_INET6].sent[-1] == (b"again", ("2001:db8:6::6", 53))
    association.from_peer(b"answer 3", ("2001:db8:6::6", 53, 0, 0))
    got = decode_udp_datagram(transports[0].sent[-1][0])
    assert (got.address, got.data) == (peer, b"answer 3")
    assert association.stats.dropped_unrenderable == 1
    association.close()


async def test_an_evicted_naming_takes_its_route_along() -> None:
    services, _, _, _ = make_services(udp={"max_peers_per_client": 8})
    association, _ = _association(services)
    peer = IPv6Address("2001:db8:6::6")
    route = UdpDatagram(peer, 53, b"").encode()
    forgotten = 0
    for n in range(50):  # the route is in use (and fresh) while the naming ages
        _send(association, peer, 53, b"x")
        assert route in association._routes and (peer, 53) in association._named
        _send(association, IPv4Address("198.51.100.9"), 2000 + n, b"junk")
        if (peer, 53) not in association._named:
            forgotten += 1
            assert route not in association._routes  # the next datagram relearns it
    assert forgotten > 0
    assert association.stats.to_peers == 100
    association.close()


async def test_a_rate_of_zero_is_no_bound() -> None:
    services, _, _, _ = make_services(udp={"max_datagram_rate": 0})
    association, _ = _association(services)
    assert association._from_client_rate is None and association._to_client_rate is None
    for _ in range(50_000):
        _send(association, IPv4Address("198.51.100.4"), 7, b"x")
    assert association.stats.to_peers == 50_000 and association.stats.dropped == 0
    assert association.last_activity == services.clock()
    association.close()


async def test_a_rate_still_bounds_when_set() -> None:
    services, _, _, _ = make_services(udp={"max_datagram_rate": 10})
    association, _ = _association(services)
    for _ in range(15):  # the fake clock stands still: a burst of one second's worth
        _send(association, IPv4Address("198.51.100.4"), 7, b"x")
    assert association.stats.to_peers == 10 and association.stats.dropped_rate == 5
    association.close()


@pytest.mark.parametrize("limit", range(2, 12))
async def test_tiny_budgets_never_break_relaying(limit: int) -> None:
    services, _, _, _ = make_services(udp={"max_peers_per_client": limit})
    association, transports = _association(services)
    peer = IPv6Address("2001:db8:6::6")
    for n in range(20):
        _send(association, peer, 53, b"q")
        association.from_peer(b"a", ("2001:db8:6::6", 53, 0, 0))
        _send(association, IPv4Address("198.51.100.9"), 2000 + n, b"junk")
    assert association.peers.count <= limit
    assert len(transports[socket.AF_INET6].sent) == 20
    answers = [decode_udp_datagram(d) for d, _ in transports[0].sent]
    assert len(answers) == 20 and {a.address for a in answers} == {peer}
    association.close()
    assert services.peer_budgets.count == 0


def test_counts_stay_exact_through_any_mix_of_operations() -> None:
    rng = random.Random(6)
    budgets = PeerBudgets(per_client=12, total=30)
    clients = [budgets.budget(f"192.0.2.{n}") for n in range(4)]
    caches: list[PeerCache[int, int]] = [
        PeerCache(client, capacity=rng.choice([None, 5])) for client in clients for _ in range(3)
    ]
    for step in range(5000):
        cache = rng.choice(caches)
        roll = rng.random()
        key = rng.randrange(40)
        if roll < 0.6:
            cache.put(key, step)
        elif roll < 0.8:
            cache.get(key)
        elif roll < 0.97:
            cache.pop(key, None)
        else:
            cache.clear()
        for client in clients:
            mine = [c for c in caches if c.budget is client]
            assert all(c.count == len(c.data) for c in mine)
            assert client.count == sum(c.count for c in mine) <= client.limit
        assert budgets.count == sum(client.count for client in clients) <= 30
    assert budgets.evictions == sum(c.evictions for c in caches) > 0


async def test_a_second_naming_gets_a_route_only_when_replies_do_not_need_the_first() -> None:
    services, _, _, _ = make_services()
    association, transports = _association(services)
    for literal, name in (
        (IPv6Address("2001:db8:6::6"), "v6.example.test"),  # shown under the first naming
        (IPv4Address("198.51.100.4"), "v4.example.test"),  # shown as itself
    ):
        _send(association, literal, 53, b"by literal")
        _send(association, name, 53, b"by name")
        for _ in range(5):  # the name resolves in a task of the association's
            await asyncio.sleep(0)
        _send(association, name, 53, b"by name")  # now resolved: a route is possible
        assert UdpDatagram(literal, 53, b"").encode() in association._routes
        by_name = UdpDatagram(name, 53, b"").encode() in association._routes
        assert by_name == (literal.version == 4)
        assert association._named.get((literal, 53)) == literal
    assert len(transports[socket.AF_INET6].sent) == len(transports[socket.AF_INET].sent) == 3
    association.close()
