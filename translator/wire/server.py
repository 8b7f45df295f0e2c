"""Server side of a SOCKS connection as a sans-I/O state machine.

Theory of operation (after h11): bytes go in with ``receive_data()``; ``next_event()``
returns the next whole message, ``NEED_DATA`` while one is incomplete, or ``PAUSED``
while the server owes the client an answer. The server answers with a ``send_*`` call,
which returns the bytes to write and moves the machine on. The phase after each answer
comes from ``_TRANSITIONS``; the one free choice, what follows a successful reply, is the
caller's (``then=``), checked against ``_AFTER_SUCCESS``. In ``RELAY`` the codec steps
aside: ``take_trailing_data()`` hands over bytes the client pipelined after its request.

Errors: malformed input raises RemoteProtocolError (with the reply code to send when one
exists) and the machine enters ``CLOSED``; ``send_error()`` encodes the matching failure
reply for the version in use. In a UDP association's phases one bad control request or
tunnelled datagram raises MessageRejected instead and the association goes on.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Final

from .constants import SOCKS4_VERSION, SOCKS5_VERSION, SOCKS6_VERSION, Method, Rep, Socks4Status
from .errors import LocalProtocolError, MessageRejected, RemoteProtocolError
from .messages import (
    ControlRequest,
    Greeting,
    MethodSelection,
    Reply,
    Request,
    Socks4Reply,
    Socks4Request,
    UdpDatagram,
    UserPassReply,
    UserPassRequest,
    control_request_length,
    decode_control_request,
    decode_greeting,
    decode_request,
    decode_socks4_request,
    decode_tunnel_frame,
    decode_udp_datagram,
    decode_userpass_request,
    encode_tunnel_frame,
    is_control_payload,
)


class Phase(Enum):
    VERSION = auto()  # nothing read yet
    GREETING = auto()
    AUTH = auto()  # RFC 1929 sub-negotiation
    REQUEST = auto()  # a SOCKS 5 request (again, after ADDRESS ASSOCIATE)
    SOCKS4_REQUEST = auto()
    BIND_WAIT = auto()  # between BIND's two replies; client bytes stay buffered
    HOLD = auto()  # BIND MULTI holding connection: nothing more is parsed
    UDP_CONTROL = auto()  # UDP association: control channel requests (VH-04)
    TUNNEL = auto()  # UDP association in TUNNEL mode: framed datagrams and requests
    RELAY = auto()  # the codec is out of the way
    CLOSED = auto()


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
PAUSED: Final = _Sentinel("PAUSED")


class Socks6Attempt:
    """The client spoke SOCKS 6; answer ``send_socks6_mismatch()`` and close (profile 1)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Socks6Attempt)

    def __hash__(self) -> int:
        return hash(Socks6Attempt)


class TunnelDatagram:
    """A datagram that arrived framed on the TCP connection (TUNNEL mode)."""

    __slots__ = ("datagram",)

    def __init__(self, datagram: UdpDatagram) -> None:
        self.datagram = datagram


Event = (
    Greeting
    | UserPassRequest
    | Request
    | Socks4Request
    | ControlRequest
    | TunnelDatagram
    | Socks6Attempt
)

# Phases in which the client's bytes are parsed, and by what.
_PARSERS = {
    Phase.GREETING: decode_greeting,
    Phase.AUTH: decode_userpass_request,
    Phase.REQUEST: decode_request,
    Phase.SOCKS4_REQUEST: decode_socks4_request,
}
# Phases a successful reply may lead to, per phase the request arrived in.
_AFTER_SUCCESS = {
    Phase.REQUEST: {
        Phase.REQUEST,
        Phase.RELAY,
        Phase.BIND_WAIT,
        Phase.HOLD,
        Phase.UDP_CONTROL,
        Phase.TUNNEL,
    },
    Phase.BIND_WAIT: {Phase.RELAY},
    Phase.UDP_CONTROL: {Phase.UDP_CONTROL},
    Phase.TUNNEL: {Phase.TUNNEL},
    Phase.SOCKS4_REQUEST: {Phase.RELAY, Phase.BIND_WAIT},
}
_AFTER_METHOD: dict[int, Phase] = {
    Method.NO_AUTH: Phase.REQUEST,
    Method.USERNAME_PASSWORD: Phase.AUTH,
    Method.NO_ACCEPTABLE: Phase.CLOSED,
}
_MAX_BUFFERED = 1 << 16  # no request is longer; more unparsed bytes mean abuse
# Phases where client bytes are only held (for the relay that follows), never parsed.
_HOLDING = (Phase.BIND_WAIT, Phase.HOLD)


class ServerConnection:
    """One client connection, seen from the gateway."""

    def __init__(self) -> None:
        self.phase = Phase.VERSION
        self.version: int | None = None
        self._buffer = bytearray()
        self._owed: Phase | None = None  # phase whose message awaits our answer
        self._failed_in: Phase | None = None  # where bad input closed us, for send_error

    # -- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer client bytes. While only holding them (between BIND's replies) more
        than one message's worth is abuse: RemoteProtocolError."""
        if self.phase is Phase.CLOSED:
            return
        self._buffer += data
        if self.phase in _HOLDING:
            self._need_data()

    def next_event(self) -> Event | _Sentinel:
        if self._owed is not None:
            return PAUSED
        phase = self.phase
        if phase is Phase.VERSION:
            return self._dispatch_version()
        parser = _PARSERS.get(phase)
        try:
            if parser is not None:
                got = parser(self._buffer)
                if got is None:
                    return self._need_data()
                message, used = got
                del self._buffer[:used]
                self._owed = phase
                return message
            if phase is Phase.UDP_CONTROL:
                return self._next_control_request()
            if phase is Phase.TUNNEL:
                return self._next_tunnel_event()
        except MessageRejected:
            raise  # one bad message; the association goes on
        except RemoteProtocolError:
            self._fail()
            raise
        return NEED_DATA

    def _fail(self) -> None:
        self._failed_in = self.phase
        self.phase = Phase.CLOSED

    def _need_data(self) -> _Sentinel:
        if len(self._buffer) > _MAX_BUFFERED:
            self._fail()
            raise RemoteProtocolError("oversized message")
        return NEED_DATA

    def _dispatch_version(self) -> Event | _Sentinel:
        if not self._buffer:
            return NEED_DATA
        version = self._buffer[0]
        self.version = version
        if version == SOCKS5_VERSION:
            self.phase = Phase.GREETING
        elif version == SOCKS4_VERSION:
            self.phase = Phase.SOCKS4_REQUEST
        elif version == SOCKS6_VERSION:
            self._owed = Phase.VERSION
            return Socks6Attempt()
        else:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(f"unknown SOCKS version {version:#04x}")
        return self.next_event()

    def _next_control_request(self) -> Event | _Sentinel:
        length = control_request_length(self._buffer)
        if length is None or len(self._buffer) < length:
            return self._need_data()
        payload = bytes(self._buffer[:length])
        del self._buffer[:length]
        return self._control_event(payload, Phase.UDP_CONTROL)

    def _control_event(self, payload: bytes, phase: Phase) -> ControlRequest:
        """A framed control request; a bad one owes a failure reply, nothing more."""
        self._owed = phase
        try:
            parsed = decode_control_request(payload)
        except RemoteProtocolError as exc:
            raise MessageRejected(exc.reason, exc.rep, answer_owed=True) from None
        if parsed is None or parsed[1] != len(payload):
            raise MessageRejected(
                "control request length does not match its frame",
                Rep.GENERAL_FAILURE,
                answer_owed=True,
            )
        return parsed[0]

    def _next_tunnel_event(self) -> Event | _Sentinel:
        got = decode_tunnel_frame(self._buffer)
        if got is None:
            return self._need_data()
        payload, used = got
        del self._buffer[:used]
        if is_control_payload(payload):
            return self._control_event(payload, Phase.TUNNEL)
        try:
            return TunnelDatagram(decode_udp_datagram(payload))
        except RemoteProtocolError as exc:
            raise MessageRejected(exc.reason, exc.rep, answer_owed=False) from None

    # -- output -----------------------------------------------------------------------

    def _owed_in(self, expected: set[Phase]) -> Phase:
        """The phase whose message we are answering; nothing changes until the answer
        is known to be legal, so a refused call leaves the machine as it was."""
        owed = self._owed
        if owed is None or owed not in expected:
            raise LocalProtocolError(f"nothing to answer in {self.phase.name} this way")
        return owed

    def _second_reply_or_owed(self, version: int, expected: set[Phase]) -> Phase:
        if self.phase is Phase.BIND_WAIT and self._owed is None:
            if self.version != version:
                raise LocalProtocolError(f"BIND's second reply must be SOCKS {self.version}")
            return Phase.BIND_WAIT
        return self._owed_in(expected)

    def _move(self, phase: Phase) -> None:
        self._owed = None
        self.phase = phase

    def send_socks6_mismatch(self) -> bytes:
        self._owed_in({Phase.VERSION})
        self._move(Phase.CLOSED)
        return bytes((SOCKS6_VERSION,))

    def send_method(self, method: int) -> bytes:
        self._owed_in({Phase.GREETING})
        following = _AFTER_METHOD.get(method)
        if following is None:
            raise LocalProtocolError(f"method {method:#04x} is not implemented")
        self._move(following)
        return MethodSelection(method).encode()

    def send_auth_result(self, success: bool) -> bytes:
        self._owed_in({Phase.AUTH})
        self._move(Phase.REQUEST if success else Phase.CLOSED)
        return UserPassReply(success).encode()

    def send_reply(self, reply: Reply, *, then: Phase | None = None) -> bytes:
        """Answer a request (or, in BIND_WAIT, send BIND's second reply).

        A failure reply closes the connection (profile 3), except on the UDP control
        channel, where it answers one request; a success needs ``then``.
        """
        owed = self._second_reply_or_owed(
            SOCKS5_VERSION, {Phase.REQUEST, Phase.UDP_CONTROL, Phase.TUNNEL}
        )
        encoded = reply.encode()
        following: Phase
        if reply.rep != Rep.SUCCEEDED:
            following = owed if owed in (Phase.UDP_CONTROL, Phase.TUNNEL) else Phase.CLOSED
        elif then is None or then not in _AFTER_SUCCESS[owed]:
            raise LocalProtocolError(f"a success in {owed.name} cannot lead to {then}")
        else:
            following = then
        self._move(following)
        # In a tunnel every octet travels in frames, replies included (profile 7).
        return encode_tunnel_frame(encoded) if owed is Phase.TUNNEL else encoded

    def send_socks4_reply(self, reply: Socks4Reply, *, then: Phase | None = None) -> bytes:
        owed = self._second_reply_or_owed(SOCKS4_VERSION, {Phase.SOCKS4_REQUEST})
        encoded = reply.encode()
        following: Phase
        if reply.status != Socks4Status.GRANTED:
            following = Phase.CLOSED
        elif then is None or then not in _AFTER_SUCCESS[owed]:
            raise LocalProtocolError(f"a SOCKS 4 success in {owed.name} cannot lead to {then}")
        else:
            following = then
        self._move(following)
        return encoded

    def send_error(self, rep: Rep) -> bytes:
        """The failure reply for ``rep`` in the version spoken, or b"" when none exists."""
        was = self._failed_in or self.phase
        self._move(Phase.CLOSED)
        if self.version == SOCKS4_VERSION and was in (Phase.SOCKS4_REQUEST, Phase.BIND_WAIT):
            return Socks4Reply(Socks4Status.REJECTED).encode()
        if self.version != SOCKS5_VERSION:
            return b""
        if was in (Phase.REQUEST, Phase.BIND_WAIT, Phase.UDP_CONTROL):
            return Reply(rep).encode()
        if was is Phase.TUNNEL:
            return encode_tunnel_frame(Reply(rep).encode())
        if was is Phase.GREETING:
            return MethodSelection(Method.NO_ACCEPTABLE).encode()
        if was is Phase.AUTH:
            return UserPassReply(False).encode()
        return b""

    def take_trailing_data(self) -> bytes:
        """Bytes the client sent after its last parsed message (e.g. pipelined payload)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def close(self) -> None:
        self.phase = Phase.CLOSED
        self._owed = None
