"""RFC 1961 framing and the server machine's GSS-API phases (pure: no Kerberos)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from translator.wire import (
    Deframer,
    Greeting,
    GssContextToken,
    GssProtectionRequest,
    GssType,
    LocalProtocolError,
    Method,
    Phase,
    RemoteProtocolError,
    Rep,
    ServerConnection,
    Signal,
    decapsulate_datagram,
    decode_gss_message,
    encapsulate,
    encode_gss_message,
)
from translator.wire.gssapi import ABORT


def test_messages_are_version_type_length_token() -> None:
    assert encode_gss_message(GssType.AUTHENTICATION, b"tok") == b"\x01\x01\x00\x03tok"
    assert encapsulate(b"") == b"\x01\x03\x00\x00"
    assert decode_gss_message(b"\x01\x02\x00\x02ab+", GssType.PROTECTION) == (b"ab", 6)
    with pytest.raises(ValueError):
        encode_gss_message(GssType.ENCAPSULATED, bytes(65536))


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 5])
def test_an_incomplete_message_needs_more(cut: int) -> None:
    assert decode_gss_message(b"\x01\x01\x00\x03tok"[:cut], GssType.AUTHENTICATION) is None


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x05\x01", "version 0x05"),
        (b"\x01\xff", "aborted"),
        (b"\x01\x03\x00\x00", "type 0x03 where authentication"),
    ],
)
def test_a_wrong_message_is_refused(data: bytes, words: str) -> None:
    with pytest.raises(RemoteProtocolError, match=words):
        decode_gss_message(data, GssType.AUTHENTICATION)


def test_an_oversized_token_is_refused_from_its_header_alone() -> None:
    with pytest.raises(RemoteProtocolError, match="50000 octets exceeds the bound of 48000"):
        decode_gss_message(b"\x01\x01\xc3\x50", GssType.AUTHENTICATION, max_token=48000)


def test_a_datagram_is_exactly_one_message() -> None:
    assert decapsulate_datagram(encapsulate(b"wrapped")) == b"wrapped"
    with pytest.raises(RemoteProtocolError, match="exactly one"):
        decapsulate_datagram(encapsulate(b"wrapped") + b"x")
    with pytest.raises(RemoteProtocolError, match="exactly one"):
        decapsulate_datagram(encapsulate(b"wrapped")[:-1])


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 50), min_size=1))
def test_the_deframer_finds_every_token_however_the_stream_is_cut(
    tokens: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encapsulate(token) for token in tokens)
    deframer = Deframer()
    found: list[bytes] = []
    at, i = 0, 0
    while at < len(stream):
        size = cuts[i % len(cuts)]
        found += deframer.feed(stream[at : at + size])
        at, i = at + size, i + 1
    assert found == tokens
    assert deframer.pending == 0


def test_a_deframer_that_met_garbage_stays_broken() -> None:
    deframer = Deframer()
    assert deframer.feed(encapsulate(b"ok") + b"\x01") == [b"ok"]
    with pytest.raises(RemoteProtocolError, match="type 0x02"):
        deframer.feed(b"\x02\x00\x00")
    with pytest.raises(RemoteProtocolError, match="type 0x02"):
        deframer.feed(encapsulate(b"later"))


# -- the server's phases ---------------------------------------------------------------


def _chose_gssapi(max_token: int = 0xFFFF) -> ServerConnection:
    conn = ServerConnection(max_gss_token=max_token)
    conn.receive_data(Greeting((Method.GSSAPI,)).encode())
    assert isinstance(conn.next_event(), Greeting)
    assert conn.send_method(Method.GSSAPI) == b"\x05\x01"
    assert conn.phase is Phase.GSSAPI
    return conn


def test_tokens_go_back_and_forth_until_the_context_is_complete() -> None:
    conn = _chose_gssapi()
    conn.receive_data(encode_gss_message(GssType.AUTHENTICATION, b"ap-req"))
    assert conn.next_event() == GssContextToken(b"ap-req")
    assert conn.next_event() is Signal.PAUSED
    assert conn.send_gss_token(b"more?", then=Phase.GSSAPI) == b"\x01\x01\x00\x05more?"
    assert conn.phase is Phase.GSSAPI
    conn.receive_data(encode_gss_message(GssType.AUTHENTICATION, b"again"))
    assert conn.next_event() == GssContextToken(b"again")
    assert conn.send_gss_token(b"", then=Phase.GSSAPI_LEVEL) == b"\x01\x01\x00\x00"  # section 3.6
    assert conn.phase is Phase.GSSAPI_LEVEL
    # The wrapped level and the first (wrapped) request arrive together.
    conn.receive_data(encode_gss_message(GssType.PROTECTION, b"lvl") + encapsulate(b"req"))
    assert conn.next_event() == GssProtectionRequest(b"lvl")
    assert conn.send_gss_level(b"LVL") == b"\x01\x02\x00\x03LVL"
    assert conn.phase is Phase.REQUEST
    assert conn.take_trailing_data() == encapsulate(b"req")  # for the protection layer


def test_a_level_comes_only_once_the_context_is_complete() -> None:
    conn = _chose_gssapi()
    conn.receive_data(encode_gss_message(GssType.PROTECTION, b"\x02"))
    with pytest.raises(RemoteProtocolError, match="where authentication"):
        conn.next_event()
    assert conn.send_error(Rep.GENERAL_FAILURE) == ABORT


def test_refusing_the_context_is_the_abort() -> None:
    conn = _chose_gssapi()
    conn.receive_data(encode_gss_message(GssType.AUTHENTICATION, b"expired"))
    conn.next_event()
    assert conn.send_error(Rep.GENERAL_FAILURE) == b"\x01\xff"
    assert conn.phase is Phase.CLOSED


def test_an_oversized_context_token_is_aborted_before_its_body() -> None:
    conn = _chose_gssapi(max_token=2048)
    conn.receive_data(b"\x01\x01\x08\x01")  # 2049 octets announced, none sent
    with pytest.raises(RemoteProtocolError, match="2049 octets exceeds the bound of 2048"):
        conn.next_event()
    assert conn.send_error(Rep.GENERAL_FAILURE) == ABORT


def test_level_answers_are_out_of_turn_elsewhere() -> None:
    conn = _chose_gssapi()
    conn.receive_data(encode_gss_message(GssType.AUTHENTICATION, b"t"))
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send_gss_level(b"x")  # a context token is owed an answer, not a level
