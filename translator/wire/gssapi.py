"""RFC 1961, the GSS-API method: its messages and its encapsulation, sans-I/O.

Every message is ``VER=1 MTYP LEN(2) TOKEN`` (sections 3.4, 4.3, 5); the server's abort
is ``01 FF`` alone (section 3.8). What the tokens mean is the GSS-API library's business;
this module only frames them, and bounds them before a byte of the body is read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from .errors import RemoteProtocolError

GSSAPI_VERSION: Final = 0x01
MAX_TOKEN: Final = 0xFFFF  # the 2-octet LEN
HEADER_SIZE: Final = 4
ABORT: Final = bytes((GSSAPI_VERSION, 0xFF))


class GssType(IntEnum):
    """MTYP: what a message carries."""

    AUTHENTICATION = 0x01  # a context-establishment token (section 3)
    PROTECTION = 0x02  # the wrapped protection level (section 4.3)
    ENCAPSULATED = 0x03  # wrapped user data (section 5)
    ABORT = 0xFF  # the server refuses (section 3.8)


class ProtectionLevel(IntEnum):
    """Per-message protection (section 4.2). NONE is the Dante/curl extension: the
    negotiation happens, and nothing afterwards is wrapped."""

    NONE = 0x00
    INTEGRITY = 0x01
    CONFIDENTIALITY = 0x02
    SELECTIVE = 0x03


@dataclass(frozen=True, slots=True)
class GssContextToken:
    """The client's next context-establishment token (MTYP 1)."""

    token: bytes


@dataclass(frozen=True, slots=True)
class GssProtectionRequest:
    """The client's requested protection level, still wrapped (MTYP 2). A one-octet
    token is the level sent unwrapped (curl's ``--socks5-gssapi-nec``)."""

    token: bytes


_HEADER = struct.Struct("!BBH")


def encode_gss_message(mtyp: GssType, token: bytes) -> bytes:
    """``01 MTYP LEN TOKEN``; ValueError for a token LEN cannot carry."""
    if len(token) > MAX_TOKEN:
        raise ValueError(f"a GSS-API token of {len(token)} octets does not fit LEN")
    return _HEADER.pack(GSSAPI_VERSION, mtyp, len(token)) + token


def decode_gss_message(
    buffer: bytes | bytearray, expect: GssType, max_token: int = MAX_TOKEN
) -> tuple[bytes, int] | None:
    """``(token, octets used)`` once a whole MTYP ``expect`` message is in ``buffer``.

    RemoteProtocolError for another version or type (an abort from the peer included),
    or for a LEN above ``max_token``, decided from the header alone: an oversized token
    is refused before its body arrives.
    """
    if len(buffer) < 2:
        return None
    version, mtyp = buffer[0], buffer[1]
    if version != GSSAPI_VERSION:
        raise RemoteProtocolError(f"GSS-API message version {version:#04x}, expected 0x01")
    if mtyp != expect:
        if mtyp == GssType.ABORT:
            raise RemoteProtocolError("the peer aborted the GSS-API exchange")
        raise RemoteProtocolError(
            f"GSS-API message type {mtyp:#04x} where {expect.name.lower()} ({expect:#04x}) was due"
        )
    if len(buffer) < HEADER_SIZE:
        return None
    length = (buffer[2] << 8) | buffer[3]
    if length > max_token:
        raise RemoteProtocolError(
            f"GSS-API token of {length} octets exceeds the bound of {max_token}"
        )
    end = HEADER_SIZE + length
    if len(buffer) < end:
        return None
    return bytes(buffer[HEADER_SIZE:end]), end


def encapsulate(token: bytes) -> bytes:
    """One wrapped message framed for the wire (MTYP 3)."""
    return encode_gss_message(GssType.ENCAPSULATED, token)


def decapsulate_datagram(datagram: bytes) -> bytes:
    """The wrapped token of a UDP datagram, which must be exactly one MTYP 3 message."""
    got = decode_gss_message(datagram, GssType.ENCAPSULATED)
    if got is None or got[1] != len(datagram):
        raise RemoteProtocolError("datagram is not exactly one encapsulated GSS-API message")
    return got[0]


class Deframer:
    """Splits a byte stream into the wrapped tokens of its MTYP 3 messages.

    Bytes are fed as they arrive; ``tokens()`` returns every whole token so far and keeps
    the incomplete rest. Once the peer broke the framing every later call raises again.
    """

    __slots__ = ("_broken", "_buffer")

    def __init__(self, initial: bytes = b"") -> None:
        self._buffer = bytearray(initial)
        self._broken: str | None = None

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        return self.tokens()

    def tokens(self) -> list[bytes]:
        if self._broken is not None:
            raise RemoteProtocolError(self._broken)
        found: list[bytes] = []
        buffer = self._buffer
        start, size = 0, len(buffer)
        while size - start >= HEADER_SIZE:
            if buffer[start] != GSSAPI_VERSION or buffer[start + 1] != GssType.ENCAPSULATED:
                try:  # the same checks and words as a single message's
                    decode_gss_message(
                        bytes(buffer[start : start + HEADER_SIZE]), GssType.ENCAPSULATED
                    )
                except RemoteProtocolError as exc:
                    self._broken = exc.reason
                    raise
            end = start + HEADER_SIZE + ((buffer[start + 2] << 8) | buffer[start + 3])
            if end > size:
                break
            found.append(bytes(buffer[start + HEADER_SIZE : end]))
            start = end
        if start:
            del buffer[:start]
        return found

    @property
    def pending(self) -> int:
        """Octets of an incomplete message held back."""
        return len(self._buffer)
