"""What every probe action shares: JSON output, and addresses and endpoints from the
command line. Used by `netnslab.probe` and `netnslab.probe_udp` alike."""

from __future__ import annotations

import ipaddress
import json
from typing import Any


def emit(**fields: Any) -> None:
    """Print one JSON line and flush, so the scenario sees it at once."""
    print(json.dumps(fields), flush=True)


def parse_address(text: str) -> Any:
    """``id:HEX`` -> AddressId, IP literal -> ip_address, anything else -> domain name."""
    if text.startswith("id:"):
        from translator.client import AddressId

        return AddressId(int(text[3:], 16))
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return text


def describe(address: Any) -> dict[str, Any]:
    """JSON form of an Address: its kind and its text (``id:HEX`` for IDs)."""
    if isinstance(address, ipaddress.IPv4Address):
        return {"kind": "ipv4", "text": str(address)}
    if isinstance(address, ipaddress.IPv6Address):
        return {"kind": "ipv6", "text": str(address)}
    if isinstance(address, str):
        return {"kind": "domain", "text": address}
    return {"kind": "id", "text": str(address)}


def split_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return host, int(port)
    host, _, port = text.rpartition(":")
    return host, int(port)
