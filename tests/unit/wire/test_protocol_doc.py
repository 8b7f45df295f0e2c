"""docs/protocol.md's byte examples, checked against the codec so the doc cannot drift.

Every ```socks-example block holds ``# title`` lines, then lines of the form
``kind: hex octets  # FIELD value, FIELD value, ...``. Each line is decoded with the
translator.wire decoder for its kind and encoded again (the bytes must round-trip), and
every FIELD in its note must match the decoded message; FLAG and FRAG, when not named,
must be 0. Each block is then read as a conversation: a reply must follow the rules the
doc states for the request it answers (failure form, FLAG echo, ADR.PREF, ID replies).
Finally the doc must show every command, ADR.PREF case, control SUB, reply code and line
kind, and its table of configuration defaults must match translator.config.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Any

import pytest

from translator.config import Config
from translator.wire import (
    FLAG_REAL_FAMILY,
    Address,
    AddressId,
    Atyp,
    Command,
    ControlRequest,
    ControlSub,
    Method,
    RemoteProtocolError,
    Rep,
    Reply,
    Request,
    ServerConnection,
    Socks4Command,
    Socks4Status,
    Socks6Attempt,
    UdpDatagram,
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
)

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"

_BLOCK = re.compile(r"^```socks-example\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_LINE = re.compile(
    r"^(?P<kind>[a-z0-9-]+):\s+(?P<hex>[0-9a-f]{2}(?: [0-9a-f]{2})*)\s*(?:#\s*(?P<note>.*))?$"
)
_NOTE_FIELD = re.compile(r"^(?P<key>[A-Z][A-Z.]*)(?: (?P<value>.+))?$")

# Addresses the doc may use: documentation ranges, loopback, unspecified, lab multicast.
_DOC_NETWORKS: list[IPv4Network | IPv6Network] = [
    IPv4Network("192.0.2.0/24"),
    IPv4Network("198.51.100.0/24"),
    IPv4Network("203.0.113.0/24"),
    IPv4Network("127.0.0.0/8"),
    IPv4Network("239.0.0.0/8"),
    IPv4Network("0.0.0.0/32"),
    IPv6Network("2001:db8::/32"),
    IPv6Network("::1/128"),
    IPv6Network("::/128"),
    IPv6Network("ff15::/16"),
]

# --- parsing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    kind: str
    wire: bytes
    note: dict[str, str]
    where: str  # "protocol.md:123", for failure messages


@dataclass(frozen=True)
class Example:
    title: str
    lines: tuple[Line, ...]
    where: str


def _parse_note(text: str | None, where: str) -> dict[str, str]:
    note: dict[str, str] = {}
    if not text:
        return note
    for part in text.split(", "):
        match = _NOTE_FIELD.match(part.strip())
        if match is None:
            raise ValueError(f"{where}: cannot read note field {part!r}")
        key = match["key"]
        if key in note:
            raise ValueError(f"{where}: {key} named twice")
        note[key] = match["value"] or ""
    return note


def parse_examples(text: str) -> list[Example]:
    """Every socks-example block of ``text``; malformed lines raise ValueError."""
    examples = []
    for block in _BLOCK.finditer(text):
        first_line = text.count("\n", 0, block.start(1)) + 1
        titles: list[str] = []
        lines: list[Line] = []
        for offset, raw in enumerate(block[1].splitlines()):
            where = f"{DOC.name}:{first_line + offset}"
            if raw.startswith("#"):
                titles.append(raw.lstrip("# ").strip())
                continue
            match = _LINE.match(raw.strip())
            if match is None:
                raise ValueError(f"{where}: not 'kind: hex  # note': {raw!r}")
            if match["kind"] not in DECODERS:
                raise ValueError(f"{where}: unknown line kind {match['kind']!r}")
            wire = bytes.fromhex(match["hex"])
            lines.append(Line(match["kind"], wire, _parse_note(match["note"], where), where))
        where = f"{DOC.name}:{first_line}"
        if not titles or not lines:
            raise ValueError(f"{where}: an example needs a '# title' line and byte lines")
        examples.append(Example(" ".join(titles), tuple(lines), where))
    return examples


# --- decoding one line --------------------------------------------------------------


@dataclass
class Decoded:
    """A decoded line: the message and, per note key, the renderings it may be given as."""

    message: Any
    fields: dict[str, tuple[str, ...]]
    required: set[str]
    addresses: list[Address] = field(default_factory=list)


def _hex(value: int, width: int = 2) -> str:
    return f"X'{value:0{width}X}'"


def _words(name: str) -> str:
    return name.replace("_AA", "+AA").replace("_", " ")


def _named(value: int, enum: Any) -> tuple[str, ...]:
    """``X'hh'`` alone or followed by the enum member's name in words."""
    try:
        name = enum(value).name
    except ValueError:
        return (_hex(value),)
    return (_hex(value), f"{_hex(value)} {_words(name)}")


def _decimal_named(value: int, enum: Any) -> tuple[str, ...]:
    return (str(value), f"{value} {_words(enum(value).name)}")


def _address_text(address: Address) -> str:
    if isinstance(address, AddressId):
        return f"ID {address.realid:06x}"
    return str(address)


def _address_fields(address: Address, port: int, port_key: str = "PORT") -> dict[str, Any]:
    port_text = _hex(port, 4) if port_key == "ADR.PREF" else str(port)
    return {
        "ATYP": (f"{_hex(atyp_of(address))} {_address_text(address)}",),
        port_key: (port_text,),
    }


def _whole(decoder: Callable[[bytes], Any], wire: bytes, where: str) -> Any:
    """Decode exactly one message filling the whole line."""
    got = decoder(wire)
    assert got is not None, f"{where}: incomplete message"
    message, used = got
    assert used == len(wire), f"{where}: {len(wire) - used} octets after the message"
    return message


def _greeting(wire: bytes, where: str) -> Decoded:
    message = _whole(decode_greeting, wire, where)
    methods = " ".join(_hex(method) for method in message.methods)
    return Decoded(message, {"METHODS": (methods,)}, {"METHODS"})


def _method(wire: bytes, where: str) -> Decoded:
    message = _whole(decode_method_selection, wire, where)
    return Decoded(message, {"METHOD": _named(message.method, Method)}, {"METHOD"})


def _auth_request(wire: bytes, where: str) -> Decoded:
    message = _whole(decode_userpass_request, wire, where)
    values: dict[str, tuple[str, ...]] = {
        "USER": (f'"{message.username.decode()}"',),
        "PASSWORD": (f'"{message.password.decode()}"',),
    }
    return Decoded(message, values, {"USER", "PASSWORD"})


def _auth_reply(wire: bytes, where: str) -> Decoded:
    message = _whole(decode_userpass_reply, wire, where)
    return Decoded(message, {"STATUS": (_hex(0 if message.success else 1),)}, {"STATUS"})


def _request(wire: bytes, where: str) -> Decoded:
    message = _whole(decode_request, wire, where)
    port_key = "ADR.PREF" if message.command == Command.ADDRESS_ASSOCIATE else "PORT"
    values = {
        "CMD": _named(message.command, Command),
        "FLAG": (_hex(message.flag),),
        **_address_fields(message.address, message.port, port_key),
    }
    return Decoded(message, values, {"CMD", "ATYP", port_key}, [message.address])


def _reply(wire: bytes, where: str) -> Decoded:
    message = _whole(decode_reply, wire, where)
    values = {
        "REP": _named(message.rep, Rep),
        "FLAG": (_hex(message.flag),),
        **_address_fields(message.address, message.port),
    }
    return Decoded(message, values, {"REP", "ATYP", "PORT"}, [message.address])


def _bad_request(wire: bytes, where: str) -> Decoded:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_request(wire)
    rep = caught.value.rep
    assert rep is not None, f"{where}: the codec closes without a reply here"
    values = {"REP": _named(rep, Rep), "CMD": (_hex(wire[1]),), "ATYP": (_hex(wire[3]),)}
    return Decoded(rep, values, {"REP"})


def _socks4_request(wire: bytes, where: str) -> Decoded:
    message = _whole(decode_socks4_request, wire, where)
    values: dict[str, tuple[str, ...]] = {
        "CD": _decimal_named(message.command, Socks4Command),
        "PORT": (str(message.port),),
        "USERID": (f'"{message.userid.decode()}"',),
    }
    address_key = "HOST" if isinstance(message.address, str) else "DSTIP"
    values[address_key] = (str(message.address),)
    return Decoded(message, values, {"CD", "PORT", "USERID", address_key}, [message.address])


def _socks4_reply(wire: bytes, where: str) -> Decoded:
    message = _whole(decode_socks4_reply, wire, where)
    values = {
        "CD": _decimal_named(message.status, Socks4Status),
        "PORT": (str(message.port),),
        "DSTIP": (str(message.address),),
    }
    return Decoded(message, values, {"CD", "PORT", "DSTIP"}, [message.address])


def _datagram_decoded(message: UdpDatagram) -> Decoded:
    values = {
        "FRAG": (str(message.frag),),
        "DATA": (f'"{message.data.decode()}"',),
        **_address_fields(message.address, message.port),
    }
    return Decoded(message, values, {"ATYP", "PORT", "DATA"}, [message.address])


def _udp(wire: bytes, where: str) -> Decoded:
    return _datagram_decoded(decode_udp_datagram(wire))


def _control(wire: bytes, where: str) -> Decoded:
    message = _whole(decode_control_request, wire, where)
    values = {
        "SUB": _named(message.sub, ControlSub),
        "FLAG": (_hex(message.flag),),
        **_address_fields(message.address, message.port),
    }
    return Decoded(message, values, {"SUB", "ATYP", "PORT"}, [message.address])


def _tunnel(wire: bytes, where: str) -> Decoded:
    """A frame: its payload is a reply (X'05'), a control request (SUB != 0) or a datagram."""
    payload = _whole(decode_tunnel_frame, wire, where)
    if payload[0] == 0x05:
        inner = _reply(payload, where)
        assert encode_tunnel_frame(inner.message.encode()) == wire, f"{where}: reply frame"
    elif is_control_payload(payload):
        inner = _control(payload, where)
        assert encode_tunnel_control(inner.message) == wire, f"{where}: control frame"
    else:
        inner = _udp(payload, where)
        assert encode_tunnel_datagram(inner.message) == wire, f"{where}: datagram frame"
    inner.fields["LEN"] = (str(len(payload)),)
    inner.required.add("LEN")
    return inner


def _socks6_reply(wire: bytes, where: str) -> Decoded:
    conn = ServerConnection()
    conn.receive_data(b"\x06")
    assert isinstance(conn.next_event(), Socks6Attempt)
    assert conn.send_socks6_mismatch() == wire, f"{where}: not the gateway's SOCKS 6 answer"
    return Decoded(wire, {"VER": (str(wire[0]),)}, {"VER"})


DECODERS: dict[str, Callable[[bytes, str], Decoded]] = {
    "greeting": _greeting,
    "method": _method,
    "auth-request": _auth_request,
    "auth-reply": _auth_reply,
    "request": _request,
    "reply": _reply,
    "bad-request": _bad_request,
    "socks4-request": _socks4_request,
    "socks4-reply": _socks4_reply,
    "udp": _udp,
    "control": _control,
    "tunnel": _tunnel,
    "socks6-reply": _socks6_reply,
}
_DEFAULTS = {"FLAG": "X'00'", "FRAG": "0"}
_NOT_ENCODED = {"bad-request", "socks6-reply", "tunnel"}  # checked in their decoders


def _norm(text: str) -> str:
    return " ".join(text.replace("/", " ").lower().split())


def decode_line(line: Line) -> Decoded:
    """Decode ``line``, check the round trip and its note; AssertionError on any mismatch."""
    decoded = DECODERS[line.kind](line.wire, line.where)
    if line.kind not in _NOT_ENCODED:
        assert decoded.message.encode() == line.wire, f"{line.where}: does not re-encode"
    missing = decoded.required - line.note.keys()
    assert not missing, f"{line.where}: the note must name {sorted(missing)}"
    for key in line.note.keys() - decoded.fields.keys():
        raise AssertionError(f"{line.where}: {key} does not belong to a {line.kind} line")
    for key, forms in decoded.fields.items():
        stated = line.note.get(key, _DEFAULTS.get(key))
        if stated is None:
            continue
        assert _norm(stated) in {_norm(form) for form in forms}, (
            f"{line.where}: note says {key} {stated}, the octets say {forms[-1]}"
        )
    for address in decoded.addresses:
        _assert_documentation_address(address, line.where)
    return decoded


def _assert_documentation_address(address: Address, where: str) -> None:
    if isinstance(address, AddressId):
        return
    if isinstance(address, str):
        name = address.lower()
        assert name.endswith((".example.test", ".lab.test")) or name == "lab.test", (
            f"{where}: {address} is not a documentation name"
        )
        return
    ip = ip_address(address)
    assert any(ip.version == net.version and ip in net for net in _DOC_NETWORKS), (
        f"{where}: {address} is not a documentation or loopback address"
    )


# --- conversations ------------------------------------------------------------------

_AA_PREF_ATYP = {0x00: Atyp.ADDRESS_ID, 0x08: Atyp.ADDRESS_ID, 0x01: Atyp.IPV4}
_AA_PREF_ATYP |= {0x04: Atyp.IPV6, 0x03: Atyp.DOMAIN}


def _failure_form(reply: Reply, where: str) -> None:
    assert reply.encode() == Reply(reply.rep).encode(), (
        f"{where}: a failure reply carries FLAG 0 and ATYP X'01' 0.0.0.0 port 0"
    )


def _check_success(request: Request, reply: Reply, client_version: int, where: str) -> None:
    assert reply.flag & ~request.flag == 0, f"{where}: echoes FLAG bits the client did not set"
    real_family = bool(request.flag & FLAG_REAL_FAMILY)
    if real_family:
        assert reply.flag & FLAG_REAL_FAMILY, f"{where}: FLAG X'10' is echoed when set"
    if request.command.with_aa:
        assert isinstance(reply.address, AddressId), f"{where}: +AA replies carry an ID"
    elif request.command == Command.ADDRESS_ASSOCIATE:
        assert reply.port == 0, f"{where}: ADDRESS ASSOCIATE replies have BND.PORT 0"
        if not real_family:
            wanted = _AA_PREF_ATYP[request.port & 0xFF]
            assert atyp_of(reply.address) == wanted, f"{where}: reply ATYP is not ADR.PREF's"
    else:  # plain CONNECT, BIND, UDP ASSOCIATE: never an ID, even when DST was one
        assert not isinstance(reply.address, AddressId), f"{where}: an ID in a plain reply"
    if request.command in (Command.CONNECT, Command.BIND) and not real_family:
        address = reply.address
        assert not isinstance(address, (AddressId, str)), f"{where}: BND is not an IP address"
        assert address.version == client_version, f"{where}: BND not in the client's family"


def check_conversation(example: Example) -> None:
    """Replies follow the doc's rules for the request, control or bad request they answer."""
    client_version = 6 if "IPv6 client" in example.title else 4
    asked: Any = None
    replies = 0
    for index, line in enumerate(example.lines):
        decoded = decode_line(line)
        if line.kind in ("request", "control", "bad-request"):
            asked, replies = (line.kind, decoded.message), 0
            continue
        if line.kind != "reply" or asked is None:
            continue
        reply: Reply = decoded.message
        replies += 1
        kind, message = asked
        if kind == "bad-request":
            assert reply.rep == message, f"{line.where}: not the REP the codec chose"
        if reply.rep != Rep.SUCCEEDED:
            _failure_form(reply, line.where)
            if kind != "control":
                assert index == len(example.lines) - 1, f"{line.where}: a failure ends it"
            continue
        if kind == "request":
            limit = 2 if message.command.base == Command.BIND else 1
            assert replies <= limit, f"{line.where}: one reply too many"
            _check_success(message, reply, client_version, line.where)


EXAMPLES = parse_examples(DOC.read_text(encoding="utf-8"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.where for example in EXAMPLES])
def test_example_matches_the_codec(example: Example) -> None:
    check_conversation(example)


# --- the doc shows everything, and its defaults are the code's ----------------------


def _all_decoded() -> Iterator[tuple[Line, Decoded]]:
    for example in EXAMPLES:
        for line in example.lines:
            yield line, decode_line(line)


def test_doc_shows_every_command_preference_sub_code_and_line_kind() -> None:
    kinds: set[str] = set()
    commands: set[Command] = set()
    preferences: set[int] = set()
    real_family_associate = False
    subs: set[ControlSub] = set()
    reps: set[Rep] = set()
    payloads: set[type] = set()
    for line, decoded in _all_decoded():
        kinds.add(line.kind)
        message = decoded.message
        if isinstance(message, Request):
            commands.add(message.command)
            if message.command == Command.ADDRESS_ASSOCIATE:
                if message.flag & FLAG_REAL_FAMILY:
                    real_family_associate = True
                else:
                    preferences.add(message.port & 0xFF)
        elif isinstance(message, ControlRequest):
            subs.add(message.sub)
        elif isinstance(message, Reply):
            reps.add(message.rep)
        if line.kind == "tunnel":
            payloads.add(type(message))
    assert kinds == set(DECODERS)
    assert commands == set(Command)
    assert preferences >= {0x00, 0x01, 0x03, 0x04, 0x08}
    assert real_family_associate
    assert subs == set(ControlSub)
    assert reps == set(Rep)
    assert payloads == {UdpDatagram, ControlRequest, Reply}


def test_checker_rejects_drifted_examples() -> None:
    """The checks above can fail: a wrong octet, note or reply rule is caught."""
    good = Line("reply", bytes.fromhex("05 00 00 08 00 3a 91 c4 00 00"), {}, "t:1")
    note = {"REP": "X'00'", "ATYP": "X'08' ID 3a91c4", "PORT": "0"}
    decode_line(Line(good.kind, good.wire, note, good.where))
    with pytest.raises(AssertionError):
        decode_line(Line(good.kind, good.wire, {**note, "REP": "X'09'"}, good.where))
    with pytest.raises(AssertionError):
        decode_line(Line(good.kind, good.wire, {**note, "ATYP": "X'08' ID 3a91c5"}, good.where))
    with pytest.raises(AssertionError):
        decode_line(Line(good.kind, good.wire, {**note, "FLAG": "X'10'"}, good.where))
    with pytest.raises(AssertionError):  # an extra octet after the message
        decode_line(Line(good.kind, good.wire + b"\x00", note, good.where))
    request = Line(
        "request",
        bytes.fromhex("05 08 00 01 cb 00 71 07 00 01"),
        {"CMD": "X'08'", "ATYP": "X'01' 203.0.113.7", "ADR.PREF": "X'0001'"},
        "t:2",
    )
    with pytest.raises(AssertionError, match=r"ADR\.PREF"):  # ID answered to ADR.PREF X'01'
        check_conversation(Example("t", (request, Line(good.kind, good.wire, note, "t:3")), "t"))
    outside = bytes.fromhex("00 00 00 01 08 08 08 08 00 35 70")  # a real, public address
    udp_note = {"ATYP": "X'01' 8.8.8.8", "PORT": "53", "DATA": '"p"'}
    with pytest.raises(AssertionError, match="documentation"):
        decode_line(Line("udp", outside, udp_note, "t:4"))
    with pytest.raises(ValueError, match="unknown line kind"):
        parse_examples("```socks-example\n# t\nreplies: 05 00\n```\n")


_CONFIG_ROW = re.compile(
    r"^\| `(?P<section>[a-z_]+)\.(?P<key>[a-z_0-9]+(?:\.[a-z_0-9]+)*)` \| (?P<value>[^|]+) \|$"
)


def _config_default(section: str, key: str) -> Any:
    value = getattr(Config(), section)
    for part in key.split("."):  # auth.gssapi.service: a section within a section
        value = getattr(value, part)
    return value


def test_configuration_defaults_in_the_doc_are_the_code_defaults() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = text.split("## Configuration keys referenced here", 1)[1]
    rows = [match for line in table.splitlines() if (match := _CONFIG_ROW.match(line))]
    assert len(rows) >= 10
    for row in rows:
        actual = _config_default(row["section"], row["key"])
        stated = row["value"].strip()
        if stated == "null":
            assert actual is None, f"{row['section']}.{row['key']} defaults to {actual!r}"
        elif isinstance(actual, str):
            assert stated == actual, f"{row['section']}.{row['key']} defaults to {actual!r}"
        else:
            assert float(stated) == actual, f"{row['section']}.{row['key']} defaults to {actual}"


def test_every_configuration_key_the_doc_names_exists() -> None:
    sections = {item.name for item in fields(Config)}
    named = re.findall(r"`([a-z_]+)\.([a-z_0-9]+)`", DOC.read_text(encoding="utf-8"))
    checked = [(section, key) for section, key in named if section in sections]
    assert len(checked) >= 10
    for section, key in checked:
        assert hasattr(getattr(Config(), section), key), f"`{section}.{key}` is not a config key"


def test_every_example_address_is_parsed_from_a_known_family() -> None:
    """Guard for the address check itself: it sees IPv4, IPv6, names and IDs."""
    seen: set[type] = set()
    for _line, decoded in _all_decoded():
        seen.update(type(address) for address in decoded.addresses)
    assert {IPv4Address, IPv6Address, str, AddressId} <= seen
