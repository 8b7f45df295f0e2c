"""Tiny servers for the lab's server nodes (``python -m netnslab.testserver``).

``--http HOST:PORT``
    HTTP/1.0: ``GET /`` answers ``hello from NAME`` plus the client's address as seen by
    the server (so a scenario can prove the connection came from the gateway);
    ``GET /bytes/N`` answers N bytes of data.
``--stream HOST:PORT``
    A connection receives a line ``stream from NAME`` and then 1 KiB every 20 ms for up to
    ``--stream-seconds`` seconds: a transfer that is still going when a scenario breaks
    the link.
``--udp HOST:PORT``
    A UDP echo: each datagram is answered with a first line ``echo from NAME; peer HOST
    PORT`` (the sender as this server saw it) followed by the datagram's data, so a
    scenario can tell which address and port the gateway relayed from.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import Any, cast

from netnslab.services import split_endpoint

MAX_BYTES = 16 * 1024 * 1024
CHUNK = b"x" * 1024


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
    peer = writer.get_extra_info("peername")
    try:
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        line = request.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        path = parts[1] if len(parts) >= 2 else "/"
        if path.startswith("/bytes/") and path[7:].isdigit():
            size = min(int(path[7:]), MAX_BYTES)
            body = b"b" * size
        elif path == "/":
            body = f"hello from {name}\nclient {peer[0]}\n".encode()
        else:
            body = b"not found\n"
        status = "200 OK" if body != b"not found\n" else "404 Not Found"
        head = (
            f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("ascii") + body)
        await writer.drain()
    except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str, seconds: float
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        writer.write(f"stream from {name}\n".encode())
        while loop.time() < deadline:
            writer.write(CHUNK)
            await asyncio.wait_for(writer.drain(), timeout=seconds)
            await asyncio.sleep(0.02)
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(echo_reply(self.name, str(addr[0]), int(addr[1]), data), addr)


def echo_reply(name: str, host: str, port: int, data: bytes) -> bytes:
    """What the UDP echo answers to ``data`` from ``host``:``port``."""
    return f"echo from {name}; peer {host} {port}\n".encode() + data


def parse_echo_reply(reply: bytes) -> tuple[str, str, int, bytes] | None:
    """(server name, peer host, peer port, echoed data) of an echo reply, or None."""
    head, newline, data = reply.partition(b"\n")
    words = head.decode("latin-1").split()
    if not newline or len(words) != 6 or words[:2] != ["echo", "from"] or words[3] != "peer":
        return None
    if not words[5].isdigit():
        return None
    return words[2].rstrip(";"), words[4], int(words[5]), data


async def serve(
    name: str, http: list[str], stream: list[str], stream_seconds: float, udp: Sequence[str] = ()
) -> None:
    """Run the servers until SIGTERM or SIGINT."""
    servers: list[asyncio.Server] = []
    transports: list[asyncio.DatagramTransport] = []
    loop = asyncio.get_running_loop()
    for endpoint in udp:
        host, port = split_endpoint(endpoint)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpEcho(name), local_addr=(host, port)
        )
        transports.append(transport)
    for endpoint in http:
        host, port = split_endpoint(endpoint)
        servers.append(
            await asyncio.start_server(
                lambda r, w: _http(r, w, name), host, port, reuse_address=True
            )
        )
    for endpoint in stream:
        host, port = split_endpoint(endpoint)
        servers.append(
            await asyncio.start_server(
                lambda r, w: _stream(r, w, name, stream_seconds), host, port, reuse_address=True
            )
        )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"testserver {name}: http {http} stream {stream} udp {list(udp)}", flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    for transport in transports:
        transport.close()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="netnslab.testserver")
    parser.add_argument("--name", required=True)
    parser.add_argument("--http", action="append", default=[])
    parser.add_argument("--stream", action="append", default=[])
    parser.add_argument("--udp", action="append", default=[])
    parser.add_argument("--stream-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.name, args.http, args.stream, args.stream_seconds, args.udp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
