"""The gateway's view of its network interfaces, kept current from netlink (pyroute2).

``InterfaceManager.start()`` dumps links, addresses and default routes, then a task follows
the kernel's link, address and route notifications, so an address added or a link taken
down is noticed without a restart. Subscribers hear "link-up", "link-down",
"address-added" and "address-removed". The state lives in ``InterfaceTable``, which knows
nothing of netlink; the manager only turns pyroute2 messages into table updates.

If the event stream fails (for instance ENOBUFS after a burst the socket could not hold),
the task logs it, opens a new socket, dumps everything again and reports the difference
as events: it never dies silently. Default routes are re-read after any link, address or
default-route notification, because the kernel drops IPv4 routes of a downed link without
telling anyone.

Also here, for the multicast part of the UDP relay: the ``ip_mreqn``/``ipv6_mreq`` structs
for joining on a given interface, and ``joined_groups`` to read the kernel's memberships
back from /proc/net/igmp and /proc/net/igmp6.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Literal

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)

from .addresses import IPAddress

log = logging.getLogger("socks64.interfaces")

EventName = Literal["link-up", "link-down", "address-added", "address-removed"]
Event = tuple[EventName, "Interface | InterfaceAddress"]
Callback = Callable[[str, "Interface | InterfaceAddress"], None]


class NoInterface(LookupError):
    """No interface fits the request (a named one is missing, or no default route)."""


# <linux/if.h> and <linux/if_addr.h>
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
IFF_MULTICAST = 0x1000
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
MAIN_TABLE = 254
MAX_RETRY_DELAY = 30.0
RTN_UNICAST = 1
EVENT_GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
)


@dataclass(frozen=True)
class InterfaceAddress:
    """One address on one interface.

    ``tentative`` covers DAD in progress or failed: the kernel will not send from it yet.
    """

    address: IPAddress
    prefixlen: int
    scope: str  # "global", "site", "link", "host"
    tentative: bool
    ifindex: int = 0
    deprecated: bool = False  # IPv6 preferred lifetime over: usable, but a last resort

    @property
    def usable(self) -> bool:
        return not self.tentative


@dataclass(frozen=True)
class Interface:
    """A link. ``up`` means administratively up *and* running (carrier present)."""

    index: int
    name: str
    up: bool
    multicast: bool
    addresses: tuple[InterfaceAddress, ...]
    loopback: bool = False


@dataclass(frozen=True)
class DefaultRoute:
    family: int
    oif: int
    priority: int = 0


class InterfaceTable:
    """Links, addresses and default routes, and the events each change implies. Pure."""

    def __init__(self) -> None:
        self._links: dict[int, Interface] = {}
        self._routes: dict[int, tuple[DefaultRoute, ...]] = {}

    # --- updates; each returns the events it implies -------------------------------------

    def update_link(self, index: int, name: str, flags: int) -> list[Event]:
        old = self._links.get(index)
        new = Interface(
            index=index,
            name=name,
            up=bool(flags & IFF_UP and flags & IFF_RUNNING),
            multicast=bool(flags & IFF_MULTICAST),
            addresses=old.addresses if old else (),
            loopback=bool(flags & IFF_LOOPBACK),
        )
        self._links[index] = new
        if new.up and not (old and old.up):
            return [("link-up", new)]
        if old and old.up and not new.up:
            return [("link-down", new)]
        return []

    def remove_link(self, index: int) -> list[Event]:
        """A deleted link: its addresses are removed, and it goes down if it was up."""
        old = self._links.pop(index, None)
        return _removal_events(old) if old else []

    def update_address(self, entry: InterfaceAddress) -> list[Event]:
        """Add or refresh an address. A change of state (DAD done) is reported as added."""
        link = self._links.get(entry.ifindex)
        if link is None:
            # Address before its link (only possible mid-resync): keep it on a placeholder.
            link = Interface(entry.ifindex, f"if{entry.ifindex}", False, False, ())
        kept = tuple(a for a in link.addresses if not _same_address(a, entry))
        self._links[entry.ifindex] = replace(link, addresses=(*kept, entry))
        return [] if entry in link.addresses else [("address-added", entry)]

    def remove_address(self, entry: InterfaceAddress) -> list[Event]:
        link = self._links.get(entry.ifindex)
        if link is None:
            return []
        gone = [a for a in link.addresses if _same_address(a, entry)]
        if not gone:
            return []
        kept = tuple(a for a in link.addresses if not _same_address(a, entry))
        self._links[entry.ifindex] = replace(link, addresses=kept)
        return [("address-removed", a) for a in gone]

    def set_default_routes(self, family: int, routes: Iterable[DefaultRoute]) -> None:
        self._routes[family] = tuple(sorted(routes, key=lambda r: r.priority))

    def replace_all(
        self,
        links: Iterable[tuple[int, str, int]],
        addresses: Iterable[InterfaceAddress],
    ) -> list[Event]:
        """Swap in a fresh dump and report how it differs from what we had."""
        fresh = InterfaceTable()
        for index, name, flags in links:
            fresh.update_link(index, name, flags)
        for entry in addresses:
            fresh.update_address(entry)
        events: list[Event] = []
        for index, old in self._links.items():
            new = fresh._links.get(index)
            if new is None:
                events += _removal_events(old)
                continue
            events += [
                ("address-removed", a)
                for a in old.addresses
                if not any(_same_address(a, b) for b in new.addresses)
            ]
            if old.up and not new.up:
                events.append(("link-down", new))
        for index, new in fresh._links.items():
            old_link = self._links.get(index)
            if new.up and not (old_link and old_link.up):
                events.append(("link-up", new))
            previous = old_link.addresses if old_link else ()
            events += [("address-added", a) for a in new.addresses if a not in previous]
        self._links = fresh._links
        return events

    # --- queries -------------------------------------------------------------------------

    def interfaces(self) -> list[Interface]:
        return [self._links[i] for i in sorted(self._links)]

    def by_name(self, name: str) -> Interface | None:
        return next((i for i in self._links.values() if i.name == name), None)

    def default_interface(self, family: int) -> Interface | None:
        for route in self._routes.get(family, ()):
            link = self._links.get(route.oif)
            if link is not None and link.up:
                return link
        return None

    def source_address(
        self, family: int, interface: str | None = None, *, allow_link_local: bool = False
    ) -> IPAddress | None:
        link = self.by_name(interface) if interface else self.default_interface(family)
        if link is None or not link.up:
            return None
        version = 4 if family == socket.AF_INET else 6
        ranked: list[tuple[int, IPAddress]] = []
        for entry in link.addresses:
            if entry.address.version != version or entry.tentative:
                continue
            rank = {"global": 0, "site": 2}.get(entry.scope)
            if entry.scope == "host" and (interface or link.loopback):
                rank = 4  # 127.0.0.1 / ::1 only when lo was asked for
            if entry.scope == "link" and allow_link_local:
                rank = 6
            if rank is None:
                continue
            ranked.append((rank + entry.deprecated, entry.address))
        return min(ranked, key=lambda pair: pair[0])[1] if ranked else None

    def has_address(self, address: str | IPAddress) -> bool:
        wanted = _plain(address)
        return any(
            _plain(entry.address) == wanted
            for link in self._links.values()
            for entry in link.addresses
        )


class InterfaceManager:
    """Follows the kernel's interfaces over netlink; see the module docstring.

    ``netns`` names a network namespace to watch instead of our own (tests, the lab).
    """

    def __init__(self, *, netns: str | None = None, retry_delay: float = 1.0) -> None:
        self._netns = netns
        self._retry_delay = retry_delay
        self._table = InterfaceTable()
        self._subscribers: list[Callback] = []
        self._events: Any = None  # AsyncIPRoute bound to the notification groups
        self._query: Any = None  # AsyncIPRoute for dumps
        self._task: asyncio.Task[None] | None = None
        self.resyncs = 0  # how many times the event stream was re-established

    async def start(self) -> None:
        """Dump the current state, then follow notifications in a background task."""
        if self._task is not None:
            raise RuntimeError("InterfaceManager already started")
        await self._connect()
        self._task = asyncio.create_task(self._follow(), name="socks64-interfaces")

    async def close(self) -> None:
        """Stop following events and close the netlink sockets."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close_sockets()

    async def __aenter__(self) -> InterfaceManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- queries (see InterfaceTable) -------------------------------------------------------

    def interfaces(self) -> list[Interface]:
        """All known links, by index."""
        return self._table.interfaces()

    def by_name(self, name: str) -> Interface | None:
        return self._table.by_name(name)

    def index_of(self, name: str) -> int | None:
        link = self._table.by_name(name)
        return link.index if link else None

    def default_interface(self, family: int) -> Interface | None:
        """The up interface of the best main-table default route for ``family``."""
        return self._table.default_interface(family)

    def source_address(
        self, family: int, interface: str | None = None, *, allow_link_local: bool = False
    ) -> IPAddress | None:
        """A usable address of ``family`` on ``interface`` (default: the default route's).

        The link must be up and the address not tentative. Global scope first, then site,
        then host scope (only on loopback or a named interface), then link-local only with
        ``allow_link_local``; deprecated addresses after preferred ones of the same scope.
        """
        return self._table.source_address(family, interface, allow_link_local=allow_link_local)

    def has_address(self, address: str | IPAddress) -> bool:
        """Whether any interface has this address (IPv4-mapped IPv6 counts as IPv4)."""
        return self._table.has_address(address)

    def multicast_interface(self, family: int, name: str | None) -> Interface:
        """The interface to join groups on: ``name`` if configured, else the default route's."""
        family_name = "IPv4" if family == socket.AF_INET else "IPv6"
        if name:
            link = self._table.by_name(name)
            if link is None:
                known = ", ".join(i.name for i in self._table.interfaces()) or "none"
                raise NoInterface(f"multicast interface {name!r} does not exist (known: {known})")
            return link
        link = self._table.default_interface(family)
        if link is None:
            raise NoInterface(
                f"no multicast interface configured and no {family_name} default route "
                "whose interface is up to pick one from"
            )
        return link

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event, subject)`` on every change; returns an unsubscribe function.

        Events: "link-up"/"link-down" (subject: Interface; a deleted link goes down),
        "address-added" (also when an address's state changes, e.g. DAD finished) and
        "address-removed" (subject: InterfaceAddress, ``ifindex`` says where).
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    # --- netlink --------------------------------------------------------------------------

    async def _connect(self) -> None:
        self._close_sockets()
        # Bind for notifications before dumping, so nothing falls between the two.
        self._events = AsyncIPRoute(netns=self._netns)
        await self._events.bind(groups=EVENT_GROUPS)
        self._query = AsyncIPRoute(netns=self._netns)
        links = [_link_from_message(m) async for m in await self._query.get_links()]
        addresses = [_address_from_message(m) async for m in await self._query.get_addr()]
        self._emit(self._table.replace_all(links, addresses))
        await self._refresh_routes()

    async def _refresh_routes(self) -> None:
        for family in (socket.AF_INET, socket.AF_INET6):
            routes = await self._query.get_default_routes(family=family)
            self._table.set_default_routes(family, _default_routes([m async for m in routes]))

    async def _follow(self) -> None:
        delay = self._retry_delay
        while True:
            try:
                if self._events is None:
                    await self._connect()
                    self.resyncs += 1
                    delay = self._retry_delay
                    log.info("netlink event stream re-established")
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Recoverable (ENOBUFS after a burst, a reset): the resync reports the gap.
                log.warning(
                    "netlink event stream failed; resubscribing in %.1f s", delay, exc_info=True
                )
                self._close_sockets()
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)

    async def _consume(self) -> None:
        while True:
            batch = 0
            routes_stale = False
            async for message in self._events.get():
                batch += 1
                try:
                    routes_stale |= self._handle(message)
                except Exception:  # one odd message must not stop the stream
                    log.exception("could not handle netlink message %r", message.get("event"))
            if batch == 0:
                raise ConnectionError("netlink event socket returned no messages")
            if routes_stale:
                await self._refresh_routes()

    def _handle(self, message: Mapping[str, Any]) -> bool:
        """Apply one notification; return whether default routes must be re-read."""
        kind = message.get("event")
        if kind == "RTM_NEWLINK":
            self._emit(self._table.update_link(*_link_from_message(message)))
        elif kind == "RTM_DELLINK":
            self._emit(self._table.remove_link(message["index"]))
        elif kind == "RTM_NEWADDR":
            self._emit(self._table.update_address(_address_from_message(message)))
        elif kind == "RTM_DELADDR":
            self._emit(self._table.remove_address(_address_from_message(message)))
        elif kind in ("RTM_NEWROUTE", "RTM_DELROUTE"):
            return bool(message.get("dst_len") == 0)
        else:
            return False
        return True

    def _emit(self, events: list[Event]) -> None:
        for name, subject in events:
            log.debug("interface event %s %s", name, subject)
            for callback in list(self._subscribers):
                try:
                    callback(name, subject)
                except Exception:
                    log.exception("interface event subscriber %r failed", callback)

    def _close_sockets(self) -> None:
        for attribute in ("_events", "_query"):
            sock = getattr(self, attribute)
            setattr(self, attribute, None)
            if sock is not None:
                try:
                    sock.close()
                except Exception:
                    log.debug("closing a netlink socket failed", exc_info=True)


# --- pyroute2 messages -> table records ----------------------------------------------------


def _link_from_message(message: Mapping[str, Any]) -> tuple[int, str, int]:
    index = int(message["index"])
    return index, message.get("ifname") or f"if{index}", int(message["flags"])


def _address_from_message(message: Mapping[str, Any]) -> InterfaceAddress:
    # IFA_LOCAL is our end of a point-to-point link; IFA_ADDRESS then is the peer.
    text = message.get("IFA_LOCAL") or message.get("IFA_ADDRESS")
    if text is None:
        raise ValueError("address message without IFA_LOCAL or IFA_ADDRESS")
    flags = message.get("IFA_FLAGS")  # the 32-bit flags, when the kernel sends them
    if flags is None:
        flags = message["flags"]
    scope = int(message["scope"])
    return InterfaceAddress(
        address=ip_address(text),
        prefixlen=int(message["prefixlen"]),
        scope=SCOPES.get(scope, str(scope)),
        tentative=bool(flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)),
        ifindex=int(message["index"]),
        deprecated=bool(flags & IFA_F_DEPRECATED),
    )


def _default_routes(messages: Iterable[Mapping[str, Any]]) -> list[DefaultRoute]:
    routes = []
    for message in messages:
        table = message.get("RTA_TABLE") or message.get("table")
        if table != MAIN_TABLE or message.get("type") != RTN_UNICAST:
            continue
        priority = int(message.get("RTA_PRIORITY") or 0)
        oifs = [message.get("RTA_OIF")]
        oifs += [hop.get("oif") for hop in message.get("RTA_MULTIPATH") or ()]
        routes += [DefaultRoute(message["family"], oif, priority) for oif in oifs if oif]
    return routes


def _removal_events(old: Interface) -> list[Event]:
    events: list[Event] = [("address-removed", a) for a in old.addresses]
    if old.up:
        events.append(("link-down", replace(old, up=False, addresses=())))
    return events


def _same_address(a: InterfaceAddress, b: InterfaceAddress) -> bool:
    return (a.address, a.prefixlen) == (b.address, b.prefixlen)


def _plain(address: str | IPAddress) -> IPAddress:
    parsed = ip_address(address) if isinstance(address, str) else address
    if isinstance(parsed, IPv6Address):
        if parsed.ipv4_mapped is not None:
            return parsed.ipv4_mapped
        if parsed.scope_id:
            return IPv6Address(parsed.packed)
    return parsed


# --- multicast membership helpers ----------------------------------------------------------


def ip_mreqn(group: IPv4Address, ifindex: int) -> bytes:
    """struct ip_mreqn for IP_ADD_MEMBERSHIP / IP_DROP_MEMBERSHIP on interface ``ifindex``."""
    if not group.is_multicast:
        raise ValueError(f"{group} is not a multicast group")
    return struct.pack("=4s4si", group.packed, bytes(4), ifindex)


def ipv6_mreq(group: IPv6Address, ifindex: int) -> bytes:
    """struct ipv6_mreq for IPV6_JOIN_GROUP / IPV6_LEAVE_GROUP on interface ``ifindex``."""
    if not group.is_multicast:
        raise ValueError(f"{group} is not a multicast group")
    return struct.pack("=16sI", group.packed, ifindex)


def parse_igmp(text: str) -> dict[int, set[IPv4Address]]:
    """Groups per interface index from /proc/net/igmp.

    A device line ("2\\teth0 : 1 V3") is followed by indented group lines whose first
    field is the group as the kernel's %08X of a big-endian word read in host order.
    """
    groups: dict[int, set[IPv4Address]] = {}
    current: int | None = None
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] == "Idx":
            continue
        if not line[0].isspace():
            current = int(fields[0])
            groups.setdefault(current, set())
        elif current is not None:
            packed = int(fields[0], 16).to_bytes(4, sys.byteorder)
            groups[current].add(IPv4Address(packed))
    return groups


def parse_igmp6(text: str) -> dict[int, set[IPv6Address]]:
    """Groups per interface index from /proc/net/igmp6 ("idx name hex32 users flags timer")."""
    groups: dict[int, set[IPv6Address]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or len(fields[2]) != 32:
            continue
        groups.setdefault(int(fields[0]), set()).add(IPv6Address(bytes.fromhex(fields[2])))
    return groups


def _read_text(path: str) -> str:
    with open(path, encoding="ascii") as handle:
        return handle.read()


def joined_groups(
    family: int, ifindex: int, *, read: Callable[[str], str] = _read_text
) -> set[IPAddress]:
    """Groups the kernel has joined on ``ifindex`` (any socket), from /proc/net.

    ``read(path)`` returns a file's text; pass another reader to look into a namespace.
    """
    result: set[IPAddress] = set()
    if family == socket.AF_INET:
        result.update(parse_igmp(read("/proc/net/igmp")).get(ifindex, ()))
    elif family == socket.AF_INET6:
        result.update(parse_igmp6(read("/proc/net/igmp6")).get(ifindex, ()))
    else:
        raise ValueError(f"not an IP family: {family}")
    return result
