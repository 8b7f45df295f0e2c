"""Who an ID belongs to, and what it names: the two value types of the table's API."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple, TypeAlias

Target: TypeAlias = IPv4Address | IPv6Address | str
"""What an ID names. Domain names are stored lower-cased."""


class Owner(NamedTuple):
    """Who an ID belongs to: the client's IP (normalized string) and its user name, if any.

    A NamedTuple rather than a dataclass because its equality and hash run in C, and the
    table compares owners on every lookup.
    """

    ip: str
    user: str | None = None

    @classmethod
    def from_address(
        cls, address: str | IPv4Address | IPv6Address, user: str | None = None
    ) -> Owner:
        """Build an owner from a client address, normalized.

        An IPv4-mapped IPv6 address (a v4 client seen on a dual-stack socket) becomes the
        IPv4 address, so a client is the same owner whichever socket it reached.
        """
        ip = ipaddress.ip_address(address)
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return cls(ip.compressed, user)
