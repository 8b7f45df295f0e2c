"""Sockets of the transparent front: TPROXY listeners, original destinations, spoofed replies.

TPROXY hands the gateway packets addressed to pool addresses that are not configured on any
interface. The listeners need ``IP_TRANSPARENT`` (CAP_NET_ADMIN) for the kernel to assign
such packets to them; an accepted TCP socket then carries the client's original destination
as its own address, while a UDP listener learns it per datagram from the ``IP_ORIGDSTADDR``
control message. TCP from apps on the gateway host is REDIRECTed instead (nat output), so
its original destination comes from conntrack (``SO_ORIGINAL_DST``). UDP replies must come
from the address and port the client sent to, so they leave through a transparent socket
bound to that non-local pool address. Refused UDP flows are answered with ICMP destination
unreachable from a raw socket (CAP_NET_RAW), quoting the client's datagram headers so its
kernel reports the error on the right socket. All sockets are plain non-blocking sockets.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
from ipaddress import IPv4Address

log = logging.getLogger(__name__)

SOL_IP = 0
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = 20
SO_ORIGINAL_DST = 80
SOL_RAW = 255
ICMP_FILTER = 1
SOCKADDR_IN_LEN = 16
LISTEN_BACKLOG = 1024

ICMP_DEST_UNREACH = 3
ICMP_HOST_UNREACH = 1
ICMP_PORT_UNREACH = 3
ICMP_PKT_FILTERED = 13  # communication administratively prohibited
_ORIGDST_SPACE = socket.CMSG_SPACE(SOCKADDR_IN_LEN)


class MissingDestination(OSError, ValueError):
    """The original destination of a datagram or connection is not known.

    Both an OSError (like the socket errors of the same calls) and a ValueError.
    """


def _parse_sockaddr_in(raw: bytes) -> tuple[IPv4Address, int]:
    if len(raw) < 8:
        raise MissingDestination(f"short sockaddr_in ({len(raw)} octets)")
    family = struct.unpack_from("=H", raw)[0]
    if family != socket.AF_INET:
        raise MissingDestination(f"sockaddr of family {family}, not AF_INET")
    port = struct.unpack_from("!H", raw, 2)[0]
    return IPv4Address(raw[4:8]), port


def _set_transparent(sock: socket.socket) -> None:
    try:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    except PermissionError as exc:
        raise PermissionError(
            exc.errno,
            "IP_TRANSPARENT needs CAP_NET_ADMIN: run the gateway as root or grant it "
            "the capability (e.g. AmbientCapabilities=CAP_NET_ADMIN)",
        ) from exc


def transparent_listener(host: str, port: int, kind: int) -> socket.socket:
    """A non-blocking IPv4 TPROXY listener: TCP listening, or UDP with IP_RECVORIGDSTADDR.

    Port 0 binds any free port (read it back with getsockname). PermissionError without
    CAP_NET_ADMIN.
    """
    if kind not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        raise ValueError(f"kind must be SOCK_STREAM or SOCK_DGRAM, not {kind!r}")
    sock = socket.socket(socket.AF_INET, kind)
    try:
        _set_transparent(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if kind == socket.SOCK_DGRAM:
            sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def original_destination(conn: socket.socket) -> tuple[IPv4Address, int, bool]:
    """Where an accepted connection was going, and whether it was REDIRECTed (a local app).

    A TPROXYed connection's own address is the original destination. One that shows the
    listener's loopback address was REDIRECTed, and conntrack knows the original
    (SO_ORIGINAL_DST). MissingDestination if it was neither (a direct connection).
    """
    host, port = conn.getsockname()[:2]
    local = IPv4Address(host)
    if not local.is_loopback:
        return local, port, False
    try:
        raw = conn.getsockopt(SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_LEN)
    except OSError as exc:
        raise MissingDestination(f"no original destination for {host}:{port}: {exc}") from exc
    address, original_port = _parse_sockaddr_in(raw)
    if (address, original_port) == (local, port):
        raise MissingDestination(f"connection to {host}:{port} was not redirected")
    return address, original_port, True


def recv_with_destination(
    sock: socket.socket, bufsize: int = 65535
) -> tuple[bytes, tuple[str, int], tuple[IPv4Address, int]]:
    """One datagram from a UDP TPROXY listener: (data, source, original destination).

    Octets beyond ``bufsize`` are discarded. Raises BlockingIOError when nothing is
    queued and MissingDestination if the IP_ORIGDSTADDR control message is absent.
    """
    data, ancdata, _flags, source = sock.recvmsg(bufsize, _ORIGDST_SPACE)
    for level, kind, payload in ancdata:
        if level == SOL_IP and kind == IP_ORIGDSTADDR:
            return data, (source[0], source[1]), _parse_sockaddr_in(payload)
    raise MissingDestination(
        f"datagram from {source[0]}:{source[1]} without IP_ORIGDSTADDR "
        "(not a TPROXY listener, or IP_RECVORIGDSTADDR not set)"
    )


def reply_socket(source: IPv4Address, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to a (non-local) pool address, for replies to clients.

    It is not connected: the prerouting rules send every datagram from clients to the
    listener (TPROXY ignores unconnected sockets when it looks for established ones), so
    this socket receives nothing and is only used with sendto().
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        _set_transparent(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(source), port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def unreachable_packet(
    client: tuple[str, int], destination: tuple[IPv4Address, int], payload_len: int, code: int
) -> bytes:
    """ICMP destination unreachable quoting the client's UDP datagram (IPv4 + UDP header)."""
    udp_len = min(8 + max(payload_len, 0), 0xFFFF - 20)
    client_ip = socket.inet_aton(client[0])
    dest_ip = destination[0].packed
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, socket.IPPROTO_UDP, 0, client_ip, dest_ip
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    udp = struct.pack("!HHHH", client[1], destination[1], udp_len, 0)
    body = struct.pack("!BBHI", ICMP_DEST_UNREACH, code, 0, 0) + header + udp
    return body[:2] + struct.pack("!H", _checksum(body)) + body[4:]


class IcmpSender:
    """Sends ICMP destination unreachable to clients (needs CAP_NET_RAW; else unavailable)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except OSError as exc:
            level = logging.DEBUG if exc.errno in (errno.EPERM, errno.EACCES) else logging.INFO
            log.log(level, "ICMP errors to clients unavailable: %s", exc)
        else:
            sock.setblocking(False)
            # A raw ICMP socket receives a copy of every ICMP packet; this one only sends,
            # so it filters out all 32 types.
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", 0xFFFFFFFF))
            self._sock = sock

    @property
    def available(self) -> bool:
        return self._sock is not None

    def unreachable(
        self,
        client: tuple[str, int],
        destination: tuple[IPv4Address, int],
        payload_len: int,
        code: int,
    ) -> None:
        """Tell ``client`` its datagram to ``destination`` is refused (ICMP type 3, ``code``).

        Linux reports codes 3 (port) and 13 (administratively prohibited) on a connected UDP
        socket as ECONNREFUSED / EHOSTUNREACH; code 1 (host) is a soft error there, seen only
        by sockets with IP_RECVERR. Never raises; failures are logged at debug level.
        """
        if self._sock is None:
            return
        try:
            packet = unreachable_packet(client, destination, payload_len, code)
            self._sock.sendto(packet, (client[0], 0))
        except (OSError, ValueError, struct.error) as exc:
            log.debug("ICMP unreachable to %s:%s failed: %s", client[0], client[1], exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
