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


# Parsed sockaddr hosts: clients and the gateway's own addresses repeat, and parsing a
# literal costs microseconds (ipaddress parses octet by octet in Python). Addresses are
# immutable, so sharing them is safe; the bound keeps a scan from growing it forever.
_PARSED: dict[object, IPAddress] = {}
_PARSED_MAX = 4096


def sockaddr_ip(sockaddr: tuple[object, ...]) -> IPAddress:
    key = sockaddr[0]
    address = _PARSED.get(key)
    if address is None:
        host = str(key).partition("%")[0]  # drop a link-local scope
        address = unmapped(ip_address(host))
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = address
    return address


def ip_text(address: IPAddress) -> str:
    """``str(address)``: IPv4's formatted by the C library (ipaddress formats it octet by
    octet in Python, about twice as slow); the text is the same."""
    if isinstance(address, IPv4Address):
        return socket.inet_ntoa(address.packed)
    return str(address)


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
