"""InterfaceManager against a real kernel, in a private network namespace with a veth pair;
multicast memberships read back from /proc; and the pure parts (struct layouts, /proc
parsing, the table's event diffing) without root."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from pyroute2 import netns

from translator.net.interfaces import (
    IFF_MULTICAST,
    IFF_RUNNING,
    IFF_UP,
    DefaultRoute,
    Interface,
    InterfaceAddress,
    InterfaceManager,
    InterfaceTable,
    ip_mreqn,
    ipv6_mreq,
    joined_groups,
    parse_igmp,
    parse_igmp6,
)

# pyroute2's async netlink sockets need asyncio's loop; the gateway runs them on a thread.
pytestmark = pytest.mark.plain_asyncio

IN_CI = os.environ.get("CI", "").lower() == "true"
UP = IFF_UP | IFF_RUNNING | IFF_MULTICAST
GROUP4 = IPv4Address("239.1.2.3")
GROUP6 = IPv6Address("ff15::1:2")
DEADLINE = 15.0  # generous: DAD on a veth takes about a second

Recorded = list[tuple[str, Interface | InterfaceAddress]]


def need_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("network namespace tests need root")
        pytest.skip("network namespace tests need root")


async def eventually(predicate: Callable[[], object], what: str) -> None:
    """Poll until predicate() is true; fail with ``what`` at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def saw(events: Recorded, name: str, match: Callable[[object], bool]) -> bool:
    return any(event == name and match(subject) for event, subject in events)


def has_ip(text: str) -> Callable[[object], bool]:
    wanted = ip_address(text)
    return lambda subject: isinstance(subject, InterfaceAddress) and subject.address == wanted


def named(name: str) -> Callable[[object], bool]:
    return lambda subject: isinstance(subject, Interface) and subject.name == name


# --- a private namespace: lo up, veth s64a <-> s64b, both up --------------------------------


class Namespace:
    """A private namespace driven with iproute2's ``ip -n`` (independent of the code tested)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str) -> str:
        argv = ["ip", "-n", self.name, *args]
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout

    def index(self, ifname: str) -> int:
        return int(json.loads(self.ip("-j", "link", "show", "dev", ifname))[0]["ifindex"])

    def read(self, path: str) -> str:
        """Read a /proc file as seen from inside the namespace."""
        argv = ["ip", "netns", "exec", self.name, "cat", path]
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout

    def socket(self, family: int) -> socket.socket:
        sock: socket.socket = netns.create_socket(
            self.name, family=family, socket_type=socket.SOCK_DGRAM
        )
        return sock


@pytest.fixture
def ns() -> Iterator[Namespace]:
    need_root()
    name = f"s64-if-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        space = Namespace(name)
        space.ip("link", "set", "lo", "up")
        space.ip("link", "add", "s64a", "type", "veth", "peer", "name", "s64b")
        space.ip("link", "set", "s64a", "up")
        space.ip("link", "set", "s64b", "up")
        space.ip("addr", "add", "192.0.2.1/24", "dev", "s64a")
        space.ip("route", "add", "default", "via", "192.0.2.254", "dev", "s64a")
        yield space
    finally:
        netns.remove(name)


@pytest.fixture
async def manager(ns: Namespace) -> AsyncIterator[InterfaceManager]:
    mgr = InterfaceManager(netns=ns.name, retry_delay=0.2)
    await mgr.start()
    try:
        yield mgr
    finally:
        await mgr.close()


@pytest.fixture
def recorded(manager: InterfaceManager) -> Recorded:
    events: Recorded = []
    manager.subscribe(lambda name, subject: events.append((name, subject)))
    return events


# --- the manager on a real kernel ------------------------------------------------------------


async def test_initial_dump(ns: Namespace, manager: InterfaceManager) -> None:
    a = manager.by_name("s64a")
    assert a is not None and a.up and a.multicast and not a.loopback
    assert manager.index_of("s64a") == ns.index("s64a")
    assert manager.index_of("nope") is None
    assert IPv4Address("192.0.2.1") in [entry.address for entry in a.addresses]
    assert {i.name for i in manager.interfaces()} >= {"lo", "s64a", "s64b"}

    assert manager.default_interface(socket.AF_INET) == a
    assert manager.default_interface(socket.AF_INET6) is None
    assert manager.source_address(socket.AF_INET) == IPv4Address("192.0.2.1")
    assert manager.source_address(socket.AF_INET, "lo") == IPv4Address("127.0.0.1")
    assert manager.source_address(socket.AF_INET, "s64b") is None
    assert manager.has_address("192.0.2.1")
    assert manager.has_address("::ffff:192.0.2.1")
    assert not manager.has_address("192.0.2.2")

    assert manager.multicast_interface(socket.AF_INET, None) == a
    assert manager.multicast_interface(socket.AF_INET6, "s64b").name == "s64b"
    with pytest.raises(LookupError, match="IPv6 default route"):
        manager.multicast_interface(socket.AF_INET6, None)
    with pytest.raises(LookupError, match="'eth9' does not exist"):
        manager.multicast_interface(socket.AF_INET, "eth9")


async def test_address_events_without_restart(
    ns: Namespace, manager: InterfaceManager, recorded: Recorded
) -> None:
    a = ns.index("s64a")
    ns.ip("addr", "add", "198.51.100.7/24", "dev", "s64a")
    await eventually(lambda: manager.has_address("198.51.100.7"), "the new address")
    await eventually(lambda: saw(recorded, "address-added", has_ip("198.51.100.7")), "event")

    ns.ip("addr", "del", "198.51.100.7/24", "dev", "s64a")
    await eventually(lambda: not manager.has_address("198.51.100.7"), "the address gone")
    await eventually(lambda: saw(recorded, "address-removed", has_ip("198.51.100.7")), "event")
    removed = next(s for e, s in recorded if e == "address-removed")
    assert isinstance(removed, InterfaceAddress) and removed.ifindex == a


async def test_ipv6_address_is_used_only_after_dad(
    ns: Namespace, manager: InterfaceManager, recorded: Recorded
) -> None:
    ns.ip("addr", "add", "2001:db8::7/64", "dev", "s64a")
    await eventually(lambda: manager.has_address("2001:db8::7"), "the IPv6 address")
    seen = [s for e, s in recorded if e == "address-added" and has_ip("2001:db8::7")(s)]
    assert isinstance(seen[0], InterfaceAddress) and seen[0].tentative, "DAD should be running"
    assert manager.source_address(socket.AF_INET6, "s64a") is None
    await eventually(
        lambda: manager.source_address(socket.AF_INET6, "s64a") == IPv6Address("2001:db8::7"),
        "DAD to finish",
    )
    # Once DAD is over the change is announced again, no longer tentative.
    ready = [s for e, s in recorded if e == "address-added" and has_ip("2001:db8::7")(s)]
    assert isinstance(ready[-1], InterfaceAddress) and not ready[-1].tentative
    # Link-local only when asked for.
    await eventually(
        lambda: manager.source_address(socket.AF_INET6, "s64b", allow_link_local=True),
        "s64b's link-local address",
    )
    link_local = manager.source_address(socket.AF_INET6, "s64b", allow_link_local=True)
    assert link_local is not None and link_local.is_link_local
    assert manager.source_address(socket.AF_INET6, "s64b") is None


async def test_link_down_and_up(
    ns: Namespace, manager: InterfaceManager, recorded: Recorded
) -> None:
    ns.ip("link", "set", "s64a", "down")
    await eventually(lambda: saw(recorded, "link-down", named("s64a")), "link-down")
    link = manager.by_name("s64a")
    assert link is not None and not link.up
    # The kernel flushed the default route with the link; we re-read it.
    await eventually(lambda: manager.default_interface(socket.AF_INET) is None, "no default")
    assert manager.source_address(socket.AF_INET) is None
    with pytest.raises(LookupError):
        manager.multicast_interface(socket.AF_INET, None)

    ns.ip("link", "set", "s64a", "up")
    await eventually(lambda: saw(recorded, "link-up", named("s64a")), "link-up")
    # Up again, but the kernel removed the route without a notification: no stale default.
    assert manager.default_interface(socket.AF_INET) is None
    ns.ip("route", "add", "default", "via", "192.0.2.254", "dev", "s64a")
    await eventually(lambda: manager.default_interface(socket.AF_INET) is not None, "default")


async def test_veth_peer_down_takes_carrier_away(
    ns: Namespace, manager: InterfaceManager, recorded: Recorded
) -> None:
    # s64a stays administratively up but loses its carrier: that is down for us.
    ns.ip("link", "set", "s64b", "down")
    await eventually(lambda: saw(recorded, "link-down", named("s64a")), "carrier loss")


async def test_deleted_link_goes_down_with_its_addresses(
    ns: Namespace, manager: InterfaceManager, recorded: Recorded
) -> None:
    ns.ip("link", "del", "s64a")  # takes s64b with it
    await eventually(lambda: manager.by_name("s64a") is None, "s64a gone")
    await eventually(lambda: saw(recorded, "link-down", named("s64b")), "s64b down")
    assert saw(recorded, "address-removed", has_ip("192.0.2.1"))
    assert not manager.has_address("192.0.2.1")


async def test_unsubscribe_and_failing_subscriber(
    ns: Namespace, manager: InterfaceManager, recorded: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(name: str, subject: object) -> None:
        raise RuntimeError("subscriber bug")

    manager.subscribe(broken)
    others: Recorded = []
    unsubscribe = manager.subscribe(lambda name, subject: others.append((name, subject)))
    ns.ip("addr", "add", "198.51.100.8/24", "dev", "s64a")
    await eventually(lambda: saw(recorded, "address-added", has_ip("198.51.100.8")), "event")
    assert saw(others, "address-added", has_ip("198.51.100.8"))
    unsubscribe()
    unsubscribe()  # harmless twice
    ns.ip("addr", "add", "198.51.100.9/24", "dev", "s64a")
    await eventually(lambda: saw(recorded, "address-added", has_ip("198.51.100.9")), "event")
    assert not saw(others, "address-added", has_ip("198.51.100.9"))
    # The broken subscriber was logged (every time), not allowed to stop the stream.
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][:1] == [
        f"interface event subscriber {broken!r} failed"
    ]
    caplog.clear()  # expected errors: keep the suite's no-ERROR check for everything else


async def test_resubscribes_and_reports_what_it_missed(
    ns: Namespace, manager: InterfaceManager, recorded: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    # Break the event socket under the running task, as an ENOBUFS or a reset would.
    manager._events.close()
    ns.ip("addr", "add", "203.0.113.5/24", "dev", "s64a")
    await eventually(lambda: manager.resyncs >= 1, "the stream to be re-established")
    assert "resubscribing" in caplog.text
    # Seen either live or from the resync's diff, exactly as an added address.
    await eventually(lambda: saw(recorded, "address-added", has_ip("203.0.113.5")), "event")
    ns.ip("addr", "del", "203.0.113.5/24", "dev", "s64a")
    await eventually(lambda: saw(recorded, "address-removed", has_ip("203.0.113.5")), "event")


async def test_close_stops_the_task(ns: Namespace) -> None:
    mgr = InterfaceManager(netns=ns.name)
    await mgr.start()
    assert any(t.get_name() == "socks64-interfaces" for t in asyncio.all_tasks())
    await mgr.close()
    assert not any(t.get_name() == "socks64-interfaces" for t in asyncio.all_tasks())
    await mgr.close()  # idempotent


# --- multicast memberships, seen by the kernel -----------------------------------------------


def test_ipv4_membership_visible_then_gone(ns: Namespace) -> None:
    a, b = ns.index("s64a"), ns.index("s64b")
    with ns.socket(socket.AF_INET) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, ip_mreqn(GROUP4, a))
        assert GROUP4 in joined_groups(socket.AF_INET, a, read=ns.read)
        assert GROUP4 not in joined_groups(socket.AF_INET, b, read=ns.read)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, ip_mreqn(GROUP4, a))
        assert GROUP4 not in joined_groups(socket.AF_INET, a, read=ns.read)
        # Closing the socket also leaves.
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, ip_mreqn(GROUP4, b))
        assert GROUP4 in joined_groups(socket.AF_INET, b, read=ns.read)
    assert GROUP4 not in joined_groups(socket.AF_INET, b, read=ns.read)


def test_ipv6_membership_visible_then_gone(ns: Namespace) -> None:
    a, b = ns.index("s64a"), ns.index("s64b")
    with ns.socket(socket.AF_INET6) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, ipv6_mreq(GROUP6, b))
        assert GROUP6 in joined_groups(socket.AF_INET6, b, read=ns.read)
        assert GROUP6 not in joined_groups(socket.AF_INET6, a, read=ns.read)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_LEAVE_GROUP, ipv6_mreq(GROUP6, b))
        assert GROUP6 not in joined_groups(socket.AF_INET6, b, read=ns.read)


def test_membership_on_loopback_in_our_own_namespace() -> None:
    """The default reader (/proc/net of this process) on lo; no packet is sent."""
    need_root()
    lo = socket.if_nametoindex("lo")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, ip_mreqn(GROUP4, lo))
        assert GROUP4 in joined_groups(socket.AF_INET, lo)
    assert GROUP4 not in joined_groups(socket.AF_INET, lo)


# --- pure parts --------------------------------------------------------------------------------


def test_struct_layouts() -> None:
    packed = ip_mreqn(GROUP4, 7)
    assert len(packed) == 12  # sizeof(struct ip_mreqn)
    assert packed[:4] == GROUP4.packed and packed[4:8] == bytes(4)
    assert struct.unpack("=i", packed[8:])[0] == 7
    packed6 = ipv6_mreq(GROUP6, 9)
    assert len(packed6) == 20  # sizeof(struct ipv6_mreq)
    assert packed6[:16] == GROUP6.packed and struct.unpack("=I", packed6[16:])[0] == 9
    with pytest.raises(ValueError):
        ip_mreqn(IPv4Address("192.0.2.1"), 1)
    with pytest.raises(ValueError):
        ipv6_mreq(IPv6Address("2001:db8::1"), 1)


def _kernel_hex(group: IPv4Address) -> str:
    return f"{int.from_bytes(group.packed, sys.byteorder):08X}"


def test_parse_igmp() -> None:
    text = (
        "Idx\tDevice    : Count Querier\tGroup    Users Timer\tReporter\n"
        "1\tlo        :     1      V3\n"
        f"\t\t\t\t{_kernel_hex(IPv4Address('224.0.0.1'))}     1 0:00000000\t\t0\n"
        "4\teth0      :     2      V3\n"
        f"\t\t\t\t{_kernel_hex(GROUP4)}     1 0:00000000\t\t1\n"
        f"\t\t\t\t{_kernel_hex(IPv4Address('224.0.0.1'))}     1 0:00000000\t\t0\n"
        "5\teth1      :     0      V3\n"
    )
    groups = parse_igmp(text)
    assert groups == {
        1: {IPv4Address("224.0.0.1")},
        4: {GROUP4, IPv4Address("224.0.0.1")},
        5: set(),
    }
    assert joined_groups(socket.AF_INET, 4, read=lambda path: text) == {
        GROUP4,
        IPv4Address("224.0.0.1"),
    }
    assert joined_groups(socket.AF_INET, 9, read=lambda path: text) == set()


def test_parse_igmp6() -> None:
    text = (
        "1    lo              ff020000000000000000000000000001     1 0000000C 0\n"
        "4    eth0            ff150000000000000000000000010002     1 00000004 0\n"
        "4    eth0            ff0200000000000000000001ff000001     1 00000004 0\n"
    )
    groups = parse_igmp6(text)
    assert groups[4] == {GROUP6, IPv6Address("ff02::1:ff00:1")}
    assert groups[1] == {IPv6Address("ff02::1")}
    with pytest.raises(ValueError):
        joined_groups(socket.AF_UNIX, 1, read=lambda path: text)


def _entry(text: str, ifindex: int, scope: str = "global", **kw: bool) -> InterfaceAddress:
    return InterfaceAddress(
        ip_address(text), 24 if "." in text else 64, scope, False, ifindex, **kw
    )


def test_table_diff_after_resync() -> None:
    table = InterfaceTable()
    table.update_link(2, "eth0", UP)
    table.update_link(3, "eth1", UP)
    table.update_address(_entry("192.0.2.1", 2))
    table.update_address(_entry("192.0.2.9", 3))
    # The fresh dump: eth0 lost one address and gained another, eth1 vanished, eth2 appeared.
    events = table.replace_all([(2, "eth0", UP), (4, "eth2", UP)], [_entry("198.51.100.1", 2)])
    names = sorted(
        (e, getattr(s, "name", None) or str(getattr(s, "address", ""))) for e, s in events
    )
    assert names == sorted(
        [
            ("address-removed", "192.0.2.1"),
            ("address-removed", "192.0.2.9"),
            ("link-down", "eth1"),
            ("link-up", "eth2"),
            ("address-added", "198.51.100.1"),
        ]
    )
    assert table.replace_all([(2, "eth0", UP), (4, "eth2", UP)], [_entry("198.51.100.1", 2)]) == []
    # An address whose state changed (DAD finished) is announced as added, never removed.
    ready = _entry("2001:db8::5", 4)
    table.update_address(replace(ready, tentative=True))
    assert table.replace_all([(2, "eth0", UP), (4, "eth2", UP)], [ready]) == [
        ("address-removed", _entry("198.51.100.1", 2)),
        ("address-added", ready),
    ]


def test_table_source_address_preference_and_default_routes() -> None:
    table = InterfaceTable()
    table.update_link(1, "lo", IFF_UP | IFF_RUNNING | 0x8)
    table.update_link(2, "eth0", UP)
    table.update_link(3, "eth1", UP)
    table.update_address(_entry("fe80::1", 2, "link"))
    table.update_address(_entry("2001:db8::1d", 2, deprecated=True))
    assert table.source_address(socket.AF_INET6, "eth0") == IPv6Address("2001:db8::1d")
    table.update_address(_entry("2001:db8::2", 2))
    assert table.source_address(socket.AF_INET6, "eth0") == IPv6Address("2001:db8::2")
    tentative = InterfaceAddress(IPv6Address("2001:db8::3"), 64, "global", True, 3)
    assert table.update_address(tentative) == [("address-added", tentative)]
    assert table.update_address(tentative) == []  # no change, no event
    assert table.source_address(socket.AF_INET6, "eth1") is None
    table.set_default_routes(
        socket.AF_INET6,
        [DefaultRoute(socket.AF_INET6, 3, 100), DefaultRoute(socket.AF_INET6, 2, 50)],
    )
    assert table.default_interface(socket.AF_INET6) == table.by_name("eth0")
    table.update_link(2, "eth0", IFF_UP)  # carrier lost
    assert table.default_interface(socket.AF_INET6) == table.by_name("eth1")
    assert table.source_address(socket.AF_INET6) is None  # eth1's only address is tentative
    assert table.source_address(socket.AF_INET) is None
