"""Server side of a SOCKS connection as a sans-I/O state machine.

Theory of operation (after h11): bytes go in with ``receive_data()``; ``next_event()``
returns the next whole message, or a ``Signal``: ``NEED_DATA`` while one is incomplete,
``PAUSED`` while the server owes the client an answer. The server answers with a
``send_*`` call, which returns the bytes to write and moves the machine on.

Every move is looked up in one table, ``TRANSITIONS``: for the phase the answered message
arrived in (``BIND_WAIT`` for BIND's second reply) and the kind of ``Answer`` given, the
phases that may follow. A pair not in the table, or an answer of another SOCKS version
than the connection's, raises LocalProtocolError and changes nothing. Where one phase
follows it is taken; where several may (a success reply to a SOCKS 5 or 4 request) the
caller picks with ``then=``, checked against the table. A failure's successor is never
the caller's to pick, so ``then=`` is ignored there. ``successors()`` reads the table.
In ``RELAY`` the codec steps aside: ``take_trailing_data()`` hands over bytes the client
pipelined after its request.

Errors: malformed input raises RemoteProtocolError (with the reply code to send when one
exists) and the machine enters ``CLOSED``; ``send_error()`` encodes the failure answer
``_FAILURE_ANSWERS`` names for the version and phase, and closes. In a UDP association's
phases one bad control request or tunnelled datagram raises MessageRejected instead and
the association goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum, auto
from types import MappingProxyType
from typing import Final

from .constants import SOCKS4_VERSION, SOCKS5_VERSION, SOCKS6_VERSION, Method, Rep, Socks4Status
from .errors import LocalProtocolError, MessageRejected, RemoteProtocolError
from .gssapi import (
    ABORT,
    MAX_TOKEN,
    GssContextToken,
    GssProtectionRequest,
    GssType,
    decode_gss_message,
    encode_gss_message,
)
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
    GSSAPI = auto()  # RFC 1961 context establishment: tokens both ways
    GSSAPI_LEVEL = auto()  # RFC 1961 protection-level sub-negotiation
    REQUEST = auto()  # a SOCKS 5 request (again, after ADDRESS ASSOCIATE)
    SOCKS4_REQUEST = auto()
    BIND_WAIT = auto()  # between BIND's two replies; client bytes stay buffered
    HOLD = auto()  # BIND MULTI holding connection: nothing more is parsed
    UDP_CONTROL = auto()  # UDP association: control channel requests (VH-04)
    TUNNEL = auto()  # UDP association in TUNNEL mode: framed datagrams and requests
    RELAY = auto()  # the codec is out of the way
    CLOSED = auto()

    # Members are compared by identity: so can they be hashed. Enum's own __hash__ is
    # Python code, run for every table lookup (TRANSITIONS, the parsers) per message.
    __hash__ = object.__hash__


class Signal(Enum):
    """What ``next_event()`` returns when it has no event: narrow with ``isinstance``."""

    NEED_DATA = auto()  # feed more bytes with receive_data()
    PAUSED = auto()  # answer the last event first

    __hash__ = object.__hash__  # as Phase's

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = Signal.NEED_DATA
PAUSED: Final = Signal.PAUSED


class Answer(Enum):
    """The kinds of answer the server gives, each in one SOCKS version (``version``)."""

    SOCKS6_MISMATCH = auto()  # the lone octet X'06' (profile 1)
    METHOD_NO_AUTH = auto()
    METHOD_USERNAME_PASSWORD = auto()
    METHOD_GSSAPI = auto()
    METHOD_NO_ACCEPTABLE = auto()
    AUTH_SUCCESS = auto()
    AUTH_FAILURE = auto()
    GSS_TOKEN = auto()  # a context token; the caller says whether the context is complete
    GSS_LEVEL = auto()  # the agreed protection level
    GSS_ABORT = auto()  # 01 FF
    REPLY_SUCCESS = auto()  # SOCKS 5 reply, REP X'00'
    REPLY_FAILURE = auto()  # SOCKS 5 reply, any other REP
    SOCKS4_GRANTED = auto()
    SOCKS4_REJECTED = auto()  # any status but 90

    __hash__ = object.__hash__  # as Phase's

    @property
    def version(self) -> int:
        return _ANSWER_VERSIONS[self]


# Which SOCKS version each answer is spoken in; the connection's must match.
_ANSWER_VERSIONS: Final[Mapping[Answer, int]] = MappingProxyType(
    {
        Answer.SOCKS6_MISMATCH: SOCKS6_VERSION,
        Answer.METHOD_NO_AUTH: SOCKS5_VERSION,
        Answer.METHOD_USERNAME_PASSWORD: SOCKS5_VERSION,
        Answer.METHOD_GSSAPI: SOCKS5_VERSION,
        Answer.METHOD_NO_ACCEPTABLE: SOCKS5_VERSION,
        Answer.AUTH_SUCCESS: SOCKS5_VERSION,
        Answer.AUTH_FAILURE: SOCKS5_VERSION,
        Answer.GSS_TOKEN: SOCKS5_VERSION,
        Answer.GSS_LEVEL: SOCKS5_VERSION,
        Answer.GSS_ABORT: SOCKS5_VERSION,
        Answer.REPLY_SUCCESS: SOCKS5_VERSION,
        Answer.REPLY_FAILURE: SOCKS5_VERSION,
        Answer.SOCKS4_GRANTED: SOCKS4_VERSION,
        Answer.SOCKS4_REJECTED: SOCKS4_VERSION,
    }
)

# The state machine: (phase the answered message arrived in, answer) -> phases that may
# follow. One successor is taken; of several, the caller's ``then=`` picks.
TRANSITIONS: Final[Mapping[tuple[Phase, Answer], frozenset[Phase]]] = MappingProxyType(
    {
        (Phase.VERSION, Answer.SOCKS6_MISMATCH): frozenset({Phase.CLOSED}),
        (Phase.GREETING, Answer.METHOD_NO_AUTH): frozenset({Phase.REQUEST}),
        (Phase.GREETING, Answer.METHOD_USERNAME_PASSWORD): frozenset({Phase.AUTH}),
        (Phase.GREETING, Answer.METHOD_GSSAPI): frozenset({Phase.GSSAPI}),
        (Phase.GREETING, Answer.METHOD_NO_ACCEPTABLE): frozenset({Phase.CLOSED}),
        (Phase.AUTH, Answer.AUTH_SUCCESS): frozenset({Phase.REQUEST}),
        (Phase.AUTH, Answer.AUTH_FAILURE): frozenset({Phase.CLOSED}),
        # Another token while the context continues; the level next once it is complete.
        (Phase.GSSAPI, Answer.GSS_TOKEN): frozenset({Phase.GSSAPI, Phase.GSSAPI_LEVEL}),
        (Phase.GSSAPI, Answer.GSS_ABORT): frozenset({Phase.CLOSED}),
        (Phase.GSSAPI_LEVEL, Answer.GSS_LEVEL): frozenset({Phase.REQUEST}),
        (Phase.GSSAPI_LEVEL, Answer.GSS_ABORT): frozenset({Phase.CLOSED}),
        (Phase.REQUEST, Answer.REPLY_SUCCESS): frozenset(
            {
                Phase.REQUEST,  # ADDRESS ASSOCIATE: another request follows
                Phase.RELAY,
                Phase.BIND_WAIT,
                Phase.HOLD,  # BIND MULTI
                Phase.UDP_CONTROL,
                Phase.TUNNEL,
            }
        ),
        (Phase.REQUEST, Answer.REPLY_FAILURE): frozenset({Phase.CLOSED}),  # profile 3
        (Phase.BIND_WAIT, Answer.REPLY_SUCCESS): frozenset({Phase.RELAY}),
        (Phase.BIND_WAIT, Answer.REPLY_FAILURE): frozenset({Phase.CLOSED}),
        # On the control channel a reply answers one request; the association goes on.
        (Phase.UDP_CONTROL, Answer.REPLY_SUCCESS): frozenset({Phase.UDP_CONTROL}),
        (Phase.UDP_CONTROL, Answer.REPLY_FAILURE): frozenset({Phase.UDP_CONTROL}),
        (Phase.TUNNEL, Answer.REPLY_SUCCESS): frozenset({Phase.TUNNEL}),
        (Phase.TUNNEL, Answer.REPLY_FAILURE): frozenset({Phase.TUNNEL}),
        (Phase.SOCKS4_REQUEST, Answer.SOCKS4_GRANTED): frozenset({Phase.RELAY, Phase.BIND_WAIT}),
        (Phase.SOCKS4_REQUEST, Answer.SOCKS4_REJECTED): frozenset({Phase.CLOSED}),
        (Phase.BIND_WAIT, Answer.SOCKS4_GRANTED): frozenset({Phase.RELAY}),
        (Phase.BIND_WAIT, Answer.SOCKS4_REJECTED): frozenset({Phase.CLOSED}),
    }
)
_NONE: Final[frozenset[Phase]] = frozenset()
# Answers after which the caller, not the protocol, says what follows.
_CALLER_PICKS: Final = frozenset({Answer.REPLY_SUCCESS, Answer.SOCKS4_GRANTED, Answer.GSS_TOKEN})


def successors(phase: Phase, answer: Answer) -> frozenset[Phase]:
    """The phases ``answer`` may lead to from ``phase``; empty if it is no answer there."""
    return TRANSITIONS.get((phase, answer), _NONE)


# What send_error() answers, by (version, phase); other pairs have no answer (b"").
_FAILURE_ANSWERS: Final[Mapping[tuple[int | None, Phase], Answer]] = MappingProxyType(
    {
        (SOCKS5_VERSION, Phase.GREETING): Answer.METHOD_NO_ACCEPTABLE,
        (SOCKS5_VERSION, Phase.AUTH): Answer.AUTH_FAILURE,
        (SOCKS5_VERSION, Phase.GSSAPI): Answer.GSS_ABORT,
        (SOCKS5_VERSION, Phase.GSSAPI_LEVEL): Answer.GSS_ABORT,
        (SOCKS5_VERSION, Phase.REQUEST): Answer.REPLY_FAILURE,
        (SOCKS5_VERSION, Phase.BIND_WAIT): Answer.REPLY_FAILURE,
        (SOCKS5_VERSION, Phase.UDP_CONTROL): Answer.REPLY_FAILURE,
        (SOCKS5_VERSION, Phase.TUNNEL): Answer.REPLY_FAILURE,
        (SOCKS4_VERSION, Phase.SOCKS4_REQUEST): Answer.SOCKS4_REJECTED,
        (SOCKS4_VERSION, Phase.BIND_WAIT): Answer.SOCKS4_REJECTED,
    }
)
_FAILURE_ENCODERS: Final[Mapping[Answer, Callable[[Rep], bytes]]] = MappingProxyType(
    {
        Answer.METHOD_NO_ACCEPTABLE: lambda rep: MethodSelection(Method.NO_ACCEPTABLE).encode(),
        Answer.AUTH_FAILURE: lambda rep: UserPassReply(False).encode(),
        Answer.GSS_ABORT: lambda rep: ABORT,
        Answer.REPLY_FAILURE: lambda rep: Reply(rep).encode(),
        Answer.SOCKS4_REJECTED: lambda rep: Socks4Reply(Socks4Status.REJECTED).encode(),
    }
)
_METHOD_ANSWERS: Final[Mapping[int, Answer]] = MappingProxyType(
    {
        Method.NO_AUTH: Answer.METHOD_NO_AUTH,
        Method.USERNAME_PASSWORD: Answer.METHOD_USERNAME_PASSWORD,
        Method.GSSAPI: Answer.METHOD_GSSAPI,
        Method.NO_ACCEPTABLE: Answer.METHOD_NO_ACCEPTABLE,
    }
)


def _framed(phase: Phase, encoded: bytes) -> bytes:
    # In a tunnel every octet travels in frames, replies included (profile 7).
    return encode_tunnel_frame(encoded) if phase is Phase.TUNNEL else encoded


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
    | GssContextToken
    | GssProtectionRequest
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
_MAX_BUFFERED = 1 << 16  # no request is longer; more unparsed bytes mean abuse
# Phases where client bytes are only held (for the relay that follows), never parsed.
_HOLDING = (Phase.BIND_WAIT, Phase.HOLD)


class ServerConnection:
    """One client connection, seen from the gateway."""

    def __init__(self, max_gss_token: int = MAX_TOKEN) -> None:
        self.phase = Phase.VERSION
        self.max_gss_token = max_gss_token  # bounds the client's GSS-API context tokens
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

    def next_event(self) -> Event | Signal:
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
            if phase is Phase.GSSAPI or phase is Phase.GSSAPI_LEVEL:
                return self._next_gss_message(phase)
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

    def _need_data(self) -> Signal:
        if len(self._buffer) > _MAX_BUFFERED:
            self._fail()
            raise RemoteProtocolError("oversized message")
        return NEED_DATA

    def _dispatch_version(self) -> Event | Signal:
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

    def _next_gss_message(self, phase: Phase) -> Event | Signal:
        context = phase is Phase.GSSAPI
        got = decode_gss_message(
            self._buffer,
            GssType.AUTHENTICATION if context else GssType.PROTECTION,
            self.max_gss_token if context else MAX_TOKEN,
        )
        if got is None:
            return NEED_DATA  # the header bounded the message: no _need_data check needed
        token, used = got
        del self._buffer[:used]
        self._owed = phase
        return GssContextToken(token) if context else GssProtectionRequest(token)

    def _next_control_request(self) -> Event | Signal:
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

    def _next_tunnel_event(self) -> Event | Signal:
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

    def _follow(self, answer: Answer, then: Phase | None = None) -> tuple[Phase, Phase]:
        """``(phase answered, phase next)`` for ``answer``, from TRANSITIONS. Nothing
        changes here, so a refused answer leaves the machine as it was."""
        answered = self._owed
        if answered is None:
            if self.phase is not Phase.BIND_WAIT:
                raise LocalProtocolError(f"nothing to answer in {self.phase.name}")
            answered = Phase.BIND_WAIT  # BIND's second reply answers the BIND request
        if answer.version != self.version:
            raise LocalProtocolError(f"{answer.name} is not SOCKS {self.version}")
        following = successors(answered, answer)
        if not following:
            raise LocalProtocolError(f"{answer.name} is no answer in {answered.name}")
        if then is not None and answer in _CALLER_PICKS:
            if then not in following:
                raise LocalProtocolError(
                    f"{answer.name} in {answered.name} cannot lead to {then.name}"
                )
            return answered, then
        if len(following) > 1:
            raise LocalProtocolError(f"{answer.name} in {answered.name} needs then=")
        (only,) = following
        return answered, only

    def _move(self, phase: Phase) -> None:
        self._owed = None
        self.phase = phase

    def send_socks6_mismatch(self) -> bytes:
        _, following = self._follow(Answer.SOCKS6_MISMATCH)
        self._move(following)
        return bytes((SOCKS6_VERSION,))

    def send_method(self, method: int) -> bytes:
        answer = _METHOD_ANSWERS.get(method)
        if answer is None:
            raise LocalProtocolError(f"method {method:#04x} is not implemented")
        _, following = self._follow(answer)
        self._move(following)
        return MethodSelection(method).encode()

    def send_auth_result(self, success: bool) -> bytes:
        _, following = self._follow(Answer.AUTH_SUCCESS if success else Answer.AUTH_FAILURE)
        self._move(following)
        return UserPassReply(success).encode()

    def send_gss_token(self, token: bytes, *, then: Phase | None = None) -> bytes:
        """Answer a context token with ours (empty when GSS-API gave none, section 3.6);
        ``then``: GSSAPI while the context continues, GSSAPI_LEVEL once it is complete."""
        _, following = self._follow(Answer.GSS_TOKEN, then)
        encoded = encode_gss_message(GssType.AUTHENTICATION, token)  # may refuse: first
        self._move(following)
        return encoded

    def send_gss_level(self, token: bytes) -> bytes:
        """Answer the protection-level request with the agreed level, as the caller
        wrapped it (or the bare octet to a client that sent it bare)."""
        _, following = self._follow(Answer.GSS_LEVEL)
        encoded = encode_gss_message(GssType.PROTECTION, token)
        self._move(following)
        return encoded

    def send_gss_abort(self) -> bytes:
        """Refuse the client's context or level (section 3.8); the connection closes."""
        _, following = self._follow(Answer.GSS_ABORT)
        self._move(following)
        return ABORT

    def send_reply(self, reply: Reply, *, then: Phase | None = None) -> bytes:
        """Answer a request (or, in BIND_WAIT, send BIND's second reply).

        A failure reply closes the connection (profile 3), except on the UDP control
        channel, where it answers one request; a success picks the next phase with
        ``then`` where TRANSITIONS allows several.
        """
        ok = reply.rep == Rep.SUCCEEDED
        answered, following = self._follow(
            Answer.REPLY_SUCCESS if ok else Answer.REPLY_FAILURE, then
        )
        encoded = reply.encode()  # may refuse: before the move
        self._move(following)
        return _framed(answered, encoded)

    def send_socks4_reply(self, reply: Socks4Reply, *, then: Phase | None = None) -> bytes:
        ok = reply.status == Socks4Status.GRANTED
        _, following = self._follow(Answer.SOCKS4_GRANTED if ok else Answer.SOCKS4_REJECTED, then)
        encoded = reply.encode()
        self._move(following)
        return encoded

    def send_error(self, rep: Rep) -> bytes:
        """The failure reply for ``rep`` in the version spoken, or b"" when none exists."""
        was = self._failed_in or self.phase
        self._move(Phase.CLOSED)
        answer = _FAILURE_ANSWERS.get((self.version, was))
        if answer is None:
            return b""
        return _framed(was, _FAILURE_ENCODERS[answer](rep))

    def take_trailing_data(self) -> bytes:
        """Bytes the client sent after its last parsed message (e.g. pipelined payload)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def close(self) -> None:
        self.phase = Phase.CLOSED
        self._owed = None
