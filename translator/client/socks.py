"""An asyncio SOCKS5 client with the socks64 extensions.

    client = await SocksClient.open("127.0.0.1", 1080)
    realid = await client.associate("v6.lab.test")           # an AddressId
    address = await client.associate("v6.lab.test", pref=Atyp.IPV6)  # forward DNS
    stream = await client.connect(realid, 80)                # the control phase ends here
    stream.writer.write(b"GET / HTTP/1.0\\r\\n\\r\\n")

The same control connection carries any number of ADDRESS ASSOCIATE requests before its
final CONNECT or BIND (profile 5). Every byte comes from ``translator.wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from translator.wire import (
    FLAG_BIND_MULTI,
    FLAG_BIND_PORT,
    FLAG_REAL_FAMILY,
    FLAG_UDP_INTERFACE_REQUEST,
    FLAG_UDP_TUNNEL,
    FLAG_UDP_USECLIENTSPORT,
    Address,
    AddressId,
    Atyp,
    Command,
    Greeting,
    Method,
    ProtectionLevel,
    Rep,
    Reply,
    Request,
    UserPassRequest,
    decode_method_selection,
    decode_reply,
    decode_userpass_reply,
)

from .connection import ControlConnection, SocksReplyError
from .gssapi import GssOptions, authenticate
from .udp import UdpSession, client_udp_socket

__all__ = [
    "Address",
    "AddressId",
    "GssOptions",
    "Listener",
    "SocksClient",
    "SocksReplyError",
    "Stream",
]


@dataclass
class Stream:
    """A relayed connection. ``bound`` is the reply's BND; ``peer`` (BIND) who connected."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    bound: tuple[Address, int]
    peer: tuple[Address, int] | None = None
    reply_flag: int = 0
    control: ControlConnection | None = None  # closes what carries the stream (GSS-API)

    async def close(self) -> None:
        if self.control is not None:
            await self.control.close()
            return
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@dataclass
class Listener:
    """A BIND in progress: ``bound`` is where the peer should connect."""

    client: SocksClient
    bound: tuple[Address, int]
    reply_flag: int = 0
    _accepted: bool = field(default=False, repr=False)

    async def accept(self, timeout: float | None = None) -> Stream:  # noqa: ASYNC109
        """Wait for BIND's second reply: the peer has connected."""
        reply = await asyncio.wait_for(self.client.read_reply(), timeout)
        self._accepted = True
        return self.client.into_stream(reply, peer=(reply.address, reply.port))

    async def close(self) -> None:
        await self.client.close()


class SocksClient(ControlConnection):
    """One negotiated control connection to a SOCKS5 gateway."""

    gss_level: ProtectionLevel | None = None  # the level agreed, after GSS-API

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109
        local_addr: tuple[str, int] | None = None,
        gssapi: GssOptions | None = None,
    ) -> SocksClient:
        """Connect and negotiate; ``local_addr`` picks our source address; ``gssapi``
        authenticates with Kerberos (RFC 1961) instead of a password or nothing."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local_addr), timeout
        )
        client = cls(reader, writer)
        try:
            await asyncio.wait_for(client._negotiate(username, password, gssapi, host), timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def _negotiate(
        self, username: str | None, password: str | None, gss: GssOptions | None, host: str
    ) -> None:
        methods = [Method.NO_AUTH] if username is None else [Method.USERNAME_PASSWORD]
        if gss is not None:
            methods = [Method.GSSAPI]
        self.writer.write(Greeting(tuple(methods)).encode())
        selection = await self._read(decode_method_selection)
        if selection.method == Method.NO_ACCEPTABLE:
            raise SocksReplyError(Rep.NOT_ALLOWED, "gateway accepted none of our methods")
        if selection.method == Method.GSSAPI and gss is not None:
            self.gss_level, _ = await authenticate(self, gss, host)
            return
        if selection.method == Method.USERNAME_PASSWORD:
            assert username is not None and password is not None
            self.writer.write(UserPassRequest(username.encode(), password.encode()).encode())
            result = await self._read(decode_userpass_reply)
            if not result.success:
                raise SocksReplyError(Rep.NOT_ALLOWED, "authentication failed")

    async def read_reply(self) -> Reply:
        reply = await self._read(decode_reply)
        if reply.rep != Rep.SUCCEEDED:
            raise SocksReplyError(reply.rep)
        return reply

    async def request(self, request: Request) -> Reply:
        self.writer.write(request.encode())
        await self.writer.drain()
        return await self.read_reply()

    def into_stream(self, reply: Reply, peer: tuple[Address, int] | None = None) -> Stream:
        """Hand the connection over as a relayed stream (bytes already read go first)."""
        if self._buffer:
            self.reader.feed_data(bytes(self._buffer))  # pushed back for the stream's user
            self._buffer.clear()
        return Stream(
            self.reader, self.writer, (reply.address, reply.port), peer, reply.flag, self
        )

    # -- the extension API -------------------------------------------------------------

    async def associate(
        self, target: Address, pref: int = Atyp.ADDRESS_ID, *, real_family: bool = False
    ) -> Address:
        """Dedicated ADDRESS ASSOCIATE: ``target`` in the form ADR.PREF asks for."""
        flag = FLAG_REAL_FAMILY if real_family else 0
        reply = await self.request(Request(Command.ADDRESS_ASSOCIATE, target, pref & 0xFF, flag))
        return reply.address

    async def resolve(self, name: str, family: int = socket.AF_INET) -> IPv4Address | IPv6Address:
        """Forward DNS through the gateway (ADR.PREF X'01' or X'04')."""
        pref = Atyp.IPV6 if family == socket.AF_INET6 else Atyp.IPV4
        address = await self.associate(name, pref)
        assert isinstance(address, IPv4Address | IPv6Address)
        return address

    async def reverse(self, address: IPv4Address | IPv6Address) -> str:
        """Reverse DNS through the gateway (ADR.PREF X'03')."""
        name = await self.associate(address, Atyp.DOMAIN)
        assert isinstance(name, str)
        return name

    async def connect(
        self, dest: Address, port: int, *, aa: bool = False, real_family: bool = False
    ) -> Stream:
        command = Command.CONNECT_AA if aa else Command.CONNECT
        flag = FLAG_REAL_FAMILY if real_family else 0
        reply = await self.request(Request(command, dest, port, flag))
        return self.into_stream(reply)

    async def bind(
        self,
        dest: Address,
        port: int = 0,
        *,
        aa: bool = False,
        multi: bool = False,
        listen_port: bool = False,
        real_family: bool = False,
    ) -> Listener:
        """BIND: the first reply; ``await listener.accept()`` waits for the second."""
        flag = (
            (FLAG_BIND_MULTI if multi else 0)
            | (FLAG_BIND_PORT if listen_port else 0)
            | (FLAG_REAL_FAMILY if real_family else 0)
        )
        command = Command.BIND_AA if aa else Command.BIND
        reply = await self.request(Request(command, dest, port, flag))
        return Listener(self, (reply.address, reply.port), reply.flag)

    async def udp_associate(
        self,
        *,
        aa: bool = False,
        tunnel: bool = False,
        interface_request: bool = False,
        use_client_port: bool = False,
        real_family: bool = False,
        port: int = 0,
    ) -> UdpSession:
        """UDP ASSOCIATE (UDP+AA with ``aa``). We declare our UDP endpoint, so the gateway
        can send to us before we send (receive first)."""
        flag = (
            (FLAG_UDP_TUNNEL if tunnel else 0)
            | (FLAG_UDP_INTERFACE_REQUEST if interface_request else 0)
            | (FLAG_UDP_USECLIENTSPORT if use_client_port else 0)
            | (FLAG_REAL_FAMILY if real_family else 0)
        )
        sock = None if tunnel else client_udp_socket(self.network, port)
        try:
            declared: Address = IPv4Address(0)
            declared_port = 0
            if sock is not None:
                host, declared_port = sock.getsockname()[:2]
                declared = ip_address(host)
            command = Command.UDP_ASSOCIATE_AA if aa else Command.UDP_ASSOCIATE
            reply = await self.request(Request(command, declared, declared_port, flag))
            session = UdpSession(self, reply, tunnel)
            await session._start(sock)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        return session

    async def __aenter__(self) -> SocksClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


async def open_connection(
    proxy_host: str, proxy_port: int, dest: Address, port: int, **options: Any
) -> Stream:
    """CONNECT through the gateway in one call (``username``/``password``/``aa``...)."""
    auth = {k: options.pop(k) for k in ("username", "password") if k in options}
    client = await SocksClient.open(proxy_host, proxy_port, **auth)
    try:
        return await client.connect(dest, port, **options)
    except BaseException:
        await client.close()
        raise
