"""The client side of RFC 1961: authenticate with a Kerberos ticket (any GSS-API
mechanism), agree a protection level, and from then on wrap every message.

Once a level above 0 is agreed the connection's reader and writer are swapped for the
ends of a local socket pair, and two pumps wrap and unwrap between it and the gateway:
every request, reply, tunnelled datagram and relayed byte above is plain SOCKS again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Any

from translator.gss.acceptor import context_class, load_gssapi
from translator.gss.protection import MessageProtection, gss_reason
from translator.wire import (
    Deframer,
    GssType,
    ProtectionLevel,
    RemoteProtocolError,
    Rep,
    decode_gss_message,
)
from translator.wire.gssapi import encode_gss_message

from .connection import ControlConnection, SocksReplyError

_READ = 1 << 18


@dataclass(frozen=True)
class GssOptions:
    """How to authenticate: ``service@host`` names the gateway's principal (host: the
    gateway's name when empty); ``ccache``, a credentials cache other than the default;
    ``sequence`` off for a connection that will carry UDP (RFC 1961 section 3.2)."""

    service: str = "rcmd"
    host: str = ""
    protection: ProtectionLevel = ProtectionLevel.CONFIDENTIALITY
    ccache: str | None = None
    sequence: bool = True
    require_level: bool = True  # refuse a level other than the one asked for


class GssError(SocksReplyError):
    """GSS-API authentication failed on our side or was refused by the gateway."""

    def __init__(self, message: str) -> None:
        super().__init__(Rep.NOT_ALLOWED, message)


async def authenticate(
    conn: ControlConnection, options: GssOptions, gateway_host: str
) -> tuple[ProtectionLevel, str]:
    """The context exchange and the level sub-negotiation on ``conn``; afterwards, with
    level 1 or 2, ``conn`` wraps everything. Returns the level and the gateway's name."""
    gssapi = load_gssapi()
    flag = gssapi.RequirementFlag
    flags = [flag.mutual_authentication, flag.replay_detection, flag.delegate_to_peer]
    if options.sequence:
        flags.append(flag.out_of_sequence_detection)
    host = options.host or gateway_host
    try:
        creds = (
            gssapi.Credentials(usage="initiate", store={"ccache": options.ccache})
            if options.ccache
            else None
        )
        context: Any = context_class(gssapi)(
            name=gssapi.Name(f"{options.service}@{host}", gssapi.NameType.hostbased_service),
            creds=creds,
            usage="initiate",
            flags=flags,
        )
        token = await asyncio.to_thread(context.step)  # asks the KDC for a service ticket
    except gssapi.exceptions.GSSError as exc:
        raise GssError(f"GSS-API: {gss_reason(exc)}") from None
    while True:
        conn.writer.write(encode_gss_message(GssType.AUTHENTICATION, token or b""))
        answer = await _read_gss(conn, GssType.AUTHENTICATION)
        if context.complete:
            break
        try:
            token = await asyncio.to_thread(context.step, answer)
        except gssapi.exceptions.GSSError as exc:
            raise GssError(f"GSS-API: the gateway's answer fails: {gss_reason(exc)}") from None
        if context.complete and not token:
            break
    wanted = options.protection
    conn.writer.write(
        encode_gss_message(GssType.PROTECTION, context.wrap(bytes((wanted,)), False).message)
    )
    try:
        octet = context.unwrap(await _read_gss(conn, GssType.PROTECTION)).message
    except gssapi.exceptions.GSSError as exc:
        raise GssError(f"GSS-API: the gateway's level does not unwrap: {gss_reason(exc)}") from None
    if len(octet) != 1 or octet[0] > ProtectionLevel.CONFIDENTIALITY:
        raise GssError(f"GSS-API: the gateway answered level {octet.hex()}")
    agreed = ProtectionLevel(octet[0])
    if agreed != wanted and options.require_level:
        raise GssError(
            f"GSS-API: the gateway agreed to {agreed.name.lower()}, not {wanted.name.lower()}"
        )
    if agreed != ProtectionLevel.NONE:
        await protect(conn, MessageProtection(context, agreed == ProtectionLevel.CONFIDENTIALITY))
    return agreed, str(context.target_name)


async def _read_gss(conn: ControlConnection, mtyp: GssType) -> bytes:
    try:
        return await conn._read(lambda buffer: decode_gss_message(buffer, mtyp))
    except ConnectionError:
        raise GssError("GSS-API: the gateway closed the connection (refused)") from None
    except RemoteProtocolError as exc:  # the abort, 01 FF, among them
        raise GssError(f"GSS-API: {exc.reason}") from None


async def protect(conn: ControlConnection, protection: MessageProtection) -> None:
    """Put the wrapping pumps between ``conn``'s users and the gateway."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    inner_reader, inner_writer = await asyncio.open_connection(sock=theirs)
    network_reader, network_writer = conn.reader, conn.writer
    early = bytes(conn._buffer)  # wrapped bytes that came with the level answer
    conn._buffer.clear()

    async def up() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await inner_reader.read(protection.max_chunk):
                network_writer.write(protection.seal(data))
                await network_writer.drain()
            if network_writer.can_write_eof():
                network_writer.write_eof()

    async def down() -> None:
        deframer = Deframer()
        try:
            raw = early
            while True:
                plain = protection.open_all(deframer, raw)
                if plain:
                    inner_writer.write(plain)
                    await inner_writer.drain()
                raw = await network_reader.read(_READ)
                if not raw:
                    break
        except (ConnectionError, OSError):
            pass
        finally:  # the gateway's end (or garbage from it) ends what our users read
            with contextlib.suppress(OSError):
                inner_writer.write_eof()

    conn.reader, conn.writer = reader, writer
    conn.network = network_writer
    conn.protection = protection
    conn.pumps = (
        asyncio.create_task(up(), name="gss-up"),
        asyncio.create_task(down(), name="gss-down"),
    )
    conn.inner_writer = inner_writer
