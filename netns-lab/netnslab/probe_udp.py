"""UDP actions of `netnslab.probe`: associations through the gateway, and plain multicast.

``udp-echo``       UDP ASSOCIATE (options: --aa --tunnel --use-client-port --local-port
                   --real-family), send ``--count`` datagrams to DEST:PORT (a UDP echo), and
                   report each reply's source as the client saw it and what the echo saw.
``pysocks-udp``    the same exchange with a third-party client (PySocks, rdns).
``mcast-recv``     associate with INTERFACE REQUEST, MULTICAST JOIN ``--group``:PORT, print
                   ``{"event": "joined"}``, collect ``--count`` datagrams, end the association.
``mcast-send``     no SOCKS: send ``--count`` datagrams to ``--group``:PORT out of
                   ``--ifname`` with hop limit ``--hops``, from ``--source``.
``udp-hold``       associate, prove the relay works with one echo, print
                   ``{"event": "associated"}``, then wait for the gateway to end the TCP
                   control connection and report how.

Every wait is bounded by ``--timeout``; every send loop by ``--count``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

from netnslab.probe_kit import describe, emit, parse_address, split_endpoint
from netnslab.testserver import parse_echo_reply

SEND_TRIES = 3  # a lost datagram is retried this often before the exchange fails


async def _associate(args: argparse.Namespace, **options: Any) -> Any:
    from translator.client import SocksClient

    host, port = split_endpoint(args.proxy)
    client = await SocksClient.open(host, port)
    try:
        return await client.udp_associate(**options)
    except BaseException:
        await client.close()
        raise


def _echo_fields(data: bytes) -> dict[str, Any]:
    parsed = parse_echo_reply(data)
    if parsed is None:
        return {"echo": None, "data": data.decode("latin-1")}
    server, host, port, echoed = parsed
    return {"echo": {"server": server, "peer": host, "peer_port": port}, "data": echoed.decode()}


async def _exchange(udp: Any, dest: Any, port: int, payload: bytes, limit: float) -> Any:
    """Send ``payload`` and return the reply that echoes it (retried, bounded)."""
    per_try = limit / SEND_TRIES
    for _ in range(SEND_TRIES):
        await udp.send(dest, port, payload)
        deadline = time.monotonic() + per_try
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                got = await udp.recv(timeout=remaining)
            except TimeoutError:
                break
            if got.data.endswith(b"\n" + payload):
                return got
    raise TimeoutError(f"no echo of {payload!r} in {limit}s")


async def act_udp_echo(args: argparse.Namespace) -> dict[str, Any]:
    """UDP ASSOCIATE, then ``--count`` echoes with DEST:PORT."""
    udp = await _associate(
        args,
        aa=args.aa,
        tunnel=args.tunnel,
        use_client_port=args.use_client_port,
        real_family=args.real_family,
        port=args.local_port,
    )
    try:
        dest = parse_address(args.dest)
        replies = []
        for index in range(args.count):
            payload = f"{args.line} {index}".encode()
            got = await _exchange(udp, dest, args.port, payload, args.timeout)
            replies.append(
                {"source": describe(got.address), "port": got.port, **_echo_fields(got.data)}
            )
        local_port = None if args.tunnel else udp.local_port
        return {
            "relay": describe(udp.reply.address),
            "relay_port": udp.reply.port,
            "flag": udp.reply.flag,
            "local_port": local_port,
            "replies": replies,
        }
    finally:
        await udp.close()


def _pysocks_exchange(args: argparse.Namespace) -> dict[str, Any]:
    import socks

    host, port = split_endpoint(args.proxy)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socks.socksocket(family, socket.SOCK_DGRAM)
    try:
        sock.set_proxy(socks.SOCKS5, host, port, rdns=True)
        sock.settimeout(args.timeout / SEND_TRIES)
        payload = args.line.encode()
        for _ in range(SEND_TRIES):
            sock.sendto(payload, (args.dest, args.port))
            try:
                data, (source, source_port) = sock.recvfrom(4096)
            except TimeoutError:
                continue
            if isinstance(source, bytes):  # PySocks hands a domain back as bytes
                source = source.decode("ascii", "replace")
            return {"source": str(source), "port": source_port, **_echo_fields(data)}
        raise TimeoutError(f"no echo through PySocks in {args.timeout}s")
    finally:
        sock.close()


async def act_pysocks_udp(args: argparse.Namespace) -> dict[str, Any]:
    """One echo through PySocks' own UDP ASSOCIATE (socksocket(SOCK_DGRAM), rdns)."""
    return await asyncio.to_thread(_pysocks_exchange, args)


async def act_mcast_recv(args: argparse.Namespace) -> dict[str, Any]:
    """Join a group through the gateway, receive ``--count`` datagrams, end the association."""
    udp = await _associate(args, interface_request=True, tunnel=args.tunnel)
    received: list[dict[str, Any]] = []
    try:
        group = parse_address(args.group)
        reply = await udp.join(group, args.port)
        emit(event="joined", group=describe(reply.address), port=reply.port)
        deadline = time.monotonic() + args.timeout
        while len(received) < args.count and (remaining := deadline - time.monotonic()) > 0:
            try:
                got = await udp.recv(timeout=remaining)
            except TimeoutError:
                break
            received.append(
                {"source": describe(got.address), "port": got.port, "data": got.data.decode()}
            )
    finally:
        await udp.close()
    return {"received": received}


def _multicast_sender(
    group: ipaddress.IPv4Address | ipaddress.IPv6Address, args: argparse.Namespace
) -> socket.socket:
    ifindex = socket.if_nametoindex(args.ifname)
    if group.version == 6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, args.hops)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        mreqn = struct.pack("=4s4si", bytes(4), bytes(4), ifindex)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, args.hops)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    sock.bind((args.source, 0))
    return sock


async def act_mcast_send(args: argparse.Namespace) -> dict[str, Any]:
    """Send ``--count`` datagrams to a group on one interface (no SOCKS involved)."""
    group = ipaddress.ip_address(args.group)
    if not group.is_multicast:
        raise ValueError(f"{group} is not a multicast group")
    with _multicast_sender(group, args) as sock:
        local = sock.getsockname()
        for index in range(args.count):
            sock.sendto(f"{args.line} {index}".encode(), (str(group), args.port))
            await asyncio.sleep(args.interval)
    return {"sent": args.count, "local": [local[0], local[1]]}


async def act_udp_hold(args: argparse.Namespace) -> dict[str, Any]:
    """Associate, echo once, then wait until the gateway ends the control connection."""
    udp = await _associate(args)
    try:
        got = await _exchange(udp, parse_address(args.dest), args.port, b"before", 6.0)
        emit(
            event="associated",
            relay=describe(udp.reply.address),
            relay_port=udp.reply.port,
            echo=_echo_fields(got.data)["echo"],
        )
        reader = udp.client.reader
        started = time.monotonic()
        ended = "timeout"
        while time.monotonic() - started < args.timeout:
            if reader.exception() is not None:
                ended = f"error: {reader.exception()!r}"
                break
            if reader.at_eof():
                ended = "eof"
                break
            await asyncio.sleep(0.05)
        return {"ended": ended, "waited": time.monotonic() - started}
    finally:
        await udp.close()


UDP_ACTIONS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]] = {
    "udp-echo": act_udp_echo,
    "pysocks-udp": act_pysocks_udp,
    "mcast-recv": act_mcast_recv,
    "mcast-send": act_mcast_send,
    "udp-hold": act_udp_hold,
}


def add_udp_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags only the UDP actions use."""
    parser.add_argument("--tunnel", action="store_true", help="UDP over the TCP connection")
    parser.add_argument("--use-client-port", action="store_true", help="FLAG X'04'")
    parser.add_argument("--local-port", type=int, default=0, help="the client's UDP port")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--group", help="multicast group")
    parser.add_argument("--ifname", help="interface to send a group's datagrams out of")
    parser.add_argument("--source", default="", help="address to send group datagrams from")
    parser.add_argument("--hops", type=int, default=1, help="multicast TTL / hop limit")
    parser.add_argument("--interval", type=float, default=0.05)
