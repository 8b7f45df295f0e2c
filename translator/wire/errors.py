"""The codec's exceptions (h11's split): the peer sent bad bytes, or we misused the API."""

from __future__ import annotations

from .constants import Rep


class ProtocolError(Exception):
    """Base of every codec error."""


class RemoteProtocolError(ProtocolError):
    """The peer's bytes break the protocol.

    ``rep`` is the SOCKS 5 reply code to answer with, or None when no reply can be sent
    (bad version octet, broken greeting) and the connection is simply closed.
    """

    def __init__(self, reason: str, rep: Rep | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rep = rep


class LocalProtocolError(ProtocolError):
    """The caller asked the codec for something out of turn or unencodable."""


class MessageRejected(RemoteProtocolError):
    """A whole message was read but is bad; the connection itself goes on.

    Raised in a UDP association's phases, where one bad control request or datagram
    must not end the association. When ``answer_owed`` is true the server answers it
    with a failure reply (``send_reply``); otherwise the message is just dropped.
    """

    def __init__(self, reason: str, rep: Rep | None = None, *, answer_owed: bool) -> None:
        super().__init__(reason, rep)
        self.answer_owed = answer_owed
