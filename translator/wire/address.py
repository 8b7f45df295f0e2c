"""Addresses as they appear on the wire: ATYP, then ADDR (profile 3).

An address is an ``IPv4Address``, an ``IPv6Address``, a domain name (``str``) or an
``AddressId``. Decoders take a buffer and an offset and return ``(value, end)`` or None
while the buffer is still short, so callers can parse incrementally without copying.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from .constants import MAX_DOMAIN_LENGTH, REALID_MAX, Atyp, Rep
from .errors import LocalProtocolError, RemoteProtocolError

_PORT = struct.Struct("!H")
_ID = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class AddressId:
    """An ADDRESS ID (ATYP X'08'): CLASS (must be 0) and a 24-bit REALID.

    ``AddressId(0)`` is the "unspecified" ID, the X'08' counterpart of 0.0.0.0.
    """

    realid: int
    cls: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.realid <= REALID_MAX or not 0 <= self.cls <= 0xFF:
            raise LocalProtocolError(f"ADDRESS ID out of range: {self.cls}/{self.realid}")

    @property
    def unspecified(self) -> bool:
        return self.realid == 0 and self.cls == 0

    def __str__(self) -> str:
        return f"id:{self.realid:06x}"


Address = IPv4Address | IPv6Address | str | AddressId

UNSPECIFIED_V4 = IPv4Address(0)
UNSPECIFIED_V6 = IPv6Address(0)
UNSPECIFIED_ID = AddressId(0)


def _valid_name_octets(raw: bytes) -> bool:
    # Printable ASCII without space: DNS names travel as LDH/punycode; NUL and control
    # octets in a name are an attack, not a name.
    return all(0x21 <= b <= 0x7E for b in raw)


def atyp_of(address: Address) -> Atyp:
    if isinstance(address, IPv4Address):
        return Atyp.IPV4
    if isinstance(address, IPv6Address):
        return Atyp.IPV6
    if isinstance(address, AddressId):
        return Atyp.ADDRESS_ID
    return Atyp.DOMAIN


def encode_address(address: Address) -> bytes:
    """ATYP + ADDR octets for ``address``."""
    if isinstance(address, IPv4Address):
        return b"\x01" + address.packed
    if isinstance(address, IPv6Address):
        return b"\x04" + address.packed
    if isinstance(address, AddressId):
        return b"\x08" + _ID.pack((address.cls << 24) | address.realid)
    raw = address.encode("ascii", "strict") if address.isascii() else b""
    if not 1 <= len(raw) <= MAX_DOMAIN_LENGTH or not _valid_name_octets(raw):
        raise LocalProtocolError(f"cannot encode domain name {address!r}")
    return bytes((Atyp.DOMAIN, len(raw))) + raw


def encode_address_port(address: Address, port: int) -> bytes:
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port out of range: {port}")
    return encode_address(address) + _PORT.pack(port)


def decode_address(buf: bytes | bytearray | memoryview, pos: int) -> tuple[Address, int] | None:
    """Decode ATYP+ADDR at ``pos``; None if more bytes are needed.

    Raises RemoteProtocolError with REP X'08' for an unknown ATYP and X'09' for a bad
    name or an ID whose CLASS is not 0.
    """
    if len(buf) <= pos:
        return None
    atyp = buf[pos]
    start = pos + 1
    if atyp == Atyp.IPV4:
        end = start + 4
        if len(buf) < end:
            return None
        return IPv4Address(bytes(buf[start:end])), end
    if atyp == Atyp.IPV6:
        end = start + 16
        if len(buf) < end:
            return None
        return IPv6Address(bytes(buf[start:end])), end
    if atyp == Atyp.ADDRESS_ID:
        end = start + 4
        if len(buf) < end:
            return None
        cls = buf[start]
        if cls != 0:
            raise RemoteProtocolError(f"ADDRESS ID class {cls:#04x} is not 0", Rep.INVALID_ADDRESS)
        (value,) = _ID.unpack_from(buf, start)
        return AddressId(value & REALID_MAX), end
    if atyp == Atyp.DOMAIN:
        if len(buf) <= start:
            return None
        length = buf[start]
        end = start + 1 + length
        if len(buf) < end:
            return None
        raw = bytes(buf[start + 1 : end])
        if length == 0:
            raise RemoteProtocolError("empty domain name", Rep.INVALID_ADDRESS)
        if not _valid_name_octets(raw):
            raise RemoteProtocolError("domain name with non-printable octets", Rep.INVALID_ADDRESS)
        return raw.decode("ascii"), end
    raise RemoteProtocolError(f"unknown address type {atyp:#04x}", Rep.ADDRESS_TYPE_NOT_SUPPORTED)


def decode_address_port(
    buf: bytes | bytearray | memoryview, pos: int
) -> tuple[Address, int, int] | None:
    """Decode ATYP+ADDR+PORT at ``pos``: ``(address, port, end)`` or None."""
    got = decode_address(buf, pos)
    if got is None:
        return None
    address, end = got
    if len(buf) < end + 2:
        return None
    (port,) = _PORT.unpack_from(buf, end)
    return address, port, end + 2
