"""One client action, run inside a lab node: ``python -m netnslab.probe ACTION ...``.

Scenarios start this with ``ip netns exec`` so the client really lives in the client's
namespace (the test process itself never changes namespace). Output is JSON, one object
per line: progress events (``{"event": ...}``) that a scenario may react to, then a final
``{"ok": true, ...}`` or ``{"ok": false, "error": ..., "rep": N}``.

Addresses on the command line: ``id:HEX`` (an ADDRESS ID, as ``str(AddressId)`` prints),
an IP literal, or a domain name. Endpoints: ``HOST:PORT`` or ``[V6]:PORT``. The UDP and
multicast actions live in `netnslab.probe_udp`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from netnslab.probe_kit import describe, emit, parse_address, split_endpoint
from netnslab.probe_udp import UDP_ACTIONS, add_udp_arguments

__all__ = ["all_actions", "build_parser", "describe", "emit", "parse_address", "split_endpoint"]

HTTP_GET = b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n"


async def _read_all(reader: asyncio.StreamReader, limit: float) -> bytes:
    return await asyncio.wait_for(reader.read(-1), timeout=limit)


async def _http_over(stream: Any, limit: float) -> str:
    stream.writer.write(HTTP_GET)
    await stream.writer.drain()
    data = await _read_all(stream.reader, limit)
    await stream.close()
    return data.decode("latin-1")


async def _open(args: argparse.Namespace) -> Any:
    from translator.client import SocksClient

    host, port = split_endpoint(args.proxy)
    return await SocksClient.open(host, port)


# --- actions ---------------------------------------------------------------------------


async def act_http(args: argparse.Namespace) -> dict[str, Any]:
    """CONNECT (optionally +AA) to DEST:PORT and GET /."""
    client = await _open(args)
    started = time.monotonic()
    stream = await client.connect(parse_address(args.dest), args.port, aa=args.aa)
    body = await _http_over(stream, args.timeout)
    return {
        "bound": describe(stream.bound[0]),
        "bound_port": stream.bound[1],
        "body": body,
        "elapsed": time.monotonic() - started,
    }


async def act_associate(args: argparse.Namespace) -> dict[str, Any]:
    """ADDRESS ASSOCIATE each TARGET with ADR.PREF on one control connection."""
    client = await _open(args)
    results: list[dict[str, Any]] = []
    try:
        for target in args.targets:
            try:
                got = await client.associate(
                    parse_address(target), args.pref, real_family=args.real_family
                )
                results.append({"target": target, "ok": True, "bound": describe(got)})
            except Exception as exc:
                # A failure reply ends the control connection (profile 3): report and stop.
                results.append({"target": target, "ok": False, **_error(exc)})
                break
    finally:
        await client.close()
    return {"results": results}


async def act_id_http(args: argparse.Namespace) -> dict[str, Any]:
    """ADDRESS ASSOCIATE DEST -> ID, CONNECT to the ID on the same control connection and
    again on a fresh one (IDs outlive the connection that created them)."""
    client = await _open(args)
    realid = await client.associate(parse_address(args.dest), args.pref)
    first = await _http_over(await client.connect(realid, args.port), args.timeout)
    again = await _open(args)
    second = await _http_over(await again.connect(realid, args.port), args.timeout)
    return {"id": describe(realid), "body": first, "body_again": second}


async def act_connect_aa(args: argparse.Namespace) -> dict[str, Any]:
    """CONNECT+AA to DEST; then reuse the ID the reply carried on a new connection."""
    client = await _open(args)
    stream = await client.connect(parse_address(args.dest), args.port, aa=True)
    first = await _http_over(stream, args.timeout)
    realid = stream.bound[0]
    again = await _open(args)
    second = await _http_over(await again.connect(realid, args.port), args.timeout)
    return {"bound": describe(realid), "body": first, "body_again": second}


async def act_expect_failure(args: argparse.Namespace) -> dict[str, Any]:
    """CONNECT to DEST:PORT; report the reply code and how long the gateway took."""
    client = await _open(args)
    started = time.monotonic()
    try:
        stream = await client.connect(parse_address(args.dest), args.port)
    except Exception as exc:
        await client.close()
        return {"failed": True, "elapsed": time.monotonic() - started, **_error(exc)}
    await stream.close()
    return {"failed": False, "elapsed": time.monotonic() - started}


async def act_bind(args: argparse.Namespace) -> dict[str, Any]:
    """BIND (optionally MULTI); print the bound endpoint, then accept ``--peers`` peers.

    Each peer must send one line; it is answered with ``welcome N``. Without MULTI only one
    peer is possible. With MULTI the holding connection keeps the listener and one attached
    BIND per peer takes a connection (profile 8).
    """
    from translator.client import SocksClient

    holder = await _open(args)
    listener = await holder.bind(parse_address(args.dest), args.port, multi=args.multi)
    emit(event="bound", bound=describe(listener.bound[0]), port=listener.bound[1])
    host, port = split_endpoint(args.proxy)

    async def one(index: int) -> dict[str, Any]:
        if args.multi:
            attached = await SocksClient.open(host, port)
            waiting = await attached.bind(listener.bound[0], listener.bound[1], multi=True)
        else:
            waiting = listener
        stream = await waiting.accept(timeout=args.timeout)
        line = await asyncio.wait_for(stream.reader.readline(), timeout=args.timeout)
        stream.writer.write(f"welcome {index}\n".encode())
        await stream.writer.drain()
        await stream.close()
        assert stream.peer is not None
        peer = {"peer": describe(stream.peer[0]), "peer_port": stream.peer[1]}
        return {**peer, "line": line.decode().strip()}

    accepted = await asyncio.gather(*(one(i) for i in range(args.peers)))
    await holder.close()
    return {"bound": describe(listener.bound[0]), "port": listener.bound[1], "peers": accepted}


async def act_talk(args: argparse.Namespace) -> dict[str, Any]:
    """Plain TCP (no SOCKS): connect to ``--to``, send a line, read one line back."""
    host, port = split_endpoint(args.to)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), args.timeout)
    writer.write(args.line.encode() + b"\n")
    await writer.drain()
    reply = await asyncio.wait_for(reader.readline(), timeout=args.timeout)
    local = writer.get_extra_info("sockname")
    writer.close()
    return {"reply": reply.decode().strip(), "local": [local[0], local[1]]}


async def act_pysocks(args: argparse.Namespace) -> dict[str, Any]:
    """GET / through one proxy, or a chain (``--via`` then ``--proxy``), with python-socks."""
    from python_socks.async_.asyncio import Proxy

    first = None
    for url in args.via:
        first = (
            Proxy.from_url(url, rdns=True, forward=first)
            if first
            else Proxy.from_url(url, rdns=True)
        )
    proxy = Proxy.from_url(f"socks5://{args.proxy}", rdns=True, forward=first)
    sock = await proxy.connect(args.dest, args.port, timeout=args.timeout)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(HTTP_GET)
    await writer.drain()
    body = await _read_all(reader, args.timeout)
    writer.close()
    return {"body": body.decode("latin-1")}


async def act_hold_stream(args: argparse.Namespace) -> dict[str, Any]:
    """Read a long transfer through the gateway; report when (and how) it ended.

    Prints ``{"event": "streaming"}`` once data flows, so the scenario can break the link.
    """
    client = await _open(args)
    stream = await client.connect(parse_address(args.dest), args.port)
    total = 0
    started = time.monotonic()
    announced_at: float | None = None
    ended = "timeout"
    while time.monotonic() - started < args.timeout:
        try:
            chunk = await asyncio.wait_for(stream.reader.read(65536), timeout=1.0)
        except TimeoutError:
            continue
        except ConnectionError:
            ended = "reset"
            break
        if not chunk:
            ended = "eof"
            break
        total += len(chunk)
        if announced_at is None and total >= 8192:
            announced_at = time.monotonic()
            emit(event="streaming", bytes=total)
    since = time.monotonic() - announced_at if announced_at is not None else None
    await stream.close()
    return {"ended": ended, "bytes": total, "seconds_after_streaming": since}


async def act_dns(args: argparse.Namespace) -> dict[str, Any]:
    """Query a DNS server directly (a check of the lab zone, no gateway involved)."""
    import aiodns

    resolver = aiodns.DNSResolver(nameservers=[args.server], timeout=2, tries=1)
    answers: list[str] = []
    try:
        result = await resolver.query_dns(args.name, args.type)
        for record in result.answer:
            data = record.data
            answers.append(str(getattr(data, "addr", None) or getattr(data, "dname", "")))
    except aiodns.error.DNSError as exc:
        return {"answers": [], "dns_error": exc.args[0]}
    return {"answers": answers}


def _error(exc: BaseException) -> dict[str, Any]:
    rep = getattr(exc, "rep", None)
    return {"error": f"{type(exc).__name__}: {exc}", "rep": int(rep) if rep is not None else None}


ACTIONS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]] = {
    "http": act_http,
    "associate": act_associate,
    "id-http": act_id_http,
    "connect-aa": act_connect_aa,
    "expect-failure": act_expect_failure,
    "bind": act_bind,
    "talk": act_talk,
    "pysocks": act_pysocks,
    "hold-stream": act_hold_stream,
    "dns": act_dns,
}


def all_actions() -> dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]]:
    """The TCP actions here and the UDP ones of `netnslab.probe_udp`."""
    return {**ACTIONS, **UDP_ACTIONS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netnslab.probe")
    parser.add_argument("action", choices=sorted(all_actions()))
    parser.add_argument("--proxy", help="gateway HOST:PORT")
    parser.add_argument("--dest", help="destination: id:HEX, IP literal or name")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--aa", action="store_true", help="combine with ADDRESS ASSOCIATE")
    parser.add_argument("--pref", type=lambda s: int(s, 0), default=0x08, help="ADR.PREF")
    parser.add_argument("--real-family", action="store_true")
    parser.add_argument("--targets", nargs="*", default=[])
    parser.add_argument("--multi", action="store_true")
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--to", help="plain TCP endpoint HOST:PORT")
    parser.add_argument("--line", default="hello")
    parser.add_argument("--via", action="append", default=[], help="earlier proxy URL in chain")
    parser.add_argument("--server", help="DNS server address")
    parser.add_argument("--name", help="DNS name")
    parser.add_argument("--type", default="A", help="DNS query type")
    parser.add_argument("--timeout", type=float, default=10.0)
    add_udp_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one action; exit 0 if it completed (the JSON says what happened), 1 on error."""
    args = build_parser().parse_args(argv)
    try:
        result = asyncio.run(all_actions()[args.action](args))
    except Exception as exc:
        emit(ok=False, **_error(exc))
        return 1
    emit(ok=True, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
