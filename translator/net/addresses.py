"""IP address helpers every layer shares: one ``IPAddress`` type, sockaddr parsing,
families, and the source address the kernel would pick."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address, ip_address

IPAddress = IPv4Address | IPv6Address


def unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` -> ``a.b.c.d``; anything else unchanged."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def sockaddr_ip(sockaddr: tuple[object, ...]) -> IPAddress:
    host = str(sockaddr[0]).partition("%")[0]  # drop a link-local scope
    return unmapped(ip_address(host))


def family_of(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def local_address_toward(destination: IPAddress) -> IPAddress | None:
    """The source address the kernel would pick toward ``destination`` (no packet sent)."""
    try:
        with socket.socket(family_of(destination), socket.SOCK_DGRAM) as probe:
            probe.connect((destination.compressed, 9))
            return sockaddr_ip(probe.getsockname())
    except OSError:
        return None
