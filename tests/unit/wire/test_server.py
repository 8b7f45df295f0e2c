"""The server state machine of translator.wire: phases, answers, errors, and chunking.

Handshakes are fed whole, one byte at a time and in odd chunk sizes (the mitmproxy
way); the events, the bytes answered and the bytes left for the relay must not depend
on how the client's bytes were split.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

import pytest

from translator.wire import (
    NEED_DATA,
    PAUSED,
    TRANSITIONS,
    AddressId,
    Answer,
    Command,
    ControlRequest,
    ControlSub,
    Event,
    Greeting,
    LocalProtocolError,
    MessageRejected,
    Method,
    Phase,
    RemoteProtocolError,
    Rep,
    Reply,
    Request,
    ServerConnection,
    Signal,
    Socks4Command,
    Socks4Reply,
    Socks4Request,
    Socks4Status,
    Socks6Attempt,
    TunnelDatagram,
    UdpDatagram,
    UserPassRequest,
    successors,
)

V4 = IPv4Address("192.0.2.1")
V4_BND = IPv4Address("198.51.100.7")
V6 = IPv6Address("2001:db8::1")
OK_V4 = Reply(Rep.SUCCEEDED, V4_BND, 4321)
OK_V4_HEX = "05 00 00 01 c6336407 10e1"
ZERO_REPLY_HEX = "01 00000000 0000"  # ATYP ADDR PORT of an all-zero IPv4 BND


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def phase_of(conn: ServerConnection) -> Phase:
    """``conn.phase``, unnarrowed: mypy keeps an asserted attribute's type across calls."""
    return conn.phase


def at_request() -> ServerConnection:
    """A SOCKS 5 connection past method selection X'00'."""
    conn = ServerConnection()
    conn.receive_data(h("05 01 00"))
    assert conn.next_event() == Greeting((0,))
    assert conn.send_method(Method.NO_AUTH) == h("05 00")
    return conn


def with_request(wire: str) -> tuple[ServerConnection, object]:
    conn = at_request()
    conn.receive_data(h(wire))
    return conn, conn.next_event()


# --- A whole conversation, independent of chunking -----------------------------------


@dataclass
class Transcript:
    events: list[object] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)
    error: Rep | str | None = "none"  # rep of the RemoteProtocolError that closed us
    rejected: list[Rep | None] = field(default_factory=list)  # MessageRejected reps
    phase: Phase = Phase.VERSION
    trailing: bytes = b""


Answerer = Callable[[ServerConnection, object], bytes]


def comparable(event: object) -> object:
    return ("tunnel", event.datagram) if isinstance(event, TunnelDatagram) else event


def converse(client: bytes, answer: Answerer, chunk: int | None) -> Transcript:
    """Feed ``client`` in chunks of ``chunk`` octets (None: whole), answering every event."""
    conn = ServerConnection()
    out = Transcript()
    step = chunk or max(len(client), 1)
    pieces = [client[i : i + step] for i in range(0, len(client), step)]
    for piece in pieces:
        conn.receive_data(piece)
        while conn.phase not in (Phase.RELAY, Phase.CLOSED, Phase.HOLD, Phase.BIND_WAIT):
            try:
                event = conn.next_event()
            except MessageRejected as exc:
                out.rejected.append(exc.rep)
                if exc.answer_owed:
                    out.sent += conn.send_reply(Reply(exc.rep or Rep.GENERAL_FAILURE))
                continue
            except RemoteProtocolError as exc:
                out.error = exc.rep
                break
            if event is NEED_DATA:
                break
            assert event is not PAUSED, "every event is answered at once"
            out.events.append(comparable(event))
            out.sent += answer(conn, event)
    out.phase = conn.phase
    if conn.phase is not Phase.CLOSED:  # what a closed connection buffered is never used
        out.trailing = conn.take_trailing_data()
    return out


def gateway(conn: ServerConnection, event: object) -> bytes:
    """A gateway that accepts everything, as a real one would answer on success."""
    if isinstance(event, Greeting):
        method = Method.USERNAME_PASSWORD if Method.USERNAME_PASSWORD in event.methods else 0
        return conn.send_method(method)
    if isinstance(event, UserPassRequest):
        return conn.send_auth_result(event.username == b"user" and event.password == b"pass")
    if isinstance(event, Request):
        if event.command is Command.ADDRESS_ASSOCIATE:
            return conn.send_reply(Reply(Rep.SUCCEEDED, AddressId(0x123456)), then=Phase.REQUEST)
        base = event.command.base
        if base is Command.UDP_ASSOCIATE:
            then = Phase.TUNNEL if event.flag & 0x20 else Phase.UDP_CONTROL
            return conn.send_reply(Reply(Rep.SUCCEEDED, flag=event.flag & 0x20), then=then)
        if base is Command.BIND:
            return conn.send_reply(OK_V4, then=Phase.BIND_WAIT)
        return conn.send_reply(OK_V4, then=Phase.RELAY)
    if isinstance(event, ControlRequest):
        return conn.send_reply(Reply(Rep.SUCCEEDED, V4_BND, 53), then=conn.phase)
    if isinstance(event, Socks4Request):
        return conn.send_socks4_reply(Socks4Reply(Socks4Status.GRANTED), then=Phase.RELAY)
    if isinstance(event, Socks6Attempt):
        return conn.send_socks6_mismatch()
    assert isinstance(event, TunnelDatagram)
    return b""


SCENARIOS = {
    "noauth-connect-ipv4-pipelined": "05 01 00  05 01 00 01 c0000201 0050  474554",
    "userpass-connect-name": "05 02 00 02  01 04 75736572 04 70617373"
    "  05 01 00 03 0b 6578616d706c652e636f6d 01bb  1603",
    "userpass-refused": "05 01 02  01 04 75736572 04 6e6f7065  05 01",
    "associate-then-connect-by-id": "05 01 00  05 08 00 01 c0000201 0008"
    "  05 09 00 08 00123456 0050  ff",
    "udp-control": "05 01 00  05 03 01 01 00000000 0000"
    "  00 01 00 01 c0000201 0035  00 81 00 04 ff150000000000000000000000000001 1389",
    "udp-tunnel": "05 01 00  05 03 20 01 00000000 0000  000c 0000 00 01 c0000201 0035 6869"
    "  000a 00 01 00 01 c0000201 0035  000a 0000 00 08 00000007 0000",
    "bind": "05 01 00  05 02 00 04 " + "20010db8000000000000000000000001" + " 0000  6869",
    "socks4": "04 01 0050 c0000201 66726564 00  474554",
    "socks4a": "04 01 0050 00000001 00 6578616d706c652e636f6d 00",
    "socks6": "06 00 01",
    "unknown-command": "05 01 00  05 07 00 01 c0000201 0050",
    "bad-id-class": "05 01 00  05 01 00 08 01000001 0050",
    "empty-name": "05 01 00  05 01 00 03 00 0050",
    "unknown-atyp": "05 01 00  05 01 00 02 c0000201 0050",
    "unknown-version": "47 45 54 20",
    "udp-unknown-sub": "05 01 00  05 03 01 01 00000000 0000  00 05 00 01 c0000201 0035"
    "  00 01 00 03 00 0035  00 01 00 01 c0000201 0035",
    "udp-unknown-atyp": "05 01 00  05 03 01 01 00000000 0000  00 01 00 07 c0000201 0035",
    "tunnel-bad-messages": "05 01 00  05 03 20 01 00000000 0000  0008 0000 00 01 c0000201"
    "  000a 00 05 00 01 c0000201 0035  000a 0000 00 01 c0000201 0035  0002 0000",
}


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_chunking_does_not_change_the_conversation(name: str, chunk: int) -> None:
    client = h(SCENARIOS[name])
    whole = converse(client, gateway, None)
    assert converse(client, gateway, chunk) == whole


def test_transcripts_of_the_scenarios() -> None:
    """The whole-feed transcripts themselves, so the comparison above compares something."""
    got = {name: converse(h(wire), gateway, 1) for name, wire in SCENARIOS.items()}
    assert got["noauth-connect-ipv4-pipelined"].sent == h("05 00" + OK_V4_HEX)
    assert got["noauth-connect-ipv4-pipelined"].trailing == b"GET"
    assert got["noauth-connect-ipv4-pipelined"].phase is Phase.RELAY
    assert got["userpass-connect-name"].events[1] == UserPassRequest(b"user", b"pass")
    assert got["userpass-connect-name"].sent == h("05 02  01 00" + OK_V4_HEX)
    assert got["userpass-connect-name"].trailing == h("1603")
    assert got["userpass-refused"].sent == h("05 02  01 01")
    assert got["userpass-refused"].phase is Phase.CLOSED
    assert got["associate-then-connect-by-id"].events[1:] == [
        Request(Command.ADDRESS_ASSOCIATE, V4, 8),
        Request(Command.CONNECT_AA, AddressId(0x123456), 80),
    ]
    assert got["associate-then-connect-by-id"].sent == h(
        "05 00  05 00 00 08 00123456 0000" + OK_V4_HEX
    )
    assert got["udp-control"].events[2:] == [
        ControlRequest(ControlSub.INTERFACE_DATA, V4, 53),
        ControlRequest(ControlSub.MULTICAST_JOIN, IPv6Address("ff15::1"), 5001),
    ]
    assert got["udp-control"].phase is Phase.UDP_CONTROL
    assert got["udp-tunnel"].events[2:] == [
        ("tunnel", UdpDatagram(V4, 53, b"hi")),
        ControlRequest(ControlSub.INTERFACE_DATA, V4, 53),
        ("tunnel", UdpDatagram(AddressId(7), 0, b"")),
    ]
    assert got["bind"].phase is Phase.BIND_WAIT
    assert got["bind"].trailing == b"hi"
    assert got["socks4"].events == [Socks4Request(Socks4Command.CONNECT, 80, V4, b"fred")]
    assert got["socks4"].sent == h("00 5a 0000 00000000")
    assert got["socks4a"].events == [Socks4Request(Socks4Command.CONNECT, 80, "example.com")]
    assert got["socks6"].sent == h("06")
    assert got["socks6"].phase is Phase.CLOSED
    assert got["unknown-command"].error == Rep.COMMAND_NOT_SUPPORTED
    assert got["bad-id-class"].error == Rep.INVALID_ADDRESS
    assert got["empty-name"].error == Rep.INVALID_ADDRESS
    assert got["unknown-atyp"].error == Rep.ADDRESS_TYPE_NOT_SUPPORTED
    assert got["unknown-version"].error is None
    # A bad control request is answered and the association lives on (MessageRejected).
    assert got["udp-unknown-sub"].rejected == [Rep.COMMAND_NOT_SUPPORTED, Rep.INVALID_ADDRESS]
    assert got["udp-unknown-sub"].sent == h(
        "05 00  05 00 00 01 00000000 0000  05 07 00"
        + ZERO_REPLY_HEX
        + " 05 09 00"
        + ZERO_REPLY_HEX
        + " 05 00 00 01 c6336407 0035"
    )
    assert got["udp-unknown-sub"].phase is Phase.UDP_CONTROL
    # An unknown ATYP has no length: the stream cannot be resynchronised.
    assert got["udp-unknown-atyp"].error == Rep.ADDRESS_TYPE_NOT_SUPPORTED
    # Tunnel: a bad datagram is dropped, a bad control request answered, a bad frame fatal.
    assert got["tunnel-bad-messages"].rejected == [None, Rep.COMMAND_NOT_SUPPORTED]
    assert got["tunnel-bad-messages"].events[-1] == ("tunnel", UdpDatagram(V4, 53, b""))
    assert got["tunnel-bad-messages"].error is None
    for transcript in got.values():
        if transcript.error != "none":
            assert transcript.phase is Phase.CLOSED


# --- Phase transitions ---------------------------------------------------------------


def test_nothing_received_needs_data() -> None:
    conn = ServerConnection()
    assert conn.next_event() is NEED_DATA
    assert conn.phase is Phase.VERSION and conn.version is None


def test_greeting_then_paused_until_answered() -> None:
    conn = ServerConnection()
    conn.receive_data(h("05 02 00 02  01 04 75736572"))
    assert conn.next_event() == Greeting((0x00, 0x02))
    assert conn.phase is Phase.GREETING and conn.version == 5
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED
    assert conn.send_method(Method.USERNAME_PASSWORD) == h("05 02")
    assert phase_of(conn) is Phase.AUTH
    assert conn.next_event() is NEED_DATA  # the auth request is still incomplete


@pytest.mark.parametrize(
    ("method", "wire", "phase"),
    [
        (Method.NO_AUTH, "05 00", Phase.REQUEST),
        (Method.USERNAME_PASSWORD, "05 02", Phase.AUTH),
        (Method.NO_ACCEPTABLE, "05 ff", Phase.CLOSED),
    ],
)
def test_method_selection_phases(method: Method, wire: str, phase: Phase) -> None:
    conn = ServerConnection()
    conn.receive_data(h("05 01 00"))
    conn.next_event()
    assert conn.send_method(method) == h(wire)
    assert conn.phase is phase


@pytest.mark.parametrize(
    ("success", "wire", "phase"), [(True, "01 00", Phase.REQUEST), (False, "01 01", Phase.CLOSED)]
)
def test_auth_result_phases(success: bool, wire: str, phase: Phase) -> None:
    conn = ServerConnection()
    conn.receive_data(h("05 01 02  01 01 75 01 70"))
    conn.next_event()
    conn.send_method(Method.USERNAME_PASSWORD)
    assert conn.next_event() == UserPassRequest(b"u", b"p")
    assert conn.next_event() is PAUSED
    assert conn.send_auth_result(success) == h(wire)
    assert conn.phase is phase


@pytest.mark.parametrize(
    "client",
    [
        "05 00",  # NMETHODS=0
        "05 01 02  01 00 01 70",  # empty user name
        "05 01 02  01 01 75 00",  # empty password
        "05 01 02  05 01 75 01 70",  # wrong sub-negotiation version
    ],
)
def test_broken_greeting_or_auth_closes_without_reply_code(client: str) -> None:
    transcript = converse(h(client), gateway, None)
    assert transcript.error is None
    assert transcript.phase is Phase.CLOSED


def test_address_associate_keeps_the_request_phase() -> None:
    conn, event = with_request("05 08 00 03 0b 6578616d706c652e636f6d 0000")
    assert event == Request(Command.ADDRESS_ASSOCIATE, "example.com", 0)
    assert conn.next_event() is PAUSED
    reply = Reply(Rep.SUCCEEDED, AddressId(0xABCDEF))
    assert conn.send_reply(reply, then=Phase.REQUEST) == h("05 00 00 08 00abcdef 0000")
    assert conn.phase is Phase.REQUEST
    assert conn.next_event() is NEED_DATA
    conn.receive_data(h("05 01 00 08 00abcdef 0050"))
    assert conn.next_event() == Request(Command.CONNECT, AddressId(0xABCDEF), 80)


def test_connect_hands_over_pipelined_bytes() -> None:
    conn, event = with_request("05 01 00 01 c0000201 0050  474554202f")
    assert event == Request(Command.CONNECT, V4, 80)
    conn.receive_data(b" HTTP/1.0")
    assert conn.send_reply(OK_V4, then=Phase.RELAY) == h(OK_V4_HEX)
    assert conn.phase is Phase.RELAY
    assert conn.take_trailing_data() == b"GET / HTTP/1.0"
    assert conn.take_trailing_data() == b""


def test_bind_sends_two_replies_through_bind_wait() -> None:
    conn, event = with_request("05 02 04 01 00000000 1f90")
    assert event == Request(Command.BIND, IPv4Address(0), 8080, flag=0x04)
    listening = Reply(Rep.SUCCEEDED, V4_BND, 8080, flag=0x04)
    assert conn.send_reply(listening, then=Phase.BIND_WAIT) == h("05 00 04 01 c6336407 1f90")
    assert conn.phase is Phase.BIND_WAIT
    conn.receive_data(b"early")  # buffered, not parsed, until the peer connects
    assert conn.next_event() in (NEED_DATA, PAUSED)
    peer = Reply(Rep.SUCCEEDED, IPv4Address("203.0.113.9"), 40000)
    assert conn.send_reply(peer, then=Phase.RELAY) == h("05 00 00 01 cb007109 9c40")
    assert phase_of(conn) is Phase.RELAY
    assert conn.take_trailing_data() == b"early"
    with pytest.raises(LocalProtocolError):
        conn.send_reply(peer, then=Phase.RELAY)


def test_bind_second_reply_failure_closes() -> None:
    conn, _ = with_request("05 0a 00 04 20010db8000000000000000000000001 0000")
    conn.send_reply(Reply(Rep.SUCCEEDED, AddressId(5), 8080), then=Phase.BIND_WAIT)
    assert conn.send_reply(Reply(Rep.TTL_EXPIRED)) == h("05 06 00" + ZERO_REPLY_HEX)
    assert conn.phase is Phase.CLOSED


def test_bind_multi_holds() -> None:
    conn, _ = with_request("05 02 02 01 00000000 0000")
    conn.send_reply(OK_V4, then=Phase.HOLD)
    conn.receive_data(h("05 01 00 01"))
    assert conn.phase is Phase.HOLD
    assert conn.next_event() in (NEED_DATA, PAUSED)  # nothing more is parsed


def test_udp_associate_control_channel() -> None:
    conn, _ = with_request("05 03 01 01 00000000 0000")
    assert conn.send_reply(Reply(Rep.SUCCEEDED, V4_BND, 4321, 0x01), then=Phase.UDP_CONTROL) == h(
        "05 00 01 01 c6336407 10e1"
    )
    conn.receive_data(h("00 01 00 01 c0000201 0035  00 82 00 01 ef000001 1389"))
    assert conn.next_event() == ControlRequest(ControlSub.INTERFACE_DATA, V4, 53)
    assert conn.next_event() is PAUSED
    answer = conn.send_reply(Reply(Rep.SUCCEEDED, V4_BND, 53), then=Phase.UDP_CONTROL)
    assert answer == h("05 00 00 01 c6336407 0035")
    assert conn.next_event() == ControlRequest(
        ControlSub.MULTICAST_LEAVE, IPv4Address("239.0.0.1"), 5001
    )
    # A refused control request answers that request; the association lives on.
    assert conn.send_reply(Reply(Rep.NOT_ALLOWED)) == h("05 02 00" + ZERO_REPLY_HEX)
    assert conn.phase is Phase.UDP_CONTROL
    with pytest.raises(LocalProtocolError):
        conn.send_reply(OK_V4, then=Phase.RELAY)  # nothing owed; RELAY not reachable anyway


def test_udp_control_success_cannot_leave_the_association() -> None:
    conn, _ = with_request("05 03 01 01 00000000 0000")
    conn.send_reply(OK_V4, then=Phase.UDP_CONTROL)
    conn.receive_data(h("00 01 00 01 c0000201 0035"))
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send_reply(OK_V4, then=Phase.RELAY)


def test_udp_control_bad_request_is_answered_and_the_association_lives_on() -> None:
    conn, _ = with_request("05 03 01 01 00000000 0000")
    conn.send_reply(OK_V4, then=Phase.UDP_CONTROL)
    conn.receive_data(h("00 03 00 01 c0000201 0035  00 01 00 01 c0000201 0035"))
    with pytest.raises(MessageRejected) as caught:
        conn.next_event()
    assert caught.value.rep == Rep.COMMAND_NOT_SUPPORTED and caught.value.answer_owed
    assert conn.phase is Phase.UDP_CONTROL
    assert conn.next_event() is PAUSED
    assert conn.send_reply(Reply(Rep.COMMAND_NOT_SUPPORTED)) == h("05 07 00" + ZERO_REPLY_HEX)
    assert conn.next_event() == ControlRequest(ControlSub.INTERFACE_DATA, V4, 53)


@pytest.mark.parametrize(
    ("request_", "rep"),
    [
        ("00 82 00 01 ef000001", None),  # cut short: waits
        ("07 01 00 01 c0000201 0035", None),  # RSV != 0
        ("00 00 00 01 c0000201 0035", Rep.COMMAND_NOT_SUPPORTED),
        ("00 01 00 03 00 0035", Rep.INVALID_ADDRESS),
        ("00 01 00 03 02 0a0d 0035", Rep.INVALID_ADDRESS),
        ("00 01 00 08 01000001 0035", Rep.INVALID_ADDRESS),
    ],
)
def test_udp_control_rejections(request_: str, rep: Rep | None) -> None:
    conn, _ = with_request("05 03 01 01 00000000 0000")
    conn.send_reply(OK_V4, then=Phase.UDP_CONTROL)
    conn.receive_data(h(request_))
    if request_.startswith("00 82"):
        assert conn.next_event() is NEED_DATA
        return
    with pytest.raises(MessageRejected) as caught:
        conn.next_event()
    assert caught.value.rep == rep and caught.value.answer_owed
    assert conn.phase is Phase.UDP_CONTROL and conn.next_event() is PAUSED


def test_udp_control_unknown_atyp_is_fatal() -> None:
    conn, _ = with_request("05 03 01 01 00000000 0000")
    conn.send_reply(OK_V4, then=Phase.UDP_CONTROL)
    conn.receive_data(h("00 01 00 05 c0000201 0035"))
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert not isinstance(caught.value, MessageRejected)
    assert caught.value.rep == Rep.ADDRESS_TYPE_NOT_SUPPORTED
    assert conn.phase is Phase.CLOSED
    assert conn.send_error(Rep.ADDRESS_TYPE_NOT_SUPPORTED) == h("05 08 00" + ZERO_REPLY_HEX)


def test_udp_tunnel_frames() -> None:
    conn, _ = with_request("05 03 20 01 00000000 0000")
    reply = conn.send_reply(Reply(Rep.SUCCEEDED, flag=0x20), then=Phase.TUNNEL)
    assert reply == h("05 00 20" + ZERO_REPLY_HEX)
    conn.receive_data(h("000c 0000 00 01 c0000201 0035 6869  000a 00 01 00 01"))
    event = conn.next_event()
    assert isinstance(event, TunnelDatagram)
    assert event.datagram == UdpDatagram(V4, 53, b"hi")
    assert conn.next_event() is NEED_DATA  # datagrams owe no answer; the frame is partial
    conn.receive_data(h("c0000201 0035  0008 0000 00 01 c0000201"))
    assert conn.next_event() == ControlRequest(ControlSub.INTERFACE_DATA, V4, 53)
    assert conn.next_event() is PAUSED
    conn.send_reply(Reply(Rep.SUCCEEDED, V4_BND, 53), then=Phase.TUNNEL)
    with pytest.raises(MessageRejected) as caught:  # datagram whose header is cut short
        conn.next_event()
    assert not caught.value.answer_owed  # dropped, nothing to answer
    assert conn.phase is Phase.TUNNEL and conn.next_event() is NEED_DATA


@pytest.mark.parametrize(
    ("frame", "rep", "answer_owed"),
    [
        ("000b 00 01 00 01 c0000201 0035 ff", Rep.GENERAL_FAILURE, True),  # trailing octet
        ("0009 00 01 00 01 c0000201 00", Rep.GENERAL_FAILURE, True),  # cut short
        ("000a 00 05 00 01 c0000201 0035", Rep.COMMAND_NOT_SUPPORTED, True),  # unknown SUB
        ("000a 07 01 00 01 c0000201 0035", None, True),  # control request with RSV != 0
        ("000a 00 01 00 07 c0000201 0035", Rep.ADDRESS_TYPE_NOT_SUPPORTED, True),
        ("000a 0000 00 07 c0000201 0035", Rep.ADDRESS_TYPE_NOT_SUPPORTED, False),  # datagram
        ("0007 0000 00 03 00 0035", Rep.INVALID_ADDRESS, False),
    ],
)
def test_bad_tunnel_messages_are_rejected_one_by_one(
    frame: str, rep: Rep | None, answer_owed: bool
) -> None:
    conn, _ = with_request("05 0b 20 01 00000000 0000")
    conn.send_reply(Reply(Rep.SUCCEEDED, AddressId(0), flag=0x20), then=Phase.TUNNEL)
    conn.receive_data(h(frame + " 000a 0000"))
    with pytest.raises(MessageRejected) as caught:
        conn.next_event()
    assert (caught.value.rep, caught.value.answer_owed) == (rep, answer_owed)
    assert conn.phase is Phase.TUNNEL
    if answer_owed:
        assert conn.next_event() is PAUSED
        conn.send_reply(Reply(rep or Rep.GENERAL_FAILURE))
    assert conn.next_event() is NEED_DATA  # the next frame is still incomplete


@pytest.mark.parametrize("frame", ["0000", "0003 000000", "0002 0000"])
def test_tunnel_frame_shorter_than_a_header_closes(frame: str) -> None:
    conn, _ = with_request("05 0b 20 01 00000000 0000")
    conn.send_reply(Reply(Rep.SUCCEEDED, AddressId(0), flag=0x20), then=Phase.TUNNEL)
    conn.receive_data(h(frame))
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert not isinstance(caught.value, MessageRejected)
    assert conn.phase is Phase.CLOSED


def test_socks4_connect_to_relay_and_rejection() -> None:
    conn = ServerConnection()
    conn.receive_data(h("04 01 0050 c0000201 00  6869"))
    assert conn.next_event() == Socks4Request(Socks4Command.CONNECT, 80, V4)
    assert conn.phase is Phase.SOCKS4_REQUEST and conn.version == 4
    assert conn.next_event() is PAUSED
    granted = Socks4Reply(Socks4Status.GRANTED, 80, V4)
    assert conn.send_socks4_reply(granted, then=Phase.RELAY) == h("00 5a 0050 c0000201")
    assert conn.take_trailing_data() == b"hi"
    refused = ServerConnection()
    refused.receive_data(h("04 01 0050 c0000201 00"))
    refused.next_event()
    assert refused.send_socks4_reply(Socks4Reply(Socks4Status.REJECTED)) == h("00 5b 0000 00000000")
    assert refused.phase is Phase.CLOSED


def test_socks4_bind_two_replies() -> None:
    conn = ServerConnection()
    conn.receive_data(h("04 02 0000 c0000201 00"))
    assert conn.next_event() == Socks4Request(Socks4Command.BIND, 0, V4)
    first = Socks4Reply(Socks4Status.GRANTED, 8080, V4_BND)
    assert conn.send_socks4_reply(first, then=Phase.BIND_WAIT) == h("00 5a 1f90 c6336407")
    second = Socks4Reply(Socks4Status.GRANTED, 40000, V4)
    assert conn.send_socks4_reply(second, then=Phase.RELAY) == h("00 5a 9c40 c0000201")
    assert conn.phase is Phase.RELAY


def test_socks6_gets_one_octet_and_close() -> None:
    conn = ServerConnection()
    conn.receive_data(h("06 00"))
    assert conn.next_event() == Socks6Attempt()
    assert conn.next_event() is PAUSED
    assert conn.send_socks6_mismatch() == h("06")
    assert conn.phase is Phase.CLOSED
    conn.receive_data(b"more")
    assert b"more" not in conn.take_trailing_data()  # bytes after CLOSED are dropped


@pytest.mark.parametrize("first", [0x00, 0x01, 0x03, 0x07, 0x16, 0x47, 0xFF])
def test_unknown_version_is_an_error_without_reply(first: int) -> None:
    conn = ServerConnection()
    conn.receive_data(bytes((first, 1, 0)))
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.rep is None
    assert conn.phase is Phase.CLOSED
    assert conn.send_error(Rep.GENERAL_FAILURE) == b""


@pytest.mark.parametrize("rep", [Rep.GENERAL_FAILURE, Rep.CONNECTION_REFUSED, Rep.INVALID_ADDRESS])
def test_failure_reply_closes(rep: Rep) -> None:
    conn, _ = with_request("05 01 00 01 c0000201 0050  474554")
    assert conn.send_reply(Reply(rep)) == bytes((5, rep, 0)) + h(ZERO_REPLY_HEX)
    assert conn.phase is Phase.CLOSED
    assert conn.next_event() in (NEED_DATA, PAUSED)
    with pytest.raises(LocalProtocolError):
        conn.send_reply(OK_V4, then=Phase.RELAY)


# --- Answering out of turn -----------------------------------------------------------


def _fresh() -> ServerConnection:
    return ServerConnection()


def _greeted() -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(h("05 01 00"))
    conn.next_event()
    return conn


def _requested() -> ServerConnection:
    return with_request("05 01 00 01 c0000201 0050")[0]


OUT_OF_TURN: list[
    tuple[str, Callable[[], ServerConnection], Callable[[ServerConnection], bytes]]
] = [
    ("method before greeting", _fresh, lambda c: c.send_method(Method.NO_AUTH)),
    ("reply before request", _fresh, lambda c: c.send_reply(OK_V4, then=Phase.RELAY)),
    ("reply to greeting", _greeted, lambda c: c.send_reply(OK_V4, then=Phase.RELAY)),
    ("auth result without auth", _greeted, lambda c: c.send_auth_result(True)),
    ("socks6 mismatch to socks5", _greeted, lambda c: c.send_socks6_mismatch()),
    ("method not implemented", _greeted, lambda c: c.send_method(0x80)),
    ("method twice", at_request, lambda c: c.send_method(Method.NO_AUTH)),
    ("reply with nothing owed", at_request, lambda c: c.send_reply(OK_V4, then=Phase.RELAY)),
    ("success without then", _requested, lambda c: c.send_reply(OK_V4)),
    ("success to illegal phase", _requested, lambda c: c.send_reply(OK_V4, then=Phase.AUTH)),
    ("success to closed", _requested, lambda c: c.send_reply(OK_V4, then=Phase.CLOSED)),
    (
        "socks4 reply to socks5",
        _requested,
        lambda c: c.send_socks4_reply(Socks4Reply(Socks4Status.GRANTED), then=Phase.RELAY),
    ),
]


@pytest.mark.parametrize(
    ("make", "misuse"), [case[1:] for case in OUT_OF_TURN], ids=[c[0] for c in OUT_OF_TURN]
)
def test_answering_out_of_turn(
    make: Callable[[], ServerConnection], misuse: Callable[[ServerConnection], bytes]
) -> None:
    with pytest.raises(LocalProtocolError):
        misuse(make())


def test_socks4_success_needs_a_legal_then() -> None:
    conn = ServerConnection()
    conn.receive_data(h("04 01 0050 c0000201 00"))
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send_socks4_reply(Socks4Reply(Socks4Status.GRANTED), then=Phase.UDP_CONTROL)


@pytest.mark.parametrize(
    ("make", "misuse"),
    [
        (_greeted, lambda c: c.send_method(0x80)),
        (_requested, lambda c: c.send_reply(OK_V4)),
        (_requested, lambda c: c.send_reply(OK_V4, then=Phase.AUTH)),
    ],
)
def test_rejected_answer_leaves_the_answer_owed(
    make: Callable[[], ServerConnection], misuse: Callable[[ServerConnection], bytes]
) -> None:
    conn = make()
    with pytest.raises(LocalProtocolError):
        misuse(conn)
    assert conn.next_event() is PAUSED


@pytest.mark.parametrize("version", [4, 5])
def test_bind_second_reply_must_match_the_version(version: int) -> None:
    conn = ServerConnection()
    if version == 5:
        conn = with_request("05 02 00 01 c0000201 0000")[0]
        conn.send_reply(OK_V4, then=Phase.BIND_WAIT)
        with pytest.raises(LocalProtocolError):
            conn.send_socks4_reply(Socks4Reply(Socks4Status.GRANTED), then=Phase.RELAY)
    else:
        conn.receive_data(h("04 02 0000 c0000201 00"))
        conn.next_event()
        conn.send_socks4_reply(Socks4Reply(Socks4Status.GRANTED), then=Phase.BIND_WAIT)
        with pytest.raises(LocalProtocolError):
            conn.send_reply(OK_V4, then=Phase.RELAY)


# --- send_error ----------------------------------------------------------------------


def _bind_wait5() -> ServerConnection:
    conn = _requested()
    conn.send_reply(OK_V4, then=Phase.BIND_WAIT)
    return conn


def _udp_control() -> ServerConnection:
    conn = with_request("05 03 01 01 00000000 0000")[0]
    conn.send_reply(OK_V4, then=Phase.UDP_CONTROL)
    conn.receive_data(h("00 01 00 01 c0000201 0035"))
    conn.next_event()
    return conn


def _tunnel_idle() -> ServerConnection:
    conn = with_request("05 03 20 01 00000000 0000")[0]
    conn.send_reply(OK_V4, then=Phase.TUNNEL)
    return conn


def _socks4() -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(h("04 02 0000 c0000201 00"))
    conn.next_event()
    return conn


def _socks4_bind_wait() -> ServerConnection:
    conn = _socks4()
    conn.send_socks4_reply(Socks4Reply(Socks4Status.GRANTED), then=Phase.BIND_WAIT)
    return conn


def _socks6() -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(h("06"))
    conn.next_event()
    return conn


def _relay() -> ServerConnection:
    conn = _requested()
    conn.send_reply(OK_V4, then=Phase.RELAY)
    return conn


SEND_ERROR_CASES: list[tuple[str, Callable[[], ServerConnection], Rep, str]] = [
    ("nothing read", _fresh, Rep.GENERAL_FAILURE, ""),
    ("socks5 greeting", _greeted, Rep.GENERAL_FAILURE, "05 ff"),
    ("socks5 request", _requested, Rep.HOST_UNREACHABLE, "05 04 00" + ZERO_REPLY_HEX),
    ("socks5 request after method", at_request, Rep.GENERAL_FAILURE, "05 01 00" + ZERO_REPLY_HEX),
    ("socks5 bind wait", _bind_wait5, Rep.TTL_EXPIRED, "05 06 00" + ZERO_REPLY_HEX),
    ("udp control", _udp_control, Rep.NOT_ALLOWED, "05 02 00" + ZERO_REPLY_HEX),
    ("socks4 request", _socks4, Rep.CONNECTION_REFUSED, "00 5b 0000 00000000"),
    ("socks4 bind wait", _socks4_bind_wait, Rep.GENERAL_FAILURE, "00 5b 0000 00000000"),
    ("socks6", _socks6, Rep.GENERAL_FAILURE, ""),
    ("relay", _relay, Rep.GENERAL_FAILURE, ""),
]


@pytest.mark.parametrize(
    ("make", "rep", "wire"), [c[1:] for c in SEND_ERROR_CASES], ids=[c[0] for c in SEND_ERROR_CASES]
)
def test_send_error_bytes_per_version_and_phase(
    make: Callable[[], ServerConnection], rep: Rep, wire: str
) -> None:
    conn = make()
    assert conn.send_error(rep) == h(wire)
    assert conn.phase is Phase.CLOSED
    assert conn.next_event() is not PAUSED


def test_send_error_in_auth_is_an_rfc1929_failure() -> None:
    conn = _greeted()
    conn.receive_data(h("01 01 75 01 70"))
    conn.send_method(Method.USERNAME_PASSWORD)
    conn.next_event()
    assert conn.send_error(Rep.GENERAL_FAILURE) == h("01 01")


@pytest.mark.parametrize(
    ("client", "wire"),
    [
        ("05 01 00  05 07 00 01 c0000201 0050", "05 07 00" + ZERO_REPLY_HEX),
        ("05 01 00  05 01 00 02", "05 08 00" + ZERO_REPLY_HEX),
        ("05 01 00  05 01 00 08 01000001 0050", "05 09 00" + ZERO_REPLY_HEX),
        ("05 01 00  05 01 00 03 03 610062 0050", "05 09 00" + ZERO_REPLY_HEX),
        ("04 03 0050 c0000201 00", "00 5b 0000 00000000"),
        ("05 00", "05 ff"),
    ],
)
def test_send_error_after_a_remote_protocol_error(client: str, wire: str) -> None:
    conn = ServerConnection()
    conn.receive_data(h(client))
    with pytest.raises(RemoteProtocolError) as caught:
        while conn.next_event() is not NEED_DATA:
            conn.send_method(Method.NO_AUTH)
    rep = caught.value.rep
    assert conn.send_error(rep if rep is not None else Rep.GENERAL_FAILURE) == h(wire)


def test_tunnel_replies_are_framed() -> None:
    # Profile 7: on a tunnel every message is a frame; a reply is told apart from a
    # datagram by its first payload octet X'05'. Unframed, a reply would be read as a
    # frame header of length X'05xx'.
    conn = _tunnel_idle()
    conn.receive_data(h("000a 00 01 00 01 c0000201 0035"))
    conn.next_event()
    answer = conn.send_reply(Reply(Rep.SUCCEEDED, V4_BND, 53), then=Phase.TUNNEL)
    assert answer == h("000a 05 00 00 01 c6336407 0035")


@pytest.mark.parametrize("frame", ["0002 0000", None])
def test_send_error_in_a_tunnel_is_framed(frame: str | None) -> None:
    conn = _tunnel_idle()
    if frame is not None:  # a fatal framing error, else the gateway's own failure
        conn.receive_data(h(frame))
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
    assert conn.send_error(Rep.GENERAL_FAILURE) == h("000a 05 01 00" + ZERO_REPLY_HEX)


# --- Bounded buffering ---------------------------------------------------------------


@pytest.mark.parametrize(
    "client",
    [
        "04 01 0050 c0000201" + "41" * 300,  # USERID without NUL
        "04 01 0050 00000001 00" + "41" * 300,  # 4a hostname without NUL
        "05 01 00  05 01 00 03 ff" + "00" * 300,  # NULs as a name
    ],
)
def test_oversized_garbage_fails_early_even_byte_by_byte(client: str) -> None:
    wire = h(client)
    conn = ServerConnection()
    for fed in range(1, len(wire) + 1):
        conn.receive_data(wire[fed - 1 : fed])
        try:
            event = conn.next_event()
        except RemoteProtocolError:
            break
        if event is not NEED_DATA:
            gateway(conn, event)
    else:
        pytest.fail("garbage was buffered to the end")
    assert fed <= 270  # a header plus one 255-octet field, not the whole garbage
    assert conn.phase is Phase.CLOSED


def test_garbage_megabyte_is_refused_at_once() -> None:
    conn = ServerConnection()
    conn.receive_data(h("04 01 0050 c0000201") + b"A" * (1 << 20))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.phase is Phase.CLOSED


@pytest.mark.parametrize("phase", [Phase.BIND_WAIT, Phase.HOLD])
def test_waiting_phases_do_not_invite_unbounded_data(phase: Phase) -> None:
    conn = _requested()
    conn.send_reply(OK_V4, then=phase)
    try:
        conn.receive_data(b"A" * ((1 << 16) + 1))
        event = conn.next_event()
    except RemoteProtocolError:
        return
    assert event is not NEED_DATA


# --- next_event()'s signals ----------------------------------------------------------


def test_signals_are_members_of_a_public_enum() -> None:
    assert set(Signal) == {NEED_DATA, PAUSED}
    assert NEED_DATA is Signal.NEED_DATA and PAUSED is Signal.PAUSED
    assert (repr(NEED_DATA), repr(PAUSED)) == ("NEED_DATA", "PAUSED")
    assert copy.deepcopy(NEED_DATA) is NEED_DATA
    assert pickle.loads(pickle.dumps(PAUSED)) is PAUSED


def _event_or_none(conn: ServerConnection) -> Event | None:
    """Narrowed by ``isinstance`` (and mypy agrees): no ``type: ignore`` needed."""
    event = conn.next_event()
    if isinstance(event, Signal):
        return None
    return event


def _event_or_none_by_identity(conn: ServerConnection) -> Event | None:
    event = conn.next_event()
    if event is PAUSED or event is NEED_DATA:
        return None
    return event


@pytest.mark.parametrize("narrow", [_event_or_none, _event_or_none_by_identity])
def test_signals_narrow_next_events_type(
    narrow: Callable[[ServerConnection], Event | None],
) -> None:
    conn = ServerConnection()
    assert narrow(conn) is None  # NEED_DATA
    conn.receive_data(h("05 01 00"))
    assert narrow(conn) == Greeting((0,))
    assert narrow(conn) is None  # PAUSED


# --- The transition table, walked ----------------------------------------------------


def _authing() -> ServerConnection:
    conn = _greeted()
    conn.send_method(Method.USERNAME_PASSWORD)
    conn.receive_data(h("01 01 75 01 70"))
    conn.next_event()
    return conn


def _gss_context() -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(h("05 01 01"))
    conn.next_event()
    conn.send_method(Method.GSSAPI)
    conn.receive_data(h("01 01 0002 6170"))
    conn.next_event()
    return conn


def _gss_level() -> ServerConnection:
    conn = _gss_context()
    conn.send_gss_token(b"", then=Phase.GSSAPI_LEVEL)
    conn.receive_data(h("01 02 0001 02"))
    conn.next_event()
    return conn


def _tunnel_owing() -> ServerConnection:
    conn = _tunnel_idle()
    conn.receive_data(h("000a 00 01 00 01 c0000201 0035"))
    conn.next_event()
    return conn


def _udp_idle() -> ServerConnection:
    conn = _udp_control()
    conn.send_reply(Reply(Rep.SUCCEEDED, V4_BND, 53))
    return conn


def _hold() -> ServerConnection:
    conn = _requested()
    conn.send_reply(OK_V4, then=Phase.HOLD)
    return conn


def _closed() -> ServerConnection:
    conn = _requested()
    conn.send_reply(Reply(Rep.GENERAL_FAILURE))
    return conn


# A connection owing an answer in each phase (BIND_WAIT: BIND's second reply), per version.
OWING = [
    _socks6,
    _greeted,
    _authing,
    _gss_context,
    _gss_level,
    _requested,
    _bind_wait5,
    _udp_control,
    _tunnel_owing,
    _socks4,
    _socks4_bind_wait,
]
OWING_NOTHING = [_fresh, at_request, _relay, _hold, _udp_idle, _tunnel_idle, _closed]
Send = Callable[[ServerConnection, Phase | None], bytes]
SENDERS: dict[Answer, Send] = {
    Answer.SOCKS6_MISMATCH: lambda c, then: c.send_socks6_mismatch(),
    Answer.METHOD_NO_AUTH: lambda c, then: c.send_method(Method.NO_AUTH),
    Answer.METHOD_USERNAME_PASSWORD: lambda c, then: c.send_method(Method.USERNAME_PASSWORD),
    Answer.METHOD_NO_ACCEPTABLE: lambda c, then: c.send_method(Method.NO_ACCEPTABLE),
    Answer.METHOD_GSSAPI: lambda c, then: c.send_method(Method.GSSAPI),
    Answer.GSS_TOKEN: lambda c, then: c.send_gss_token(b"t", then=then),
    Answer.GSS_LEVEL: lambda c, then: c.send_gss_level(b"l"),
    Answer.GSS_ABORT: lambda c, then: c.send_gss_abort(),
    Answer.AUTH_SUCCESS: lambda c, then: c.send_auth_result(True),
    Answer.AUTH_FAILURE: lambda c, then: c.send_auth_result(False),
    Answer.REPLY_SUCCESS: lambda c, then: c.send_reply(OK_V4, then=then),
    Answer.REPLY_FAILURE: lambda c, then: c.send_reply(Reply(Rep.HOST_UNREACHABLE), then=then),
    Answer.SOCKS4_GRANTED: lambda c, then: c.send_socks4_reply(
        Socks4Reply(Socks4Status.GRANTED), then=then
    ),
    Answer.SOCKS4_REJECTED: lambda c, then: c.send_socks4_reply(
        Socks4Reply(Socks4Status.REJECTED), then=then
    ),
}
# The answers whose successor the caller picks with then=; the others ignore it.
CALLER_PICKS = {Answer.REPLY_SUCCESS, Answer.SOCKS4_GRANTED, Answer.GSS_TOKEN}


def _owing(phase: Phase, version: int) -> ServerConnection:
    for make in OWING:
        conn = make()
        if (conn.phase, conn.version) == (phase, version):
            return conn
    raise AssertionError(f"no connection owes an answer in {phase.name}, SOCKS {version}")


def _legal(conn: ServerConnection) -> list[Answer]:
    return [a for a in Answer if successors(conn.phase, a) and a.version == conn.version]


def _state(conn: ServerConnection) -> tuple[Phase, int | None, object]:
    """All a caller can see without changing anything: next_event() is PAUSED when owed."""
    return conn.phase, conn.version, conn.next_event()


def _ordered(phases: frozenset[Phase]) -> list[Phase]:
    return sorted(phases, key=lambda phase: phase.value)


TABLE_WALK = [
    (phase, answer, following)
    for (phase, answer), nexts in TRANSITIONS.items()
    for following in _ordered(nexts)
]


def test_the_table_and_its_reader_agree() -> None:
    assert {answer for _, answer in TRANSITIONS} == set(Answer)  # every answer has a use
    assert set(SENDERS) == set(Answer)
    for (phase, answer), nexts in TRANSITIONS.items():
        assert successors(phase, answer) == nexts and nexts
    assert successors(Phase.RELAY, Answer.REPLY_SUCCESS) == frozenset()
    assert successors(Phase.GREETING, Answer.AUTH_SUCCESS) == frozenset()
    with pytest.raises(TypeError):
        TRANSITIONS[Phase.RELAY, Answer.REPLY_SUCCESS] = frozenset()  # type: ignore[index]


@pytest.mark.parametrize(
    ("phase", "answer", "following"),
    TABLE_WALK,
    ids=[f"{p.name}-{a.name}-{f.name}" for p, a, f in TABLE_WALK],
)
def test_every_transition_is_reachable_and_leads_where_the_table_says(
    phase: Phase, answer: Answer, following: Phase
) -> None:
    thens: list[Phase | None] = [following]
    if len(successors(phase, answer)) == 1:
        thens.append(None)  # the only successor is taken without then=
    for then in thens:
        conn = _owing(phase, answer.version)
        assert answer in _legal(conn)
        assert isinstance(SENDERS[answer](conn, then), bytes)
        assert phase_of(conn) is following


@pytest.mark.parametrize("make", OWING, ids=[make.__name__ for make in OWING])
def test_an_answer_not_in_the_table_changes_nothing(make: Callable[[], ServerConnection]) -> None:
    conn = make()
    legal = _legal(conn)
    assert legal, "every owing connection has some legal answer"
    before = _state(conn)
    for answer in Answer:
        if answer in legal:
            continue
        for then in [None, *Phase]:
            with pytest.raises(LocalProtocolError):
                SENDERS[answer](conn, then)
            assert _state(conn) == before, (answer, then)
    # A then= the table does not allow is refused just the same.
    for answer in legal:
        if answer not in CALLER_PICKS:
            continue
        nexts = successors(conn.phase, answer)
        for then in [*(p for p in Phase if p not in nexts), *([None] if len(nexts) > 1 else [])]:
            with pytest.raises(LocalProtocolError):
                SENDERS[answer](conn, then)
            assert _state(conn) == before, (answer, then)
    # And the machine still takes a legal answer where the table says.
    answer = legal[0]
    following = _ordered(successors(conn.phase, answer))[0]
    SENDERS[answer](conn, following)
    assert phase_of(conn) is following


@pytest.mark.parametrize("make", OWING_NOTHING, ids=[make.__name__ for make in OWING_NOTHING])
def test_with_nothing_owed_every_answer_is_refused(make: Callable[[], ServerConnection]) -> None:
    conn = make()
    before = _state(conn)
    assert before[2] is not PAUSED
    for answer in Answer:
        with pytest.raises(LocalProtocolError):
            SENDERS[answer](conn, Phase.RELAY)
        assert _state(conn) == before, answer


@pytest.mark.parametrize("then", [None, *Phase])
def test_a_failure_ignores_then(then: Phase | None) -> None:
    # A failure's successor is the protocol's, so callers may pass their success plan.
    conn = _requested()
    conn.send_reply(Reply(Rep.CONNECTION_REFUSED), then=then)
    assert conn.phase is Phase.CLOSED
    conn = _socks4_bind_wait()
    conn.send_socks4_reply(Socks4Reply(Socks4Status.REJECTED), then=then)
    assert conn.phase is Phase.CLOSED
