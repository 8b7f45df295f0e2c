"""translator.net.exporter: /metrics over real HTTP on loopback, and clients that misbehave."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from translator.metrics import Metrics
from translator.net.exporter import MetricsServer


def _get(url: str, data: bytes | None = None) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, data=data, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture
async def served() -> AsyncIterator[MetricsServer]:
    m = Metrics()
    m.request("CONNECT", "ipv4", 5)
    server = MetricsServer(m, "127.0.0.1", 0)
    await server.start()
    yield server
    await server.close()


async def test_serves_metrics_over_http(served: MetricsServer) -> None:
    host, port = served.endpoint.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    base = f"http://{served.endpoint}"
    status, ctype, body = await asyncio.to_thread(_get, base + "/metrics")
    assert status == 200
    assert ctype == CONTENT_TYPE_LATEST
    assert b'socks64_requests_total{atyp="ipv4",command="CONNECT",rep="5"} 1.0' in body
    status, _, body = await asyncio.to_thread(_get, base + "/metrics?name[]=x")
    assert status == 200 and b"socks64_requests_total" in body
    status, _, body = await asyncio.to_thread(_get, base + "/")
    assert status == 200 and b"/metrics" in body
    status, _, _ = await asyncio.to_thread(_get, base + "/nope")
    assert status == 404
    status, _, _ = await asyncio.to_thread(_get, base + "/metrics", b"x=1")
    assert status == 405


async def test_start_returns_the_bound_port() -> None:
    server = MetricsServer(Metrics(process=False), "127.0.0.1", 0)
    host, port = await server.start()
    try:
        assert host == "127.0.0.1" and port > 0
        assert server.endpoint == f"127.0.0.1:{port}"
    finally:
        await server.close()


async def _raw(endpoint: str, payload: bytes, *, eof: bool = True) -> bytes:
    host, port = endpoint.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(payload)
        if eof:
            writer.write_eof()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_bad_clients_do_not_break_the_endpoint(served: MetricsServer) -> None:
    assert await _raw(served.endpoint, b"") == b""  # connects, says nothing, leaves
    assert (await _raw(served.endpoint, b"\x16\x03\x01garbage\r\n\r\n")).startswith(
        b"HTTP/1.0 400 "
    )
    assert (await _raw(served.endpoint, b"GET /metrics")).startswith(b"HTTP/1.0 400 ")
    huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    assert (await _raw(served.endpoint, huge)).startswith(b"HTTP/1.0 431 ")
    # A client that connects and stays silent holds only its own connection.
    host, port = served.endpoint.rsplit(":", 1)
    _, silent = await asyncio.open_connection(host, int(port))
    try:
        answer = await _raw(served.endpoint, b"GET /metrics HTTP/1.0\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK\r\n")
        assert b"Connection: close" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert b"socks64_requests_total" in body
        status, _, _ = await asyncio.to_thread(_get, f"http://{served.endpoint}/metrics")
        assert status == 200
    finally:
        silent.close()
        await silent.wait_closed()


async def test_close_aborts_a_silent_scrape() -> None:
    server = MetricsServer(Metrics(process=False), "127.0.0.1", 0)
    host, port = await server.start()
    reader, writer = await asyncio.open_connection(host, port)
    deadline = time.monotonic() + 5
    while not server._tasks:  # the server has taken the connection
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    async with asyncio.timeout(2):
        await server.close()
        assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()


async def test_ipv6_endpoint() -> None:
    server = MetricsServer(Metrics(process=False), "::1", 0)
    try:
        host, port = await server.start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert host == "::1"
        assert server.endpoint == f"[::1]:{port}"
        answer = await _raw(server.endpoint.replace("[", "").replace("]", ""), b"")
        assert answer == b""
        status, _, _ = await asyncio.to_thread(_get, f"http://[::1]:{port}/metrics")
        assert status == 200
    finally:
        await server.close()
