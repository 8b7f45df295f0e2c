"""Known byte vectors for every message of translator.wire (RFC 1928/1929, SOCKS 4/4a, profile).

Each vector is written out in hex as the RFC draws it, field by field, so a reader can
check it against the layout. Decoders are also fed every strict prefix of a valid
message (they must wait, not fail) and a trailing byte (they must not consume it).
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from translator.wire import (
    AddressId,
    Atyp,
    Command,
    ControlRequest,
    ControlSub,
    Greeting,
    LocalProtocolError,
    MethodSelection,
    RemoteProtocolError,
    Rep,
    Reply,
    Request,
    Socks4Command,
    Socks4Reply,
    Socks4Request,
    Socks4Status,
    UdpDatagram,
    UserPassReply,
    UserPassRequest,
    atyp_of,
    decode_control_request,
    decode_greeting,
    decode_method_selection,
    decode_reply,
    decode_request,
    decode_socks4_reply,
    decode_socks4_request,
    decode_tunnel_frame,
    decode_udp_datagram,
    decode_userpass_reply,
    decode_userpass_request,
    encode_tunnel_control,
    encode_tunnel_datagram,
    encode_tunnel_frame,
    is_control_payload,
    udp_header_length,
)

Decoder = Callable[[bytes | bytearray], Any]

V4 = IPv4Address("192.0.2.1")  # c0000201
V6 = IPv6Address("2001:db8::1")  # 20010db8 00000000 00000000 00000001
NAME = "example.com"  # 0b 6578616d706c652e636f6d
HEX_NAME = "0b6578616d706c652e636f6d"
HEX_V6 = "20010db8000000000000000000000001"


def h(text: str) -> bytes:
    """Hex with spaces allowed, so vectors can be written field by field."""
    return bytes.fromhex(text.replace(" ", ""))


def assert_decodes(decode: Decoder, wire: bytes, expected: object) -> None:
    """``wire`` decodes to ``expected``; every prefix waits; a trailing octet is left alone."""
    assert decode(wire) == (expected, len(wire))
    assert decode(wire + b"\x05") == (expected, len(wire))
    assert decode(bytearray(wire)) == (expected, len(wire))
    for cut in range(len(wire)):
        assert decode(wire[:cut]) is None, f"prefix of {cut} octets"


def assert_rejects(decode: Decoder, wire: bytes, rep: Rep | None) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode(wire)
    assert caught.value.rep == rep


# --- RFC 1928 section 3: greeting and method selection ----------------------------------


@pytest.mark.parametrize(
    ("wire", "methods"),
    [
        ("05 01 00", (0x00,)),
        ("05 02 00 02", (0x00, 0x02)),
        ("05 03 02 01 00", (0x02, 0x01, 0x00)),
        ("05 ff" + "80" * 255, (0x80,) * 255),
    ],
)
def test_greeting_vectors(wire: str, methods: tuple[int, ...]) -> None:
    assert Greeting(methods).encode() == h(wire)
    assert_decodes(decode_greeting, h(wire), Greeting(methods))


def test_greeting_with_no_methods_is_rejected_without_a_reply_code() -> None:
    assert_rejects(decode_greeting, h("05 00"), None)
    assert_rejects(decode_greeting, h("05 00 00"), None)


@pytest.mark.parametrize("version", ["04", "06", "00", "01"])
def test_greeting_with_wrong_version_is_rejected(version: str) -> None:
    assert_rejects(decode_greeting, h(version + "01 00"), None)


@pytest.mark.parametrize("methods", [(), tuple(range(256))])
def test_greeting_encode_refuses_unencodable_method_counts(methods: tuple[int, ...]) -> None:
    with pytest.raises(LocalProtocolError):
        Greeting(methods).encode()


@pytest.mark.parametrize(("wire", "method"), [("05 00", 0x00), ("05 02", 0x02), ("05 ff", 0xFF)])
def test_method_selection_vectors(wire: str, method: int) -> None:
    assert MethodSelection(method).encode() == h(wire)
    assert_decodes(decode_method_selection, h(wire), MethodSelection(method))


def test_method_selection_with_wrong_version_is_rejected() -> None:
    assert_rejects(decode_method_selection, h("04 00"), None)


# --- RFC 1929 ------------------------------------------------------------------------


def test_userpass_request_vector() -> None:
    # VER ULEN UNAME PLEN PASSWD
    wire = h("01 04 75736572 06 736563726574")
    message = UserPassRequest(b"user", b"secret")
    assert message.encode() == wire
    assert_decodes(decode_userpass_request, wire, message)


def test_userpass_request_longest_fields() -> None:
    message = UserPassRequest(b"u" * 255, b"\x00" * 255)  # the password may be any octets
    wire = h("01 ff") + b"u" * 255 + h("ff") + b"\x00" * 255
    assert message.encode() == wire
    assert_decodes(decode_userpass_request, wire, message)


def test_userpass_password_is_not_shown_in_repr() -> None:
    assert "hunter2" not in repr(UserPassRequest(b"user", b"hunter2"))


@pytest.mark.parametrize(
    "wire",
    [
        "01 00 04 70617373",  # empty user name
        "01 04 75736572 00",  # empty password
        "05 04 75736572 04 70617373",  # the client repeated the SOCKS version
        "02 04 75736572 04 70617373",
    ],
)
def test_userpass_request_rejections(wire: str) -> None:
    assert_rejects(decode_userpass_request, h(wire), None)


@pytest.mark.parametrize(
    ("username", "password"), [(b"", b"p"), (b"u", b""), (b"u" * 256, b"p"), (b"u", b"p" * 256)]
)
def test_userpass_request_encode_refuses_bad_lengths(username: bytes, password: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        UserPassRequest(username, password).encode()


@pytest.mark.parametrize(("wire", "success"), [("01 00", True), ("01 01", False)])
def test_userpass_reply_vectors(wire: str, success: bool) -> None:
    assert UserPassReply(success).encode() == h(wire)
    assert_decodes(decode_userpass_reply, h(wire), UserPassReply(success))


def test_userpass_reply_any_nonzero_status_is_failure() -> None:
    assert decode_userpass_reply(h("01 7f")) == (UserPassReply(False), 2)
    assert_rejects(decode_userpass_reply, h("05 00"), None)


# --- Requests and replies (RFC 1928 sections 4-6, profile 3) ---------------------------

REQUEST_VECTORS = [
    # VER CMD FLAG ATYP ADDR PORT
    ("05 01 00 01 c0000201 0050", Request(Command.CONNECT, V4, 80)),
    ("05 01 00 03 " + HEX_NAME + " 01bb", Request(Command.CONNECT, NAME, 443)),
    ("05 01 00 04 " + HEX_V6 + " 01bb", Request(Command.CONNECT, V6, 443)),
    ("05 09 00 08 00abcdef 0050", Request(Command.CONNECT_AA, AddressId(0xABCDEF), 80)),
    ("05 02 04 01 00000000 1f90", Request(Command.BIND, IPv4Address(0), 8080, flag=0x04)),
    ("05 0a 12 04 " + HEX_V6 + " 0000", Request(Command.BIND_AA, V6, 0, flag=0x12)),
    ("05 03 25 01 00000000 0000", Request(Command.UDP_ASSOCIATE, IPv4Address(0), 0, flag=0x25)),
    ("05 0b 00 03 01 30 0000", Request(Command.UDP_ASSOCIATE_AA, "0", 0)),
    # ADDRESS ASSOCIATE: DST.PORT is ADR.PREF; ID 0 is "unspecified".
    ("05 08 00 03 " + HEX_NAME + " 0001", Request(Command.ADDRESS_ASSOCIATE, NAME, 1)),
    ("05 08 10 08 00000000 ff08", Request(Command.ADDRESS_ASSOCIATE, AddressId(0), 0xFF08, 0x10)),
    ("05 01 ff 08 00ffffff ffff", Request(Command.CONNECT, AddressId(0xFFFFFF), 65535, 0xFF)),
]


@pytest.mark.parametrize(("wire", "message"), REQUEST_VECTORS)
def test_request_vectors(wire: str, message: Request) -> None:
    assert message.encode() == h(wire)
    assert_decodes(decode_request, h(wire), message)


def test_request_flag_and_command_are_typed() -> None:
    got = decode_request(h("05 0b 25 01 c0000201 0035"))
    assert got is not None
    request = got[0]
    assert request.command is Command.UDP_ASSOCIATE_AA
    assert request.command.base is Command.UDP_ASSOCIATE and request.command.with_aa
    assert request.flag == 0x25
    assert Command.ADDRESS_ASSOCIATE.base is Command.ADDRESS_ASSOCIATE
    assert not Command.ADDRESS_ASSOCIATE.with_aa


def test_unspecified_address_id() -> None:
    got = decode_request(h("05 0b 00 08 00000000 0000"))
    assert got is not None
    assert got[0].address == AddressId(0)
    assert isinstance(got[0].address, AddressId) and got[0].address.unspecified
    assert not AddressId(1).unspecified
    assert str(AddressId(0xABC)) == "id:000abc"


def test_name_of_255_octets_is_accepted() -> None:
    name = ".".join(["a" * 63] * 4)  # 255 octets
    wire = h("05 01 00 03 ff") + name.encode() + h("0050")
    assert Request(Command.CONNECT, name, 80).encode() == wire
    assert_decodes(decode_request, wire, Request(Command.CONNECT, name, 80))


@pytest.mark.parametrize(
    ("wire", "rep"),
    [
        # ATYP X'08' with CLASS != 0 is an invalid address.
        ("05 01 00 08 01000001 0050", Rep.INVALID_ADDRESS),
        ("05 01 00 08 ff000000 0050", Rep.INVALID_ADDRESS),
        # Names: empty, NUL, control, space, DEL, non-ASCII (UTF-8 "e acute").
        ("05 01 00 03 00 0050", Rep.INVALID_ADDRESS),
        ("05 01 00 03 03 610062 0050", Rep.INVALID_ADDRESS),
        ("05 01 00 03 03 610a62 0050", Rep.INVALID_ADDRESS),
        ("05 01 00 03 03 612062 0050", Rep.INVALID_ADDRESS),
        ("05 01 00 03 03 617f62 0050", Rep.INVALID_ADDRESS),
        ("05 01 00 03 04 61c3a962 0050", Rep.INVALID_ADDRESS),
        ("05 01 00 03 01 ff 0050", Rep.INVALID_ADDRESS),
        # Unknown ATYP: its length is unknowable, so the first four octets decide.
        ("05 01 00 02", Rep.ADDRESS_TYPE_NOT_SUPPORTED),
        ("05 01 00 00 c0000201 0050", Rep.ADDRESS_TYPE_NOT_SUPPORTED),
        ("05 01 00 05 c0000201 0050", Rep.ADDRESS_TYPE_NOT_SUPPORTED),
        ("05 01 00 ff", Rep.ADDRESS_TYPE_NOT_SUPPORTED),
        ("05 47 00 06", Rep.ADDRESS_TYPE_NOT_SUPPORTED),  # bad CMD and ATYP: ATYP first
        # Unknown commands, once the whole request is there.
        ("05 00 00 01 c0000201 0050", Rep.COMMAND_NOT_SUPPORTED),
        ("05 04 00 01 c0000201 0050", Rep.COMMAND_NOT_SUPPORTED),
        ("05 07 00 03 " + HEX_NAME + " 0050", Rep.COMMAND_NOT_SUPPORTED),
        ("05 0c 00 04 " + HEX_V6 + " 0050", Rep.COMMAND_NOT_SUPPORTED),
        ("05 ff 00 08 00000001 0050", Rep.COMMAND_NOT_SUPPORTED),
        # A request that does not start with X'05'.
        ("04 01 00 01 c0000201 0050", Rep.GENERAL_FAILURE),
    ],
)
def test_request_rejections_carry_the_reply_code(wire: str, rep: Rep) -> None:
    assert_rejects(decode_request, h(wire), rep)


@pytest.mark.parametrize(
    "wire",
    ["05 07 00 01 c0000201 00", "05 07 00 03 0b 6578616d", "05 ff 00 04 2001", "05 07 00"],
)
def test_unknown_command_waits_for_the_whole_request(wire: str) -> None:
    assert decode_request(h(wire)) is None


def test_class_is_checked_only_once_the_id_is_whole() -> None:
    assert decode_request(h("05 01 00 08 01 0000")) is None


REPLY_VECTORS = [
    # VER REP FLAG ATYP ADDR PORT
    ("05 00 00 01 c0000201 1f90", Reply(Rep.SUCCEEDED, V4, 8080)),
    ("05 00 10 04 " + HEX_V6 + " 0035", Reply(Rep.SUCCEEDED, V6, 53, flag=0x10)),
    ("05 00 00 03 " + HEX_NAME + " 0000", Reply(Rep.SUCCEEDED, NAME, 0)),
    ("05 00 00 08 00123456 0000", Reply(Rep.SUCCEEDED, AddressId(0x123456))),
    ("05 00 20 08 00000000 0000", Reply(Rep.SUCCEEDED, AddressId(0), flag=0x20)),
    ("05 01 00 01 00000000 0000", Reply(Rep.GENERAL_FAILURE)),
    ("05 07 00 01 00000000 0000", Reply(Rep.COMMAND_NOT_SUPPORTED)),
    ("05 08 00 01 00000000 0000", Reply(Rep.ADDRESS_TYPE_NOT_SUPPORTED)),
    ("05 09 00 01 00000000 0000", Reply(Rep.INVALID_ADDRESS)),
]


@pytest.mark.parametrize(("wire", "message"), REPLY_VECTORS)
def test_reply_vectors(wire: str, message: Reply) -> None:
    assert message.encode() == h(wire)
    assert_decodes(decode_reply, h(wire), message)


@pytest.mark.parametrize(
    ("wire", "rep"),
    [
        ("05 0a 00 01 00000000 0000", None),  # unassigned reply code
        ("04 00 00 01 00000000 0000", None),
        ("05 00 00 02", Rep.ADDRESS_TYPE_NOT_SUPPORTED),
        ("05 00 00 08 02000000 0000", Rep.INVALID_ADDRESS),
    ],
)
def test_reply_rejections(wire: str, rep: Rep | None) -> None:
    assert_rejects(decode_reply, h(wire), rep)


@pytest.mark.parametrize(
    ("address", "port"),
    [
        ("", 80),
        ("a" * 256, 80),
        ("bad name", 80),
        ("a\x00b", 80),
        ("ex\u00e4mple.com", 80),  # non-ASCII: the caller must punycode it
        (V4, -1),
        (V4, 65536),
    ],
)
def test_request_encode_refuses_unencodable_addresses(
    address: str | IPv4Address, port: int
) -> None:
    with pytest.raises(LocalProtocolError):
        Request(Command.CONNECT, address, port).encode()


@pytest.mark.parametrize(("realid", "cls"), [(-1, 0), (0x1000000, 0), (0, 256), (0, -1)])
def test_address_id_range_is_checked(realid: int, cls: int) -> None:
    with pytest.raises(LocalProtocolError):
        AddressId(realid, cls)


def test_atyp_of_each_address_kind() -> None:
    assert [atyp_of(a) for a in (V4, NAME, V6, AddressId(7))] == [
        Atyp.IPV4,
        Atyp.DOMAIN,
        Atyp.IPV6,
        Atyp.ADDRESS_ID,
    ]


# --- SOCKS 4 / 4a --------------------------------------------------------------------

SOCKS4_VECTORS = [
    # VN CD DSTPORT DSTIP USERID NUL [HOSTNAME NUL]
    ("04 01 0050 c0000201 66726564 00", Socks4Request(Socks4Command.CONNECT, 80, V4, b"fred")),
    ("04 02 1f90 c0000201 00", Socks4Request(Socks4Command.BIND, 8080, V4)),
    (
        "04 01 0050 00000001 00 6578616d706c652e636f6d 00",
        Socks4Request(Socks4Command.CONNECT, 80, NAME),
    ),
    (
        "04 01 01bb 00000001 66726564 00 6578616d706c652e636f6d 00",
        Socks4Request(Socks4Command.CONNECT, 443, NAME, b"fred"),
    ),
    ("04 01 0050 00000000 00", Socks4Request(Socks4Command.CONNECT, 80, IPv4Address(0))),
]


@pytest.mark.parametrize(("wire", "message"), SOCKS4_VECTORS)
def test_socks4_request_vectors(wire: str, message: Socks4Request) -> None:
    assert message.encode() == h(wire)
    assert_decodes(decode_socks4_request, h(wire), message)


def test_socks4a_any_0_0_0_x_marker_means_a_hostname() -> None:
    wire = h("04 01 0050 000000ff 00 6c6f63616c686f7374 00")
    assert decode_socks4_request(wire) == (
        Socks4Request(Socks4Command.CONNECT, 80, "localhost"),
        len(wire),
    )


def test_socks4_fields_of_255_octets_are_accepted() -> None:
    userid, name = b"u" * 255, "n" * 255
    wire = h("04 01 0050 00000001") + userid + b"\x00" + name.encode() + b"\x00"
    assert_decodes(
        decode_socks4_request, wire, Socks4Request(Socks4Command.CONNECT, 80, name, userid)
    )


@pytest.mark.parametrize(
    "wire",
    [
        "04 01 0050 c0000201" + "75" * 256,  # USERID of 256 octets, no NUL yet
        "04 01 0050 c0000201" + "75" * 256 + "00",
        "04 01 0050 00000001 00" + "6e" * 256,  # 4a hostname too long
        "04 01 0050 00000001 00 00",  # 4a empty hostname
        "04 01 0050 00000001 00 612062 00",  # 4a hostname with a space
        "04 01 0050 00000001 00 61c3a9 00",  # non-ASCII hostname
        "04 03 0050 c0000201 00",  # unknown command
        "04 00 0050 00000001 00 6100",
        "05 01 0050 c0000201 00",  # not version 4
    ],
)
def test_socks4_request_rejections(wire: str) -> None:
    assert_rejects(decode_socks4_request, h(wire), None)


def test_socks4_unknown_command_waits_for_the_whole_request() -> None:
    assert decode_socks4_request(h("04 03 0050 c0000201 7575")) is None
    assert decode_socks4_request(h("04 03 0050 00000001 00 6e6e")) is None


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ("00 5a 0000 00000000", Socks4Reply(Socks4Status.GRANTED)),
        ("00 5a 1f90 c0000201", Socks4Reply(Socks4Status.GRANTED, 8080, V4)),
        ("00 5b 0000 00000000", Socks4Reply(Socks4Status.REJECTED)),
        ("00 5c 0000 00000000", Socks4Reply(Socks4Status.NO_IDENTD)),
        ("00 5d 0000 00000000", Socks4Reply(Socks4Status.IDENTD_MISMATCH)),
    ],
)
def test_socks4_reply_vectors(wire: str, message: Socks4Reply) -> None:
    assert message.encode() == h(wire)
    assert_decodes(decode_socks4_reply, h(wire), message)


@pytest.mark.parametrize(
    "wire", ["04 5a 0000 00000000", "00 00 0000 00000000", "00 5e 0000 00000000"]
)
def test_socks4_reply_rejections(wire: str) -> None:
    assert_rejects(decode_socks4_reply, h(wire), None)


# --- UDP header, control channel and tunnel (RFC 1928 section 7, profile 7) ----------

UDP_VECTORS = [
    # FLAG(2) FRAG ATYP ADDR PORT DATA
    ("0000 00 01 c0000201 0035 68656c6c6f", UdpDatagram(V4, 53, b"hello")),
    ("0000 00 04 " + HEX_V6 + " 0035", UdpDatagram(V6, 53, b"")),
    ("0000 00 03 " + HEX_NAME + " 0035 00ff", UdpDatagram(NAME, 53, b"\x00\xff")),
    ("0000 00 08 00123456 1389 78", UdpDatagram(AddressId(0x123456), 5001, b"x")),
    ("0000 01 01 c0000201 0035 6869", UdpDatagram(V4, 53, b"hi", frag=1)),
    ("0000 81 01 c0000201 0035 6869", UdpDatagram(V4, 53, b"hi", frag=0x81)),  # last fragment
]


@pytest.mark.parametrize(("wire", "message"), UDP_VECTORS)
def test_udp_datagram_vectors(wire: str, message: UdpDatagram) -> None:
    assert message.encode() == h(wire)
    assert decode_udp_datagram(h(wire)) == message


@pytest.mark.parametrize(
    ("wire", "rep"),
    [
        ("", None),
        ("0000 00", None),
        ("0000 00 01 c000", None),  # truncated address
        ("0000 00 01 c0000201 00", None),  # truncated port
        ("0000 00 03 0b 6578", None),
        ("0000 00 03 00 0035", Rep.INVALID_ADDRESS),
        ("0000 00 08 01000001 0035", Rep.INVALID_ADDRESS),
        ("0000 00 07 c0000201 0035", Rep.ADDRESS_TYPE_NOT_SUPPORTED),
    ],
)
def test_udp_datagram_rejections(wire: str, rep: Rep | None) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_udp_datagram(h(wire))
    if rep is not None:
        assert caught.value.rep == rep


@pytest.mark.parametrize(
    ("atyp", "wire", "length"),
    [
        # RSV(2) FRAG ATYP ADDR PORT: the header is everything before DATA.
        (Atyp.IPV4, "0000 00 01 c0000201 0035 | 68656c6c6f", 10),
        (Atyp.IPV6, "0000 00 04 " + HEX_V6 + " 0035 |", 22),
        (Atyp.DOMAIN, "0000 00 03 " + HEX_NAME + " 0035 | 00ff", 7 + len(NAME)),
        (Atyp.DOMAIN, "0000 00 03 01 61 0035 | 6869", 8),
        (Atyp.ADDRESS_ID, "0000 00 08 00123456 1389 | 78", 10),  # CLASS(1) REALID(3)
    ],
)
def test_udp_header_length_per_atyp(atyp: Atyp, wire: str, length: int) -> None:
    header, data = (h(part) for part in wire.split("|"))
    raw = header + data
    assert raw[3] == atyp and len(header) == length
    assert udp_header_length(raw) == length
    assert udp_header_length(bytearray(raw)) == udp_header_length(memoryview(raw)) == length
    assert udp_header_length(raw) == len(raw) - len(decode_udp_datagram(raw).data)


@pytest.mark.parametrize(("wire", "message"), UDP_VECTORS)
def test_udp_header_length_agrees_with_the_vectors(wire: str, message: UdpDatagram) -> None:
    # Fragments too: the header's layout does not depend on FRAG.
    assert udp_header_length(h(wire)) == len(h(wire)) - len(message.data)


def test_udp_vectors_cover_every_atyp() -> None:
    assert {h(wire)[3] for wire, _ in UDP_VECTORS} == set(Atyp)


@pytest.mark.parametrize(
    "wire",
    [
        "",
        "0000 00",
        "0000 00 01",  # ATYP but nothing after it
        "0000 00 01 c0000201 00",  # one octet short
        "0000 00 04 " + HEX_V6,  # no port
        "0000 00 03 0b 6578",  # name cut short
        "0000 00 08 00123456",  # no port
        "0000 00 07 c0000201 0035",  # unknown ATYP
        "0000 00 02 c0000201 0035 6869",
    ],
)
def test_udp_header_length_cannot_tell(wire: str) -> None:
    assert udp_header_length(h(wire)) == 0


def test_udp_header_length_is_framing_only() -> None:
    # Like control_request_length: lengths from framing; validity is the decoder's job.
    assert udp_header_length(h("0000 00 03 00 0035")) == 7  # empty name, rejected on decode
    assert udp_header_length(h("0000 00 08 01000001 0035")) == 10  # CLASS 1, rejected too
    assert udp_header_length(h("ffff 00 01 c0000201 0035")) == 10  # RSV is not looked at


CONTROL_VECTORS = [
    # RSV SUB FLAG ATYP ADDR PORT
    ("00 01 00 01 c0000201 0035", ControlRequest(ControlSub.INTERFACE_DATA, V4, 53)),
    ("00 01 00 08 00000007 0035", ControlRequest(ControlSub.INTERFACE_DATA, AddressId(7), 53)),
    (
        "00 81 00 04 ff150000000000000000000000000001 1389",
        ControlRequest(ControlSub.MULTICAST_JOIN, IPv6Address("ff15::1"), 5001),
    ),
    (
        "00 82 01 01 ef000001 1389",
        ControlRequest(ControlSub.MULTICAST_LEAVE, IPv4Address("239.0.0.1"), 5001, flag=1),
    ),
    ("00 01 00 03 " + HEX_NAME + " 0035", ControlRequest(ControlSub.INTERFACE_DATA, NAME, 53)),
]


@pytest.mark.parametrize(("wire", "message"), CONTROL_VECTORS)
def test_control_request_vectors(wire: str, message: ControlRequest) -> None:
    assert message.encode() == h(wire)
    assert_decodes(decode_control_request, h(wire), message)


@pytest.mark.parametrize(
    ("wire", "rep"),
    [
        ("00 02 00 01 c0000201 0035", Rep.COMMAND_NOT_SUPPORTED),
        ("00 80 00 01 c0000201 0035", Rep.COMMAND_NOT_SUPPORTED),
        ("00 00 00 01 c0000201 0035", Rep.COMMAND_NOT_SUPPORTED),
        ("00 01 00 09", Rep.ADDRESS_TYPE_NOT_SUPPORTED),
        ("00 01 00 03 00 0035", Rep.INVALID_ADDRESS),
        ("05 01 00 01 c0000201 0035", None),  # RSV must be 0
    ],
)
def test_control_request_rejections(wire: str, rep: Rep | None) -> None:
    assert_rejects(decode_control_request, h(wire), rep)


def test_tunnel_frame_is_length_then_payload() -> None:
    datagram = UdpDatagram(V4, 53, b"hi")
    assert encode_tunnel_datagram(datagram) == h("000c 0000 00 01 c0000201 0035 6869")
    control = ControlRequest(ControlSub.INTERFACE_DATA, V4, 53)
    assert encode_tunnel_control(control) == h("000a 00 01 00 01 c0000201 0035")
    assert_decodes(decode_tunnel_frame, h("0004 deadbeef"), h("deadbeef"))


def test_tunnel_frame_of_the_largest_size() -> None:
    payload = bytes(0xFFFF)
    wire = encode_tunnel_frame(payload)
    assert wire[:2] == h("ffff")
    assert decode_tunnel_frame(wire + b"\x00") == (payload, 0x10001)
    assert decode_tunnel_frame(wire[:-1]) is None
    with pytest.raises(LocalProtocolError):
        encode_tunnel_frame(bytes(0x10000))


@pytest.mark.parametrize("wire", ["0000", "0003 000000", "0001 00"])
def test_tunnel_frame_shorter_than_a_header_is_rejected(wire: str) -> None:
    assert_rejects(decode_tunnel_frame, h(wire), None)


@pytest.mark.parametrize(
    ("payload", "control"),
    [
        ("0000 00 01 c0000201 0035", False),  # datagram: second octet is FLAG's low octet
        ("0100 00 01 c0000201 0035", False),
        ("00 01 00 01 c0000201 0035", True),  # control: second octet is SUB
        ("00 81 00 01 ef000001 1389", True),
        ("00", False),
        ("", False),
    ],
)
def test_control_and_datagram_told_apart_by_second_octet(payload: str, control: bool) -> None:
    assert is_control_payload(h(payload)) is control


# --- Encoders must refuse what decoders would reject (codec bugs) ----------------------


@pytest.mark.parametrize(
    "message",
    [
        Socks4Request(Socks4Command.CONNECT, 80, V4, b"a\x00b"),  # NUL ends USERID early
        Socks4Request(Socks4Command.CONNECT, 80, V4, b"u" * 256),
        Socks4Request(Socks4Command.CONNECT, 80, "n" * 256),
        Socks4Request(Socks4Command.CONNECT, 80, "bad name"),
        Socks4Request(Socks4Command.CONNECT, 80, ""),
        Socks4Request(Socks4Command.CONNECT, 80, IPv4Address("0.0.0.7")),  # reads as 4a
        Socks4Request(Socks4Command.CONNECT, 70000, V4),
        Socks4Reply(Socks4Status.GRANTED, 70000),
    ],
)
def test_socks4_encode_refuses_what_cannot_be_decoded(message: Socks4Request | Socks4Reply) -> None:
    with pytest.raises(LocalProtocolError):
        message.encode()


@pytest.mark.parametrize(
    "message",
    [
        Request(Command.CONNECT, V4, 80, flag=0x100),
        Reply(Rep.SUCCEEDED, V4, 80, flag=-1),
        ControlRequest(ControlSub.INTERFACE_DATA, V4, 53, flag=0x100),
        UdpDatagram(V4, 53, b"", frag=0x100),
        MethodSelection(0x100),
        Greeting((0x100,)),
    ],
)
def test_out_of_range_octets_raise_local_protocol_error(message: Any) -> None:
    with pytest.raises(LocalProtocolError):
        message.encode()
