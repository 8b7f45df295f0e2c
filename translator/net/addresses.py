"""Address helpers shared by the request handlers: owners, targets, reply families."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address, ip_address

from addrmap import Owner, Target
from translator.wire import Address, AddressId

IPAddress = IPv4Address | IPv6Address


def unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` -> ``a.b.c.d``; anything else unchanged."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def sockaddr_ip(sockaddr: tuple[object, ...]) -> IPAddress:
    host = str(sockaddr[0]).partition("%")[0]  # drop a link-local scope
    return unmapped(ip_address(host))


def family_of(address: IPAddress) -> int:
    return socket.AF_INET6 if isinstance(address, IPv6Address) else socket.AF_INET


def owner_for(client: IPAddress, user: str | None) -> Owner:
    return Owner(client.compressed, user)


def as_target(address: Address) -> Target:
    """A literal or a name as the address table stores it (IDs are resolved first)."""
    if isinstance(address, AddressId):
        raise TypeError("an ADDRESS ID is not a target; look it up first")
    if isinstance(address, str):
        try:  # an IP literal sent as ATYP X'03' is that literal, not a name to look up
            return unmapped(ip_address(address))
        except ValueError:
            return address.lower()
    return address


def is_unspecified(address: Address) -> bool:
    if isinstance(address, AddressId):
        return address.unspecified
    if isinstance(address, str):
        return False
    return address.is_unspecified


def in_client_family(real: IPAddress, client_facing: IPAddress, *, real_family: bool) -> IPAddress:
    """Profile 6: an address of the other family is replaced by our client-facing one."""
    if real_family or family_of(real) == family_of(client_facing):
        return real
    return client_facing


def local_address_toward(destination: IPAddress) -> IPAddress | None:
    """The source address the kernel would pick toward ``destination`` (no packet sent)."""
    family = family_of(destination)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((destination.compressed, 9))
            return sockaddr_ip(probe.getsockname())
    except OSError:
        return None
