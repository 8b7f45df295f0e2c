"""Section 5's wrapping, with a stand-in context (the real one is in the integration
tests): chunking at the wrap size limit, and refusals of what does not verify."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from translator.gss.acceptor import GssUnavailable, load_gssapi
from translator.gss.protection import MessageProtection, gss_reason
from translator.wire import Deframer, RemoteProtocolError


@dataclass
class Wrapped:
    message: bytes
    encrypted: bool


class FakeContext:
    """Wraps by prefixing a tag: enough to see what was wrapped, and how."""

    def get_wrap_size_limit(self, size: int, encrypted: bool) -> int:
        return 1000

    def wrap(self, data: bytes, encrypt: bool) -> Wrapped:
        return Wrapped((b"C" if encrypt else b"I") + data, encrypt)

    def unwrap(self, token: bytes) -> Wrapped:
        if token[:1] not in (b"C", b"I"):
            raise ValueError("Major (851968): Unspecified GSS failure, Minor (1): Bad MIC")
        return Wrapped(token[1:], token[:1] == b"C")


def test_data_is_cut_where_one_token_would_overflow() -> None:
    protection = MessageProtection(FakeContext(), confidential=True)
    sealed = protection.seal(bytes(2500))
    tokens = Deframer().feed(sealed)
    assert [len(token) for token in tokens] == [1001, 1001, 501]
    assert protection.open_all(Deframer(), sealed) == bytes(2500)


def test_level_2_refuses_a_message_without_confidentiality() -> None:
    protection = MessageProtection(FakeContext(), confidential=True)
    with pytest.raises(RemoteProtocolError, match="without confidentiality"):
        protection.open(b"Iplain")
    assert MessageProtection(FakeContext(), confidential=False).open(b"Iplain") == b"plain"


def test_a_message_that_does_not_verify_is_a_protocol_error() -> None:
    protection = MessageProtection(FakeContext(), confidential=False)
    with pytest.raises(RemoteProtocolError, match="wrapped message rejected: Bad MIC"):
        protection.open(b"Xgarbage")


def test_datagrams_are_one_message_each() -> None:
    protection = MessageProtection(FakeContext(), confidential=False)
    assert protection.open_datagram(protection.seal_datagram(b"dgram")) == b"dgram"
    with pytest.raises(ValueError):
        protection.seal_datagram(bytes(1001))


def test_gss_reasons_drop_the_status_numbers() -> None:
    text = "Major (851968): Unspecified GSS failure.  Minor code may provide more information"
    assert gss_reason(Exception(f"{text}, Minor (2529638944): Ticket expired")) == "Ticket expired"
    assert gss_reason(Exception(f"{text}, Minor (100001): Unknown error")).startswith(
        "Unspecified GSS failure"
    )


def test_without_the_package_the_reason_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gssapi", None)  # import gssapi -> ImportError
    with pytest.raises(GssUnavailable, match=r"socks64\[gssapi\].*libkrb5-dev"):
        load_gssapi()
