"""Property tests of translator.wire (the h11 fuzz invariant, plus roundtrips).

1. Any bytes, in any chunking, fed to a ServerConnection whose owner answers every
   event legally, yield events or RemoteProtocolError and nothing else; a MessageRejected
   (one bad message in a UDP association) leaves the association usable.
2. ``decode(encode(message)) == message`` for every message type, and every strict
   prefix of an encoding decodes to None ("need more").
3. Every ``decode_*`` on any bytes returns None, a message, or raises RemoteProtocolError.
4. ``udp_header_length`` (the UDP relay's fast path) agrees with ``decode_udp_datagram``.

Profiles: the default is fast (the file runs in seconds); ``HYPOTHESIS_PROFILE=deep``
runs 20000 examples per test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from translator.wire import (
    FLAG_BIND_MULTI,
    FLAG_UDP_TUNNEL,
    NEED_DATA,
    PAUSED,
    Address,
    AddressId,
    Answer,
    Atyp,
    Command,
    ControlRequest,
    ControlSub,
    Greeting,
    MessageRejected,
    Method,
    MethodSelection,
    Phase,
    RemoteProtocolError,
    Rep,
    Reply,
    Request,
    ServerConnection,
    Socks4Command,
    Socks4Reply,
    Socks4Request,
    Socks4Status,
    Socks6Attempt,
    TunnelDatagram,
    UdpDatagram,
    UserPassReply,
    UserPassRequest,
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
    encode_tunnel_frame,
    successors,
    udp_header_length,
)

_COMMON: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("wire-fast", max_examples=300, **_COMMON)
settings.register_profile("deep", max_examples=20000, **_COMMON)
# Applied per test rather than loaded globally, so other suites keep their own settings.
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "wire-fast"))

EVENT_TYPES = (
    Greeting,
    UserPassRequest,
    Request,
    Socks4Request,
    ControlRequest,
    TunnelDatagram,
    Socks6Attempt,
)

# --- Strategies ----------------------------------------------------------------------

octet = st.integers(0, 0xFF)
port = st.integers(0, 0xFFFF)
name_octets = st.binary(min_size=1, max_size=255).map(
    lambda raw: bytes(0x21 + b % 0x5E for b in raw)  # printable ASCII, no space
)
domain = name_octets.map(lambda raw: raw.decode("ascii"))
address_id = st.integers(0, 0xFFFFFF).map(AddressId)
addresses: st.SearchStrategy[Address] = st.one_of(
    st.integers(0, 2**32 - 1).map(IPv4Address),
    st.integers(0, 2**128 - 1).map(IPv6Address),
    domain,
    address_id,
)
socks4_ip = st.integers(0, 2**32 - 1).filter(lambda n: not 0 < n < 256).map(IPv4Address)
no_nul = st.binary(max_size=255).map(lambda raw: raw.replace(b"\x00", b"\x01"))

requests = st.builds(Request, st.sampled_from(Command), addresses, port, octet)
replies = st.builds(Reply, st.sampled_from(Rep), addresses, port, octet)
control_requests = st.builds(ControlRequest, st.sampled_from(ControlSub), addresses, port, octet)
datagrams = st.builds(UdpDatagram, addresses, port, st.binary(max_size=64), octet)
socks4_requests = st.builds(
    Socks4Request, st.sampled_from(Socks4Command), port, st.one_of(socks4_ip, domain), no_nul
)

ROUNDTRIPS: list[tuple[st.SearchStrategy[Any], Callable[[bytes], Any]]] = [
    (st.lists(octet, min_size=1, max_size=255).map(lambda m: Greeting(tuple(m))), decode_greeting),
    (st.builds(MethodSelection, octet), decode_method_selection),
    (
        st.builds(
            UserPassRequest,
            st.binary(min_size=1, max_size=255),
            st.binary(min_size=1, max_size=255),
        ),
        decode_userpass_request,
    ),
    (st.builds(UserPassReply, st.booleans()), decode_userpass_reply),
    (requests, decode_request),
    (replies, decode_reply),
    (socks4_requests, decode_socks4_request),
    (
        st.builds(Socks4Reply, st.sampled_from(Socks4Status), port, socks4_ip),
        decode_socks4_reply,
    ),
    (control_requests, decode_control_request),
]

userpass = st.builds(UserPassRequest, st.binary(min_size=1, max_size=8), st.binary(min_size=1))
tunnel_frames = st.one_of(
    datagrams.map(lambda d: encode_tunnel_frame(d.encode())),
    control_requests.map(lambda r: encode_tunnel_frame(r.encode())),
)


@st.composite
def socks5_conversations(draw: st.DrawFn) -> bytes:
    """A plausible SOCKS 5 client: greeting, maybe RFC 1929, requests, then what fits."""
    method = draw(st.sampled_from([Method.NO_AUTH, Method.USERNAME_PASSWORD]))
    parts = [Greeting((method,)).encode()]
    if method == Method.USERNAME_PASSWORD:
        parts.append(draw(userpass).encode())
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        target = draw(addresses)
        parts.append(Request(Command.ADDRESS_ASSOCIATE, target, draw(port)).encode())
    final = draw(requests)
    parts.append(final.encode())
    if final.command.base is not Command.UDP_ASSOCIATE:
        later = st.binary(max_size=32)
    elif final.flag & FLAG_UDP_TUNNEL:
        later = tunnel_frames
    else:
        later = control_requests.map(lambda r: r.encode())
    parts += draw(st.lists(st.one_of(later, st.binary(max_size=8)), max_size=6))
    return b"".join(parts)


@st.composite
def client_streams(draw: st.DrawFn) -> bytes:
    """Random bytes, or a plausible conversation with a few octets overwritten."""
    kind = draw(st.sampled_from(["random", "socks5", "socks5", "socks5", "socks4"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "socks4":
        raw = draw(socks4_requests).encode() + draw(st.binary(max_size=32))
    else:
        raw = draw(socks5_conversations())
    stream = bytearray(raw)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        stream[draw(st.integers(0, len(stream) - 1))] = draw(octet)
    return bytes(stream)


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


# --- 1. The server never fails with anything but RemoteProtocolError -----------------

Draw = Callable[[st.SearchStrategy[Any]], Any]  # st.DataObject.draw


def _legal_then(phase: Phase, answer: Answer) -> list[Phase]:
    """The codec's own successors, in a fixed order (a frozenset's order is not)."""
    return sorted(successors(phase, answer), key=lambda p: p.value)


_LEGAL_THEN = _legal_then(Phase.REQUEST, Answer.REPLY_SUCCESS)
_LEGAL_THEN_SOCKS4 = _legal_then(Phase.SOCKS4_REQUEST, Answer.SOCKS4_GRANTED)


def _then_for(request: Request) -> list[Phase]:
    """What a gateway would pick after a successful reply to ``request``."""
    base = request.command.base
    if base is Command.ADDRESS_ASSOCIATE:
        return [Phase.REQUEST]
    if base is Command.BIND:
        return [Phase.HOLD if request.flag & FLAG_BIND_MULTI else Phase.BIND_WAIT]
    if base is Command.UDP_ASSOCIATE:
        return [Phase.TUNNEL if request.flag & FLAG_UDP_TUNNEL else Phase.UDP_CONTROL]
    return [Phase.RELAY]


def _answer(conn: ServerConnection, message: object, draw: Draw) -> bytes:
    """Answer ``message`` as a gateway legally could; mostly the way a real one would."""
    if isinstance(message, Socks6Attempt):
        return conn.send_socks6_mismatch()
    if isinstance(message, Greeting):
        choices = [*message.methods[:1] * 3, Method.NO_AUTH, Method.USERNAME_PASSWORD]
        method = draw(st.sampled_from([*choices, Method.NO_ACCEPTABLE]))
        if method not in (Method.NO_AUTH, Method.USERNAME_PASSWORD, Method.NO_ACCEPTABLE):
            method = Method.NO_ACCEPTABLE
        return conn.send_method(method)
    if isinstance(message, UserPassRequest):
        return conn.send_auth_result(draw(st.sampled_from([True, True, True, False])))
    if isinstance(message, Socks4Request):
        status = draw(st.sampled_from([Socks4Status.GRANTED] * 3 + list(Socks4Status)))
        then = draw(st.sampled_from(_LEGAL_THEN_SOCKS4))
        return conn.send_socks4_reply(Socks4Reply(status), then=then)
    if isinstance(message, TunnelDatagram):
        return b""
    rep = draw(st.sampled_from([Rep.SUCCEEDED] * 10 + list(Rep)))
    reply = Reply(rep, draw(addresses), draw(port), draw(octet))
    if isinstance(message, Request):
        then = draw(st.sampled_from(_then_for(message) * 12 + _LEGAL_THEN))
        return conn.send_reply(reply, then=then)
    return conn.send_reply(reply, then=conn.phase)  # a control request keeps its phase


def _second_bind_reply(conn: ServerConnection, draw: Draw) -> bytes:
    if conn.version == 4:
        status = draw(st.sampled_from(Socks4Status))
        return conn.send_socks4_reply(Socks4Reply(status), then=Phase.RELAY)
    return conn.send_reply(Reply(draw(st.sampled_from(Rep))), then=Phase.RELAY)


@PROFILE
@given(st.data())
def test_server_yields_only_events_or_remote_protocol_error(data: st.DataObject) -> None:
    stream = data.draw(client_streams(), label="stream")
    conn = ServerConnection()
    seen: list[str] = []  # event type names, for the statistics (--hypothesis-show-statistics)
    for chunk in data.draw(chunkings(stream), label="chunks"):
        conn.receive_data(chunk)
        while conn.phase not in (Phase.RELAY, Phase.HOLD, Phase.CLOSED):
            if conn.phase is Phase.BIND_WAIT:
                assert isinstance(_second_bind_reply(conn, data.draw), bytes)
                continue
            try:
                message = conn.next_event()
            except MessageRejected as exc:
                # One bad message in a UDP association: answer it if owed, go on.
                assert conn.phase in (Phase.UDP_CONTROL, Phase.TUNNEL)
                assert exc.rep is None or isinstance(exc.rep, Rep)
                if exc.answer_owed:
                    assert conn.next_event() is PAUSED
                    conn.send_reply(Reply(exc.rep or Rep.GENERAL_FAILURE))
                seen.append("rejected")
                continue
            except RemoteProtocolError as exc:
                assert exc.rep is None or isinstance(exc.rep, Rep)
                assert conn.phase in (Phase.CLOSED,)  # "in": mypy keeps the loop's narrowing
                assert isinstance(conn.send_error(exc.rep or Rep.GENERAL_FAILURE), bytes)
                event(f"error after {len(seen)} events: {exc.rep!r}")
                return
            if message is NEED_DATA:
                break
            assert message is not PAUSED, "every event was answered at once"
            assert isinstance(message, EVENT_TYPES)
            seen.append(type(message).__name__)
            assert isinstance(_answer(conn, message, data.draw), bytes)
    assert isinstance(conn.take_trailing_data(), bytes)
    event(f"ended in {conn.phase.name} after {len(seen)} events")


# --- 2. Roundtrips -------------------------------------------------------------------


@PROFILE
@given(st.data())
def test_every_message_roundtrips(data: st.DataObject) -> None:
    strategy, decode = data.draw(st.sampled_from(ROUNDTRIPS), label="type")
    message = data.draw(strategy, label="message")
    wire = message.encode()
    assert decode(wire) == (message, len(wire))
    assert decode(wire + data.draw(st.binary(max_size=8))) == (message, len(wire))
    cut = data.draw(st.integers(0, len(wire) - 1), label="cut")
    assert decode(wire[:cut]) is None


@PROFILE
@given(datagrams)
def test_udp_datagram_roundtrips(datagram: UdpDatagram) -> None:
    assert decode_udp_datagram(datagram.encode()) == datagram


@PROFILE
@given(st.binary(min_size=4, max_size=300), st.binary(max_size=8))
def test_tunnel_frame_roundtrips(payload: bytes, rest: bytes) -> None:
    wire = encode_tunnel_frame(payload)
    assert decode_tunnel_frame(wire + rest) == (payload, len(wire))
    assert decode_tunnel_frame(wire[:-1]) is None


# --- 3. Decoders on arbitrary bytes --------------------------------------------------

# Decoders whose accepted input is exactly what the encoder writes for the result.
CANONICAL: list[Callable[[bytes], Any]] = [
    decode_greeting,
    decode_method_selection,
    decode_userpass_request,
    decode_request,
    decode_reply,
    decode_socks4_reply,
    decode_control_request,
]
# Decoders that accept some spellings the encoder does not write (a 4a marker other than
# 0.0.0.1, any non-zero RFC 1929 status).
LENIENT: list[Callable[[bytes], Any]] = [decode_userpass_reply, decode_socks4_request]


@PROFILE
@given(st.sampled_from(CANONICAL + LENIENT), st.binary(max_size=600))
def test_decoders_return_none_a_message_or_remote_error(
    decode: Callable[[bytes], Any], raw: bytes
) -> None:
    try:
        got = decode(raw)
    except RemoteProtocolError as exc:
        assert exc.rep is None or isinstance(exc.rep, Rep)
        assert not isinstance(exc, MessageRejected)  # only the server raises that
        return
    if got is None:
        return
    message, used = got
    assert 0 < used <= len(raw)
    if decode in CANONICAL:
        assert message.encode() == raw[:used]


@PROFILE
@given(st.binary(max_size=600))
def test_udp_and_tunnel_decoders_on_random_bytes(raw: bytes) -> None:
    try:
        datagram = decode_udp_datagram(raw)
    except RemoteProtocolError:
        pass
    else:
        assert datagram.encode()[2:] == raw[2:]  # FLAG is not kept; the rest is
    try:
        frame = decode_tunnel_frame(raw)
    except RemoteProtocolError:
        return
    if frame is not None:
        assert encode_tunnel_frame(frame[0]) == raw[: frame[1]]


# --- 4. The relay's header length agrees with the decoder ----------------------------


@st.composite
def udp_payloads(draw: st.DrawFn) -> bytes:
    """Random bytes, or a datagram (mostly FRAG 0) whole, cut short or with a header
    octet overwritten."""
    kind = draw(st.sampled_from(["random", "whole", "whole", "cut", "mangled"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    unfragmented = st.builds(UdpDatagram, addresses, port, st.binary(max_size=64))
    wire = draw(st.one_of(unfragmented, unfragmented, datagrams)).encode()
    if kind == "cut":
        return wire[: draw(st.integers(0, len(wire)))]
    if kind == "mangled":
        mangled = bytearray(wire)
        mangled[draw(st.integers(0, min(len(wire), 9) - 1))] = draw(octet)
        return bytes(mangled)
    return wire


@PROFILE
@given(udp_payloads())
def test_udp_header_length_agrees_with_the_decoder(raw: bytes) -> None:
    length = udp_header_length(raw)
    assert 0 <= length <= len(raw)
    if len(raw) >= 4 and raw[3] not in set(Atyp):
        assert length == 0
    try:
        datagram = decode_udp_datagram(raw)
    except RemoteProtocolError:
        event("not decodable")
        return
    event("FRAG 0" if datagram.frag == 0 else "FRAG not 0")
    # The relay's fast path takes FRAG 0 only, but the layout does not depend on FRAG.
    assert length == len(raw) - len(datagram.data)
