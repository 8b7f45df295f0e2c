"""Numeric constants of SOCKS 4/4a and SOCKS 5 with the VH-04 / Kitamura extensions.

Section references point at ../shared/wire-profile.md ("profile") unless an RFC is named.
"""

from __future__ import annotations

from enum import IntEnum

SOCKS4_VERSION = 0x04
SOCKS5_VERSION = 0x05
SOCKS6_VERSION = 0x06
USERPASS_VERSION = 0x01  # RFC 1929 sub-negotiation version


class Method(IntEnum):
    """Authentication methods (RFC 1928 section 3, profile 2)."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(IntEnum):
    """Request commands (profile 3)."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03
    ADDRESS_ASSOCIATE = 0x08
    CONNECT_AA = 0x09
    BIND_AA = 0x0A
    UDP_ASSOCIATE_AA = 0x0B

    @property
    def base(self) -> Command:
        """The plain command without the ADDRESS ASSOCIATE bit (X'08' stays itself)."""
        return _COMMAND_BASES[self]

    @property
    def with_aa(self) -> bool:
        """True for X'09'..X'0B', the commands combined with ADDRESS ASSOCIATE."""
        return self in (Command.CONNECT_AA, Command.BIND_AA, Command.UDP_ASSOCIATE_AA)


#: each command's ``base``, looked up (calling the enum class costs a microsecond)
_COMMAND_BASES = {
    command: command if command is Command.ADDRESS_ASSOCIATE else Command(command & 0x07)
    for command in Command
}
#: the commands by octet, for decoding without calling the enum class
COMMANDS_BY_VALUE = {int(command): command for command in Command}


class Atyp(IntEnum):
    """Address types (profile 3)."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04
    ADDRESS_ID = 0x08


class Rep(IntEnum):
    """Reply codes: RFC 1928 section 6 plus X'09' Invalid address (VH-04, Kitamura)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08
    INVALID_ADDRESS = 0x09


class Socks4Command(IntEnum):
    CONNECT = 0x01
    BIND = 0x02


class Socks4Status(IntEnum):
    GRANTED = 90
    REJECTED = 91
    NO_IDENTD = 92
    IDENTD_MISMATCH = 93


class ControlSub(IntEnum):
    """UDP control channel SUB codes (profile 7)."""

    INTERFACE_DATA = 0x01
    MULTICAST_JOIN = 0x81
    MULTICAST_LEAVE = 0x82


# Request/reply FLAG bits. Their meaning depends on the command (profile 3, 6, 7, 8).
FLAG_REAL_FAMILY = 0x10  # any command: reply addresses in their own family (profile 6)
FLAG_BIND_MULTI = 0x02  # BIND: listen backlog shared by several BINDs (profile 8)
FLAG_BIND_PORT = 0x04  # BIND: listen on DST.PORT (profile 8)
FLAG_UDP_INTERFACE_REQUEST = 0x01  # UDP ASSOCIATE: control channel (VH-04)
FLAG_UDP_USECLIENTSPORT = 0x04  # UDP ASSOCIATE: outbound port = client's port (VH-04)
FLAG_UDP_TUNNEL = 0x20  # UDP ASSOCIATE: datagrams framed on the TCP connection (socks64)

MAX_DOMAIN_LENGTH = 255
MAX_SOCKS4_FIELD = 255  # USERID / 4a hostname bound; RFC has none, we refuse longer
REALID_MAX = 0xFFFFFF
