"""Typed SOCKS messages with ``encode()`` and incremental ``decode_*`` functions.

Every ``decode_*`` takes a buffer and returns ``(message, consumed)``, or None while the
buffer holds only part of the message. Bad bytes raise RemoteProtocolError carrying the
reply code to answer with. Nothing here does I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from .address import (
    UNSPECIFIED_V4,
    Address,
    decode_address_port,
    encode_address_port,
)
from .constants import (
    COMMANDS_BY_VALUE,
    MAX_SOCKS4_FIELD,
    SOCKS4_VERSION,
    SOCKS5_VERSION,
    USERPASS_VERSION,
    Atyp,
    Command,
    ControlSub,
    Rep,
    Socks4Command,
    Socks4Status,
)
from .errors import LocalProtocolError, RemoteProtocolError

Buffer = bytes | bytearray | memoryview
_PORT = struct.Struct("!H")
_S4_HEAD = struct.Struct("!BBH4s")
_FRAME_LEN = struct.Struct("!H")
MAX_TUNNEL_FRAME = 0xFFFF


def _octets(*values: int) -> bytes:
    """Single-octet fields; anything outside 0..255 is our own mistake, not the peer's."""
    try:
        return bytes(values)  # checks the range itself: no generator per reply
    except ValueError:
        raise LocalProtocolError(f"octet field out of range in {values}") from None


def _port(port: int) -> bytes:
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port out of range: {port}")
    return _PORT.pack(port)


# --- RFC 1928 section 3: greeting and method selection -------------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    """VER NMETHODS METHODS."""

    methods: tuple[int, ...]

    def encode(self) -> bytes:
        if not 1 <= len(self.methods) <= 255:
            raise LocalProtocolError("a greeting offers 1..255 methods")
        return _octets(SOCKS5_VERSION, len(self.methods), *self.methods)


def decode_greeting(buf: Buffer) -> tuple[Greeting, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != SOCKS5_VERSION:
        raise RemoteProtocolError(f"greeting version {buf[0]:#04x} is not 5")
    count = buf[1]
    if count == 0:
        raise RemoteProtocolError("greeting offers no method (NMETHODS=0)")
    end = 2 + count
    if len(buf) < end:
        return None
    return Greeting(tuple(bytes(buf[2:end]))), end


@dataclass(frozen=True, slots=True)
class MethodSelection:
    method: int

    def encode(self) -> bytes:
        return _octets(SOCKS5_VERSION, self.method)


def decode_method_selection(buf: Buffer) -> tuple[MethodSelection, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != SOCKS5_VERSION:
        raise RemoteProtocolError(f"method selection version {buf[0]:#04x} is not 5")
    return MethodSelection(buf[1]), 2


# --- RFC 1929: username/password ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserPassRequest:
    username: bytes
    password: bytes = field(repr=False)

    def encode(self) -> bytes:
        if not (1 <= len(self.username) <= 255 and 1 <= len(self.password) <= 255):
            raise LocalProtocolError("RFC 1929 user name and password are 1..255 octets")
        return (
            bytes((USERPASS_VERSION, len(self.username)))
            + self.username
            + bytes((len(self.password),))
            + self.password
        )


def decode_userpass_request(buf: Buffer) -> tuple[UserPassRequest, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != USERPASS_VERSION:
        raise RemoteProtocolError(f"username/password version {buf[0]:#04x} is not 1")
    ulen = buf[1]
    if ulen == 0:
        raise RemoteProtocolError("empty user name")
    plen_at = 2 + ulen
    if len(buf) <= plen_at:
        return None
    plen = buf[plen_at]
    if plen == 0:
        raise RemoteProtocolError("empty password")
    end = plen_at + 1 + plen
    if len(buf) < end:
        return None
    return UserPassRequest(bytes(buf[2:plen_at]), bytes(buf[plen_at + 1 : end])), end


@dataclass(frozen=True, slots=True)
class UserPassReply:
    success: bool

    def encode(self) -> bytes:
        return bytes((USERPASS_VERSION, 0 if self.success else 1))


def decode_userpass_reply(buf: Buffer) -> tuple[UserPassReply, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != USERPASS_VERSION:
        raise RemoteProtocolError(f"username/password reply version {buf[0]:#04x} is not 1")
    return UserPassReply(buf[1] == 0), 2


# --- RFC 1928 sections 4 and 6, FLAG per VH-04 (profile 3) ----------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """VER CMD FLAG ATYP DST.ADDR DST.PORT. For ADDRESS ASSOCIATE, ``port`` is ADR.PREF."""

    command: Command
    address: Address
    port: int
    flag: int = 0

    def encode(self) -> bytes:
        return _octets(SOCKS5_VERSION, self.command, self.flag) + encode_address_port(
            self.address, self.port
        )


def decode_request(buf: Buffer) -> tuple[Request, int] | None:
    if len(buf) < 4:
        return None
    if buf[0] != SOCKS5_VERSION:
        raise RemoteProtocolError(f"request version {buf[0]:#04x} is not 5", Rep.GENERAL_FAILURE)
    got = decode_address_port(buf, 3)
    if got is None:
        return None
    address, port, end = got
    # The address is parsed first so an unknown ATYP wins over an unknown command only
    # when its length cannot be known; with a parsable address the command decides.
    command = COMMANDS_BY_VALUE.get(buf[1])  # Command(buf[1]), without the enum call
    if command is None:
        raise RemoteProtocolError(f"unsupported command {buf[1]:#04x}", Rep.COMMAND_NOT_SUPPORTED)
    return Request(command, address, port, buf[2]), end


@dataclass(frozen=True, slots=True)
class Reply:
    """VER REP FLAG ATYP BND.ADDR BND.PORT."""

    rep: Rep
    address: Address = UNSPECIFIED_V4
    port: int = 0
    flag: int = 0

    def encode(self) -> bytes:
        return _octets(SOCKS5_VERSION, self.rep, self.flag) + encode_address_port(
            self.address, self.port
        )


def decode_reply(buf: Buffer) -> tuple[Reply, int] | None:
    if len(buf) < 4:
        return None
    if buf[0] != SOCKS5_VERSION:
        raise RemoteProtocolError(f"reply version {buf[0]:#04x} is not 5")
    got = decode_address_port(buf, 3)
    if got is None:
        return None
    address, port, end = got
    try:
        rep = Rep(buf[1])
    except ValueError:
        raise RemoteProtocolError(f"unknown reply code {buf[1]:#04x}") from None
    return Reply(rep, address, port, buf[2]), end


# --- SOCKS 4 / 4a ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Socks4Request:
    """VN CD DSTPORT DSTIP USERID NUL [HOSTNAME NUL] (4a when DSTIP is 0.0.0.x, x != 0)."""

    command: Socks4Command
    port: int
    address: IPv4Address | str
    userid: bytes = b""

    def encode(self) -> bytes:
        if b"\x00" in self.userid or len(self.userid) > MAX_SOCKS4_FIELD:
            raise LocalProtocolError("SOCKS 4 USERID must be NUL-free and at most 255 octets")
        if isinstance(self.address, str):
            raw = self.address.encode("ascii", "replace")
            if not 1 <= len(raw) <= MAX_SOCKS4_FIELD or not all(0x21 <= b <= 0x7E for b in raw):
                raise LocalProtocolError(f"cannot encode SOCKS 4a hostname {self.address!r}")
            ip, tail = IPv4Address(1).packed, raw + b"\x00"
        else:
            if self.address.packed[:3] == b"\x00\x00\x00" and self.address.packed[3]:
                raise LocalProtocolError(f"{self.address} would read as a SOCKS 4a marker")
            ip, tail = self.address.packed, b""
        head = _octets(SOCKS4_VERSION, self.command) + _port(self.port) + ip
        return head + self.userid + b"\x00" + tail


def _find_nul(buf: Buffer, start: int, what: str) -> int | None:
    limit = min(len(buf), start + MAX_SOCKS4_FIELD + 1)
    index = bytes(buf[start:limit]).find(b"\x00")
    if index >= 0:
        return start + index
    if limit - start > MAX_SOCKS4_FIELD:
        raise RemoteProtocolError(f"SOCKS 4 {what} longer than {MAX_SOCKS4_FIELD} octets")
    return None


def decode_socks4_request(buf: Buffer) -> tuple[Socks4Request, int] | None:
    if len(buf) < _S4_HEAD.size:
        return None
    version, cd, port, ip = _S4_HEAD.unpack_from(buf, 0)
    if version != SOCKS4_VERSION:
        raise RemoteProtocolError(f"SOCKS 4 version {version:#04x}")
    user_end = _find_nul(buf, _S4_HEAD.size, "USERID")
    if user_end is None:
        return None
    userid = bytes(buf[_S4_HEAD.size : user_end])
    end = user_end + 1
    address: IPv4Address | str = IPv4Address(ip)
    if ip[:3] == b"\x00\x00\x00" and ip[3] != 0:
        name_end = _find_nul(buf, end, "hostname")
        if name_end is None:
            return None
        raw = bytes(buf[end:name_end])
        if not raw or not all(0x21 <= b <= 0x7E for b in raw):
            raise RemoteProtocolError("SOCKS 4a hostname empty or not printable")
        address, end = raw.decode("ascii"), name_end + 1
    try:
        command = Socks4Command(cd)
    except ValueError:
        raise RemoteProtocolError(f"unsupported SOCKS 4 command {cd:#04x}") from None
    return Socks4Request(command, port, address, userid), end


@dataclass(frozen=True, slots=True)
class Socks4Reply:
    """VN(0) CD DSTPORT DSTIP."""

    status: Socks4Status
    port: int = 0
    address: IPv4Address = UNSPECIFIED_V4

    def encode(self) -> bytes:
        return _octets(0, self.status) + _port(self.port) + self.address.packed


def decode_socks4_reply(buf: Buffer) -> tuple[Socks4Reply, int] | None:
    if len(buf) < _S4_HEAD.size:
        return None
    version, cd, port, ip = _S4_HEAD.unpack_from(buf, 0)
    if version != 0:
        raise RemoteProtocolError(f"SOCKS 4 reply version {version:#04x} is not 0")
    try:
        status = Socks4Status(cd)
    except ValueError:
        raise RemoteProtocolError(f"unknown SOCKS 4 reply code {cd}") from None
    return Socks4Reply(status, port, IPv4Address(ip)), _S4_HEAD.size


# --- UDP (RFC 1928 section 7; profile 7) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """FLAG(2) FRAG ATYP DST.ADDR DST.PORT DATA. FLAG is X'0000' (VH-04)."""

    address: Address
    port: int
    data: bytes
    frag: int = 0

    def encode(self) -> bytes:
        header = b"\x00\x00" + _octets(self.frag)
        return header + encode_address_port(self.address, self.port) + self.data


def decode_udp_datagram(buf: Buffer) -> UdpDatagram:
    """Decode one whole datagram; a short one is an error, not "need more data"."""
    if len(buf) < 4:
        raise RemoteProtocolError("UDP datagram shorter than its header")
    got = decode_address_port(buf, 3)
    if got is None:
        raise RemoteProtocolError("UDP datagram header truncated")
    address, port, end = got
    return UdpDatagram(address, port, bytes(buf[end:]), buf[2])


# ADDR length by ATYP where it is fixed (an ADDRESS ID is CLASS(1) REALID(3)).
_ADDRESS_LENGTHS: dict[int, int] = {Atyp.IPV4: 4, Atyp.IPV6: 16, Atyp.ADDRESS_ID: 4}
# RSV(2) FRAG ATYP ADDR PORT(2), keyed by plain ints: the relay looks one up per datagram.
_UDP_HEADER_LENGTHS: dict[int, int] = {
    int(atyp): 4 + size + 2 for atyp, size in _ADDRESS_LENGTHS.items()
}
_DOMAIN = int(Atyp.DOMAIN)


def udp_header_length(data: Buffer) -> int:
    """The length of the UDP request header at the start of ``data`` from its framing
    alone, or 0 if it cannot tell (unknown ATYP, or ``data`` shorter than the header).

    For a relay's per-datagram fast path: no exception, no copy, nothing validated (RSV,
    FRAG and the address are decode_udp_datagram's business). The layout does not
    depend on FRAG, so whether a fragment is acceptable is for the caller to check.
    """
    if len(data) < 5:
        return 0
    atyp = data[3]
    # RSV(2) FRAG ATYP LEN NAME PORT(2): a name's length is its first octet.
    length = _UDP_HEADER_LENGTHS.get(atyp) or (7 + data[4] if atyp == _DOMAIN else 0)
    return length if length <= len(data) else 0


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """UDP control channel request: RSV(X'00') SUB FLAG ATYP ADDR PORT (VH-04, profile 7)."""

    sub: ControlSub
    address: Address
    port: int
    flag: int = 0

    def encode(self) -> bytes:
        return _octets(0, self.sub, self.flag) + encode_address_port(self.address, self.port)


def control_request_length(buf: Buffer) -> int | None:
    """The length of the control request at the start of ``buf`` from its framing alone
    (RSV SUB FLAG ATYP ADDR PORT), or None while short. An unknown ATYP has no length:
    RemoteProtocolError (REP X'08'), and the stream cannot be resynchronised."""
    if len(buf) < 4:
        return None
    atyp = buf[3]
    if atyp == Atyp.DOMAIN:
        if len(buf) < 5:
            return None
        return 5 + buf[4] + 2
    size = _ADDRESS_LENGTHS.get(atyp)
    if size is None:
        raise RemoteProtocolError(
            f"unknown address type {atyp:#04x}", Rep.ADDRESS_TYPE_NOT_SUPPORTED
        )
    return 4 + size + 2


def decode_control_request(buf: Buffer) -> tuple[ControlRequest, int] | None:
    if len(buf) < 4:
        return None
    if buf[0] != 0:
        raise RemoteProtocolError(f"control request RSV {buf[0]:#04x} is not 0")
    got = decode_address_port(buf, 3)
    if got is None:
        return None
    address, port, end = got
    try:
        sub = ControlSub(buf[1])
    except ValueError:
        raise RemoteProtocolError(
            f"unknown control SUB {buf[1]:#04x}", Rep.COMMAND_NOT_SUPPORTED
        ) from None
    return ControlRequest(sub, address, port, buf[2]), end


# --- UDP in TCP (profile 7, FLAG X'20') -----------------------------------------------


def encode_tunnel_frame(payload: bytes) -> bytes:
    """2-octet length, then a UDP header+data or a control request."""
    if len(payload) > MAX_TUNNEL_FRAME:
        raise LocalProtocolError("tunnel frame payload exceeds 65535 octets")
    return _FRAME_LEN.pack(len(payload)) + payload


def decode_tunnel_frame(buf: Buffer) -> tuple[bytes, int] | None:
    if len(buf) < 2:
        return None
    (length,) = _FRAME_LEN.unpack_from(buf, 0)
    if length < 4:
        raise RemoteProtocolError(f"tunnel frame of {length} octets is shorter than a header")
    end = 2 + length
    if len(buf) < end:
        return None
    return bytes(buf[2:end]), end


def encode_tunnel_datagram(datagram: UdpDatagram) -> bytes:
    return encode_tunnel_frame(datagram.encode())


def encode_tunnel_control(request: ControlRequest) -> bytes:
    return encode_tunnel_frame(request.encode())


def is_control_payload(payload: Buffer) -> bool:
    """In a tunnel, control requests have SUB (never 0) where datagrams have FLAG's low octet."""
    return len(payload) >= 2 and payload[1] != 0


__all__ = [
    "ControlRequest",
    "Greeting",
    "MethodSelection",
    "Reply",
    "Request",
    "Socks4Reply",
    "Socks4Request",
    "UdpDatagram",
    "UserPassReply",
    "UserPassRequest",
]
