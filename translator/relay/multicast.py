"""Multicast memberships shared by every UDP association (profile 7, socks64 extension).

A group is joined once on the wire per (group, port, interface), however many
associations asked for it; each received datagram is fanned out to every subscriber.
The membership is dropped when the last subscriber leaves. Interfaces come from the
interface manager (pyroute2): the configured one by name, else the default route's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

from translator.net.addresses import IPAddress, family_of, sockaddr_ip
from translator.net.interfaces import NoInterface, ip_mreqn, ipv6_mreq

if TYPE_CHECKING:
    from translator.net.watcher import InterfaceWatcher

log = logging.getLogger("socks64.multicast")

Subscriber = Callable[[bytes, IPAddress, int], None]


@dataclass(eq=False)
class _Group:
    key: tuple[IPAddress, int, int]
    transport: asyncio.DatagramTransport
    sock: socket.socket
    subscribers: set[Membership] = field(default_factory=set)


@dataclass(eq=False)
class Membership:
    """One association's subscription to a group; hand it back to ``leave()``."""

    group: IPAddress
    port: int
    ifindex: int
    deliver: Subscriber


class _GroupProtocol(asyncio.DatagramProtocol):
    def __init__(self, hub: MulticastHub, key: tuple[IPAddress, int, int]) -> None:
        self.hub = hub
        self.key = key

    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        group = self.hub._groups.get(self.key)
        if group is None:
            return
        source, port = sockaddr_ip(addr), int(addr[1])  # type: ignore[call-overload]
        for membership in tuple(group.subscribers):
            membership.deliver(data, source, port)


class MulticastHub:
    def __init__(
        self, interfaces: InterfaceWatcher, names: dict[int, str | None] | None = None
    ) -> None:
        self.interfaces = interfaces
        self.names = names or {}  # configured interface per address family
        self._groups: dict[tuple[IPAddress, int, int], _Group] = {}

    def interface_index(self, family: int) -> int:
        """The interface for joins and sends in ``family``; NoInterface when none fits."""
        return self.interfaces.multicast_interface(family, self.names.get(family)).index

    def send_interface_index(self, family: int) -> int:
        """Like interface_index, but 0 (the kernel's choice) when nothing is configured
        or found, so plain unicast relaying never depends on it."""
        try:
            return self.interface_index(family)
        except NoInterface:
            return 0

    async def join(self, group: IPAddress, port: int, deliver: Subscriber) -> Membership:
        """Subscribe; raises ValueError for a non-multicast address, NoInterface when no
        interface fits, OSError when the kernel refuses the membership."""
        if not group.is_multicast:
            raise ValueError(f"{group} is not a multicast group")
        family = family_of(group)
        ifindex = self.interface_index(family)
        key = (group, port, ifindex)
        entry = self._groups.get(key)
        if entry is None:
            entry = await self._open(key, family)
            self._groups[key] = entry
            log.info("joined %s port %d on interface %d", group, port, ifindex)
        membership = Membership(group, port, ifindex, deliver)
        entry.subscribers.add(membership)
        return membership

    async def _open(self, key: tuple[IPAddress, int, int], family: int) -> _Group:
        group, port, ifindex = key
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                # Bound to the group, the socket sees only that group's datagrams.
                sock.bind((group.compressed, port, 0, ifindex))
                assert isinstance(group, IPv6Address)
                sock.setsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, ipv6_mreq(group, ifindex)
                )
            else:
                sock.bind((group.compressed, port))
                assert isinstance(group, IPv4Address)
                sock.setsockopt(
                    socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, ip_mreqn(group, ifindex)
                )
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _GroupProtocol(self, key), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        return _Group(key, transport, sock)

    def leave(self, membership: Membership) -> None:
        key = (membership.group, membership.port, membership.ifindex)
        entry = self._groups.get(key)
        if entry is None:
            return
        entry.subscribers.discard(membership)
        if not entry.subscribers:
            del self._groups[key]
            _drop_membership(entry)
            log.info("left %s port %d on interface %d", *key)

    def joined(self) -> list[tuple[IPAddress, int, int, int]]:
        """(group, port, ifindex, subscribers) for status and tests."""
        return [(*key, len(entry.subscribers)) for key, entry in self._groups.items()]

    def close(self) -> None:
        for entry in self._groups.values():
            _drop_membership(entry)
        self._groups.clear()


def _drop_membership(entry: _Group) -> None:
    """Leave explicitly (closing would too) so a failure to leave is at least logged."""
    group, _, ifindex = entry.key
    try:
        if isinstance(group, IPv6Address):
            entry.sock.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_LEAVE_GROUP, ipv6_mreq(group, ifindex)
            )
        else:
            entry.sock.setsockopt(
                socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, ip_mreqn(group, ifindex)
            )
    except OSError as exc:
        log.warning("leaving %s on interface %d: %s", group, ifindex, exc)
    entry.transport.close()
