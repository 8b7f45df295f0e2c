"""RFC 1961 section 5: every message after the level sub-negotiation, wrapped.

``MessageProtection`` wraps and unwraps with one agreed context; ``ProtectedChannel`` is
the session's client channel with that applied on both ways, so the codec and the
request handlers see plain SOCKS as before (the way TLS sits under a protocol).
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from functools import partial
from typing import Any

from translator.relay.channel import Channel
from translator.wire import Deframer, RemoteProtocolError, decapsulate_datagram, encapsulate
from translator.wire.gssapi import MAX_TOKEN

_MINOR = re.compile(r"Minor \(\d+\): (.*)$")
_MAJOR = re.compile(r"Major \(\d+\): (.*?)(?:, Minor|$)")


def gss_reason(exc: BaseException) -> str:
    """A GSSError's words without its status numbers: the minor (mechanism) message when
    it says something, else the major one."""
    text = str(exc)
    minor = _MINOR.search(text)
    if minor and minor.group(1).strip() and "Unknown error" not in minor.group(1):
        return minor.group(1).strip().rstrip(".")
    major = _MAJOR.search(text)
    return (major.group(1) if major else text).strip().rstrip(".")


class MessageProtection:
    """Wraps and unwraps with one context, with or without confidentiality."""

    __slots__ = ("_context", "_unwrap", "_wrap", "confidential", "max_chunk")

    def __init__(self, context: Any, confidential: bool) -> None:
        self._context = context
        self.confidential = confidential
        raw = sys.modules.get("gssapi.raw")
        if raw is not None and isinstance(context, raw.SecurityContext):
            # The package's functions, not the context's methods: those check their
            # arguments with inspect.Signature.bind on every call (5% of a relay's CPU).
            self._wrap = partial(raw.wrap, context)
            self._unwrap = partial(raw.unwrap, context)
        else:  # a stand-in context (tests)
            self._wrap = context.wrap
            self._unwrap = context.unwrap
        #: the most plaintext one wrapped token (with its LEN) can carry
        self.max_chunk: int = context.get_wrap_size_limit(MAX_TOKEN, encrypted=confidential)

    def wrap(self, data: bytes) -> bytes:
        return bytes(self._wrap(data, self.confidential).message)

    def seal(self, data: bytes) -> bytes:
        """``data`` as framed MTYP 3 messages, split where one token would overflow."""
        limit = self.max_chunk
        if len(data) <= limit:
            return encapsulate(self.wrap(data))
        view = memoryview(data)
        return b"".join(
            encapsulate(self.wrap(bytes(view[i : i + limit]))) for i in range(0, len(data), limit)
        )

    def open(self, token: bytes) -> bytes:
        """Unwrap one token; RemoteProtocolError for one that does not verify, or that
        is not encrypted when confidentiality was agreed (section 5: conf_req TRUE)."""
        try:
            result = self._unwrap(token)
        except Exception as exc:  # GSSError: the package's class is not imported here
            raise RemoteProtocolError(f"wrapped message rejected: {gss_reason(exc)}") from None
        if self.confidential and not result.encrypted:
            raise RemoteProtocolError("wrapped message without confidentiality (level 2 agreed)")
        return bytes(result.message)

    def open_all(self, deframer: Deframer, raw: bytes) -> bytes:
        """The plaintext of every whole message in ``raw`` and what came before it."""
        tokens = deframer.feed(raw)
        if len(tokens) == 1:
            return self.open(tokens[0])
        return b"".join([self.open(token) for token in tokens])

    # UDP (section 5 applies to datagrams too): one datagram, one message.

    def seal_datagram(self, packet: bytes) -> bytes:
        if len(packet) > self.max_chunk:
            raise ValueError("datagram too large to wrap in one message")
        return encapsulate(self.wrap(packet))

    def open_datagram(self, datagram: bytes) -> bytes:
        return self.open(decapsulate_datagram(datagram))


class ProtectedChannel(Channel):
    """The client channel once a level above 0 is agreed: reads unwrap, writes wrap.

    Reads return only whole plaintext: bytes of an incomplete message wait in
    ``deframer`` (the relay takes it over). Writes that the kernel does not take at once
    are queued already wrapped, so nothing is wrapped twice and order holds.
    """

    __slots__ = ("deframer", "protection")

    def __init__(
        self, sock: socket.socket, loop: asyncio.AbstractEventLoop, protection: MessageProtection
    ) -> None:
        super().__init__(sock, loop)
        self.protection = protection
        self.deframer = Deframer()

    @classmethod
    def around(cls, channel: Channel, protection: MessageProtection) -> ProtectedChannel:
        """Take over ``channel``'s socket (and its kept read registration)."""
        sock, watched = channel.hand_over()
        protected = cls(sock, channel.loop, protection)
        if watched:
            protected._watching = True
            channel.loop.add_reader(sock.fileno(), protected._readable)  # replaces the callback
        return protected

    def open(self, raw: bytes) -> bytes:
        """Client bytes read before the channel was protected (pipelined after the level
        message): their plaintext, as far as whole messages go."""
        return self.protection.open_all(self.deframer, raw)

    def recv_ready(self, size: int = 65536) -> bytes | None:
        raw = super().recv_ready(size)
        if not raw:
            return raw
        return self.open(raw) or None

    async def recv_before(self, size: int, deadline: float) -> bytes:
        while True:
            raw = await super().recv_before(size, deadline)
            if not raw:
                return raw
            plain = self.open(raw)
            if plain:
                return plain

    async def recv(self, size: int = 65536) -> bytes:
        while True:
            raw = await super().recv(size)
            if not raw:
                return raw
            plain = self.open(raw)
            if plain:
                return plain

    def send_now(self, data: bytes) -> bytes:
        rest = super().send_now(self.protection.seal(data))
        if rest:
            super().write_nowait(rest)  # already wrapped: queued as it is
        return b""

    async def send_all(self, data: bytes) -> None:
        await super().send_all(self.protection.seal(data))

    def write_nowait(self, data: bytes) -> None:
        super().write_nowait(self.protection.seal(data))
