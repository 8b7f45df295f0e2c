"""An independent SOCKS5 client with the GSS-API method (RFC 1928 + RFC 1961), written from
the RFCs on the ``gssapi`` package, to test the gateway from the outside. It shares no
code with the project on purpose (nothing from ``translator`` or ``addrmap``): a bug in
the gateway's framing must not be mirrored here.

    with GssSocksClient(("127.0.0.1", port), ccache) as client:
        client.greet()                 # method X'01' only
        client.establish_context()     # section 3: 01 01 len token, until complete
        client.negotiate_level(2)      # section 4: 01 02 len wrap(level)
        client.connect("web4.test", 80)
        client.sendall(b"...")         # section 5: 01 03 len wrap(data) (level 1/2)
        body = client.recv_until_eof()

Level 0 (no per-message protection after the subnegotiation) is the Dante/curl
extension. Blocking sockets with timeouts; every Kerberos use needs KRB5_CONFIG set to a
test realm (see tests/krb5realm.py).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import gssapi

SOCKS_VERSION, METHOD_GSSAPI, NO_ACCEPTABLE_METHOD = 5, 0x01, 0xFF
CMD_CONNECT, CMD_UDP_ASSOCIATE = 0x01, 0x03
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04
GSS_VERSION = 0x01
MTYP_CONTEXT, MTYP_LEVEL, MTYP_DATA, MTYP_ABORT = 0x01, 0x02, 0x03, 0xFF
MAX_TOKEN = 0xFFFF
DEFAULT_SERVICE = "rcmd@localhost"
Address = tuple[str, int]


class GatewayAbort(Exception):
    """The server sent 01 FF, or closed the connection, during the GSS-API exchange."""


class NoAcceptableMethod(Exception):
    """The server answered the greeting with X'FF'."""


class SocksFailure(Exception):
    """A SOCKS reply with REP other than succeeded."""

    def __init__(self, rep: int) -> None:
        super().__init__(f"SOCKS reply {rep:#04x}")
        self.rep = rep


class ProtocolError(Exception):
    """The server sent something neither RFC allows here."""


class Context(gssapi.SecurityContext):
    """A security context whose step() raises at once: python-gssapi by default returns
    an error token and defers the exception to the next use of the context."""


# After the class statement: gssapi's metaclass sets it to True in every class body.
Context.__DEFER_STEP_ERRORS__ = False  # type: ignore[attr-defined]


def service_name(service: str = DEFAULT_SERVICE) -> gssapi.Name:
    """The gateway's name as a host-based service, "service@host" (RFC 1961 3.1)."""
    return gssapi.Name(service, gssapi.NameType.hostbased_service)


def initiator_credentials(ccache: Path | str) -> gssapi.Credentials:
    """The tickets in the FILE ccache ``ccache`` (never the process's default cache)."""
    return gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"})


def init_context(
    ccache: Path | str, service: str = DEFAULT_SERVICE, udp: bool = False
) -> gssapi.SecurityContext:
    """An initiator context with the flags RFC 1961 3.2 requires (no sequence for UDP)."""
    flag = gssapi.RequirementFlag
    flags = flag.mutual_authentication | flag.replay_detection | flag.delegate_to_peer
    if not udp:
        flags |= flag.out_of_sequence_detection
    creds = initiator_credentials(ccache)
    return Context(name=service_name(service), creds=creds, flags=flags, usage="initiate")


def prebuilt_first_token(
    ccache: Path | str, service: str = DEFAULT_SERVICE, udp: bool = False
) -> tuple[gssapi.SecurityContext, bytes]:
    """A context and its first token built now, to send later (an expired-ticket test)."""
    context = init_context(ccache, service, udp)
    token = context.step()
    assert token is not None
    return context, token


def socks_address(host: str, port: int) -> bytes:
    """ATYP, DST.ADDR, DST.PORT of RFC 1928 section 4 for an IP literal or a domain."""
    try:
        address = ip_address(host)
    except ValueError:
        encoded = host.encode("idna")
        return bytes([ATYP_DOMAIN, len(encoded)]) + encoded + struct.pack("!H", port)
    atyp = ATYP_IPV4 if isinstance(address, IPv4Address) else ATYP_IPV6
    return bytes([atyp]) + address.packed + struct.pack("!H", port)


def parse_address(data: bytes) -> tuple[Address, int]:
    """(host, port) from ATYP ADDR PORT at the start of ``data``, and its length."""
    atyp = data[0]
    if atyp == ATYP_DOMAIN:
        end = 2 + data[1]
        host = data[2:end].decode("idna")
    elif atyp in (ATYP_IPV4, ATYP_IPV6):
        end = 5 if atyp == ATYP_IPV4 else 17
        host = str(ip_address(data[1:end]))
    else:
        raise ProtocolError(f"unknown ATYP {atyp:#04x}")
    if len(data) < end + 2:
        raise ProtocolError("truncated address")
    (port,) = struct.unpack("!H", data[end : end + 2])
    return (host, port), end + 2


def frame(mtyp: int, token: bytes) -> bytes:
    """ver=1, mtyp, 2-octet big-endian length, token (RFC 1961 3.4, 4.3, 5)."""
    if len(token) > MAX_TOKEN:
        raise ValueError(f"token of {len(token)} octets does not fit a 16-bit length")
    return bytes([GSS_VERSION, mtyp]) + struct.pack("!H", len(token)) + token


def _exactly(read: Callable[[int], bytes], size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = read(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} octets")
        data += chunk
    return data


class GssSocksClient:
    """One TCP connection to the gateway, driven step by step so tests can stop or
    misbehave at any point."""

    def __init__(
        self,
        proxy: Address,
        ccache: Path | str | None = None,
        service: str = DEFAULT_SERVICE,
        udp: bool = False,
        timeout: float = 5.0,
    ) -> None:
        self.proxy = proxy
        self.ccache = ccache
        self.service = service
        self.udp = udp
        self.timeout = timeout
        self.sock = socket.create_connection(proxy, timeout=timeout)
        self.context: gssapi.SecurityContext | None = None
        self.level: int | None = None
        self._plain = b""  # unwrapped bytes not yet read

    def __enter__(self) -> GssSocksClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- raw socket -----------------------------------------------------------------

    def _read_frame(self, mtyp: int) -> bytes | None:
        """The token of the next ``01 mtyp len token``; None at EOF before it."""
        first = self.sock.recv(1)
        if not first:
            return None
        head = first + _exactly(self.sock.recv, 1)
        if head == bytes([GSS_VERSION, MTYP_ABORT]):
            raise GatewayAbort("the server sent 01 FF")
        if head != bytes([GSS_VERSION, mtyp]):
            raise ProtocolError(f"expected 01 {mtyp:02x}, got {head.hex(' ')}")
        (length,) = struct.unpack("!H", _exactly(self.sock.recv, 2))
        return _exactly(self.sock.recv, length)

    def read_gss_message(self, mtyp: int) -> bytes:
        """The token of the next message of type ``mtyp`` in the GSS-API exchange."""
        try:
            token = self._read_frame(mtyp)
        except (EOFError, ConnectionResetError) as error:
            raise GatewayAbort(f"the server closed the connection: {error}") from error
        if token is None:
            raise GatewayAbort("the server closed the connection")
        return token

    # -- RFC 1928 greeting and RFC 1961 section 3 ----------------------------------------

    def greet(self, methods: bytes = bytes([METHOD_GSSAPI])) -> int:
        """Offer ``methods`` (X'01' only by default); the method chosen."""
        self.sock.sendall(bytes([SOCKS_VERSION, len(methods)]) + methods)
        version, method = _exactly(self.sock.recv, 2)
        if version != SOCKS_VERSION:
            raise ProtocolError(f"greeting reply version {version}")
        if method == NO_ACCEPTABLE_METHOD:
            raise NoAcceptableMethod("the server accepts none of the methods offered")
        return method

    def send_context_token(self, token: bytes) -> None:
        """Send one context message (01 01 len token), any token: a negative-test hook."""
        self.sock.sendall(frame(MTYP_CONTEXT, token))

    def send_context_length(self, length: int) -> None:
        """A context message header claiming ``length`` octets, then that many octets
        (random): for a server bound on token size."""
        header = bytes([GSS_VERSION, MTYP_CONTEXT]) + struct.pack("!H", length)
        self.sock.sendall(header + os.urandom(length))

    def establish_context(
        self,
        context: gssapi.SecurityContext | None = None,
        first_token: bytes | None = None,
    ) -> gssapi.SecurityContext:
        """Run the context loop of section 3 until both sides are complete. ``context``
        and ``first_token`` come from :func:`prebuilt_first_token` when built earlier."""
        if context is None:
            if self.ccache is None:
                raise ValueError("no ccache and no prebuilt context")
            context = init_context(self.ccache, self.service, self.udp)
        token = first_token if first_token is not None else context.step()
        self.context = context
        while True:
            self.send_context_token(token or b"")
            reply = self.read_gss_message(MTYP_CONTEXT)
            if context.complete:
                return context  # the server's confirmation (a token, maybe empty)
            token = context.step(reply)
            if context.complete and not token:
                return context

    # -- section 4: protection level -------------------------------------------------

    def negotiate_level(self, level: int, allow_other: bool = False) -> int:
        """Ask for ``level`` (0-3); the level the server chose, which must be ``level``
        unless ``allow_other``."""
        context = self._require_context()
        wrapped = context.wrap(bytes([level]), False).message
        self.sock.sendall(frame(MTYP_LEVEL, wrapped))
        reply = context.unwrap(self.read_gss_message(MTYP_LEVEL)).message
        if len(reply) != 1:
            raise ProtocolError(f"protection level of {len(reply)} octets")
        chosen = reply[0]
        if chosen != level and not allow_other:
            self.close()  # section 4.4: an unacceptable level closes the connection
            raise ProtocolError(f"asked for level {level}, the server chose {chosen}")
        self.level = chosen
        return chosen

    # -- section 5: the protected stream ---------------------------------------------

    def _require_context(self) -> gssapi.SecurityContext:
        if self.context is None:
            raise RuntimeError("no security context yet")
        return self.context

    @property
    def _protected(self) -> bool:
        return self.level in (1, 2, 3)

    @property
    def _confidential(self) -> bool:
        return self.level != 1  # 2 always; 3 is ours to choose: encrypt

    def wrap_message(self, data: bytes) -> bytes:
        """One ``01 03 len token`` for ``data`` (which must fit one token)."""
        return frame(MTYP_DATA, self._require_context().wrap(data, self._confidential).message)

    def sendall(self, data: bytes) -> None:
        """Send ``data`` on the stream: wrapped in chunks that fit 65535 octets each at
        level 1/2/3, plain at level 0."""
        if not self._protected:
            self.sock.sendall(data)
            return
        limit = self._require_context().get_wrap_size_limit(MAX_TOKEN, self._confidential)
        for start in range(0, len(data), limit):
            self.sock.sendall(self.wrap_message(data[start : start + limit]))

    def send_garbage_encapsulated(self, length: int = 64) -> None:
        """An ``01 03 len random`` message that no unwrap accepts: a negative-test hook."""
        self.sock.sendall(frame(MTYP_DATA, os.urandom(length)))

    def recv(self, size: int = 65536) -> bytes:
        """Up to ``size`` bytes of the stream; b"" at EOF."""
        if not self._protected:
            return self.sock.recv(size)
        while not self._plain:
            token = self._read_frame(MTYP_DATA)
            if token is None:
                return b""
            unwrapped = self._require_context().unwrap(token)
            if self.level == 2 and not unwrapped.encrypted:
                raise ProtocolError("a level 2 message arrived without confidentiality")
            self._plain = unwrapped.message
        data, self._plain = self._plain[:size], self._plain[size:]
        return data

    def recv_exact(self, size: int) -> bytes:
        return _exactly(self.recv, size)

    def recv_until_eof(self) -> bytes:
        data = b""
        while chunk := self.recv():
            data += chunk
        return data

    # -- RFC 1928 requests ----------------------------------------------------------

    def request(self, command: int, host: str, port: int) -> Address:
        """Send a SOCKS request on the (protected) stream; BND.ADDR, BND.PORT of a
        success reply, else :class:`SocksFailure`."""
        self.sendall(bytes([SOCKS_VERSION, command, 0]) + socks_address(host, port))
        version, rep, _reserved, atyp = self.recv_exact(4)
        if version != SOCKS_VERSION:
            raise ProtocolError(f"reply version {version}")
        if rep != 0:
            raise SocksFailure(rep)
        size = {ATYP_IPV4: 4, ATYP_IPV6: 16}.get(atyp)
        tail = self.recv_exact(size) if size else (n := self.recv_exact(1)) + self.recv_exact(n[0])
        bound, _ = parse_address(bytes([atyp]) + tail + self.recv_exact(2))
        return bound

    def connect(self, host: str, port: int) -> Address:  # BND.ADDR, BND.PORT
        return self.request(CMD_CONNECT, host, port)

    def udp_associate(self, announce: bool = False) -> UdpRelay:
        """UDP ASSOCIATE from a new UDP socket (its address in DST when ``announce``,
        else zeros); a :class:`UdpRelay` sending to the relay endpoint replied."""
        family = self.sock.family
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((self.sock.getsockname()[0], 0))
        udp.settimeout(self.timeout)
        any_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
        host, port = udp.getsockname()[:2] if announce else (any_host, 0)
        try:
            relay_host, relay_port = self.request(CMD_UDP_ASSOCIATE, host, port)
        except BaseException:
            udp.close()
            raise
        if ip_address(relay_host).is_unspecified:
            relay_host = self.proxy[0]
        return UdpRelay(self, udp, (relay_host, relay_port))


class UdpRelay:
    """Datagrams through the gateway's UDP relay: RFC 1928 section 7 header + data, as
    one ``01 03 len token`` at level 1/2/3 (RFC 1961 section 5), plain at level 0."""

    def __init__(self, control: GssSocksClient, sock: socket.socket, relay: Address) -> None:
        self.control = control
        self.sock = sock
        self.relay = relay

    def close(self) -> None:
        self.sock.close()

    def sendto(self, data: bytes, destination: Address) -> None:
        datagram = b"\x00\x00\x00" + socks_address(*destination) + data
        if self.control._protected:
            datagram = self.control.wrap_message(datagram)
        self.sock.sendto(datagram, self.relay)

    def recvfrom(self) -> tuple[bytes, Address]:
        """The next datagram's data and the source the gateway names in its header."""
        datagram, _ = self.sock.recvfrom(MAX_TOKEN + 4)
        if self.control._protected:
            head, token = datagram[:4], datagram[4:]
            if len(head) < 4 or frame(MTYP_DATA, token)[:4] != head:
                raise ProtocolError(f"not 01 03 len token: {head.hex(' ')}, {len(token)} octets")
            datagram = self.control._require_context().unwrap(token).message
        if datagram[:3] != b"\x00\x00\x00":
            raise ProtocolError(f"RSV/FRAG not zero: {datagram[:3].hex(' ')}")
        source, used = parse_address(datagram[3:])
        return datagram[3 + used :], source


def negotiated_client(
    proxy: Address,
    ccache: Path | str,
    level: int = 1,
    service: str = DEFAULT_SERVICE,
    udp: bool = False,
    timeout: float = 5.0,
) -> GssSocksClient:
    """A client past the greeting, the context and the level subnegotiation."""
    client = GssSocksClient(proxy, ccache, service, udp, timeout)
    try:
        client.greet()
        client.establish_context()
        client.negotiate_level(level)
    except BaseException:
        client.close()
        raise
    return client


def fetch_http(
    proxy: Address,
    ccache: Path | str,
    host: str,
    port: int,
    path: str = "/",
    level: int = 1,
    service: str = DEFAULT_SERVICE,
    timeout: float = 5.0,
) -> bytes:
    """GET ``path`` from host:port through the gateway; the whole response."""
    with negotiated_client(proxy, ccache, level, service, timeout=timeout) as client:
        client.connect(host, port)
        name = f"[{host}]" if ":" in host else host
        client.sendall(f"GET {path} HTTP/1.0\r\nHost: {name}:{port}\r\n\r\n".encode())
        return client.recv_until_eof()
