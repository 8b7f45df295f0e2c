"""Fixtures shared by the integration tests: a real dnsmasq, HTTP and echo servers on
loopback, and gateways started in-process on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.dnsserver import DnsServer, dns_server_factory  # noqa: F401 (fixture)
from translator.cli import fast_paths_enabled
from translator.config import Config, config_from_mapping
from translator.gateway.server import Gateway

IN_CI = os.environ.get("CI", "").lower() == "true"
HTTP_BODY = b"socks64 test page\n"

# The loopback "zone" every integration test resolves against (dnsmasq, never the host's
# resolver). PTRs come from the host records.
ZONE: dict[str, Any] = {
    "a": {"web4.test": "127.0.0.1", "dual.test": "127.0.0.1", "other4.test": "127.0.0.2"},
    "aaaa": {"web6.test": "::1", "dual.test": "::1"},
    "ptr": {"127.0.0.1": "web4.test", "::1": "web6.test"},
    "ttl": 60,
}


def need_tool(name: str) -> None:
    """A missing client program fails under CI (the test command installs it), else skips."""
    if shutil.which(name) is None:
        message = f"{name} is not installed (the README test command installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on the loop the gateway runs on: uvloop, unless SOCKS64_NO_FASTPATH=1.
    Tests of the netlink layer itself need asyncio's loop (see netlink_thread)."""
    if fast_paths_enabled() and item.get_closest_marker("plain_asyncio") is None:
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="session")
def dns() -> Iterator[DnsServer]:
    need_tool("dnsmasq")
    with DnsServer(**ZONE) as server:
        yield server


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _V6Server(ThreadingHTTPServer):
    import socket as _socket

    address_family = _socket.AF_INET6


@pytest.fixture(scope="session")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_bytes(HTTP_BODY)
    return root


@pytest.fixture(scope="session")
def http_servers(http_root: Path) -> Iterator[dict[str, int]]:
    """HTTP servers on 127.0.0.1 and ::1 (each with its own free port): {"v4": p, "v6": p}."""
    handler = partial(_QuietHandler, directory=str(http_root))
    servers = {
        "v4": ThreadingHTTPServer(("127.0.0.1", 0), handler),
        "v6": _V6Server(("::1", 0), handler),
    }
    threads = [
        threading.Thread(target=server.serve_forever, daemon=True) for server in servers.values()
    ]
    for thread in threads:
        thread.start()
    yield {name: server.server_address[1] for name, server in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def gateway_config(dns: DnsServer, **overrides: Any) -> Config:
    """A loopback gateway config on free ports, resolving only through ``dns``."""
    data: dict[str, Any] = {
        "listen": ["127.0.0.1:0", "[::1]:0"],
        "resolver": {"nameservers": [dns.address], "hosts_file": None, "timeout": 1.0},
        "timeouts": {"handshake": 5.0, "connect": 3.0, "idle": 30.0, "bind_accept": 10.0},
        "policy": {"rules": [{"action": "allow", "clients": ["127.0.0.0/8", "::1/128"]}]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_mapping(data, "<test>")


class RunningGateway:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.v4 = next(e for e in gateway.endpoints if ":" not in e.host)
        self.v6 = next(e for e in gateway.endpoints if ":" in e.host)

    @property
    def url4(self) -> str:
        return f"127.0.0.1:{self.v4.port}"

    @property
    def url6(self) -> str:
        return f"[::1]:{self.v6.port}"


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@contextlib.asynccontextmanager
async def gateways_on(dns: DnsServer, **defaults: Any) -> AsyncIterator[GatewayFactory]:
    """A factory of started gateways resolving through ``dns`` (config ``defaults``, then
    each call's overrides); every one is closed on leaving, with no session left."""
    started: list[Gateway] = []

    async def make(**overrides: Any) -> RunningGateway:
        gateway = Gateway(gateway_config(dns, **{**defaults, **overrides}))
        await gateway.start()
        started.append(gateway)
        return RunningGateway(gateway)

    try:
        yield make
    finally:
        for gateway in started:
            await gateway.close()
            assert gateway.active_sessions == 0


@pytest.fixture
async def make_gateway(dns: DnsServer) -> AsyncIterator[GatewayFactory]:
    """``await make_gateway(**config overrides)`` -> a started gateway, closed at teardown."""
    async with gateways_on(dns) as make:
        yield make


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> RunningGateway:
    return await make_gateway()


@pytest.fixture
async def echo_server() -> AsyncIterator[dict[str, int]]:
    """TCP echo servers on 127.0.0.1 and ::1: {"v4": port, "v6": port}."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
        except asyncio.CancelledError:
            # Torn down while a peer (a gateway in another process) still holds the
            # connection. Return normally: Python 3.11's streams log a cancelled handler
            # task as an error.
            pass
        finally:
            writer.close()

    v4 = await asyncio.start_server(echo, "127.0.0.1", 0)
    v6 = await asyncio.start_server(echo, "::1", 0)
    yield {"v4": v4.sockets[0].getsockname()[1], "v6": v6.sockets[0].getsockname()[1]}
    for server in (v4, v6):
        server.close()
        await server.wait_closed()


@pytest.fixture(autouse=True)
def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A failure may be logged, never crash: no ERROR records from the gateway or asyncio
    (an uncaught task exception, a callback that raised) in any test."""
    yield
    errors = [
        record
        for record in caplog.get_records("call") + caplog.get_records("teardown")
        if record.levelno >= logging.ERROR and record.name.split(".")[0] in ("socks64", "asyncio")
    ]
    assert not errors, [record.getMessage() for record in errors]


from tests.redisfixture import RedisServer, redis_server_path, running_redis  # noqa: E402


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free loopback port (``.url``), killed after
    it; ``.stop()``/``.start()`` simulate an outage. Missing redis-server: fails under CI
    (the test command installs it), else skips."""
    if redis_server_path() is None:
        message = "redis-server is not installed (the README test command installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    with running_redis() as server:
        yield server


from tests.krb5realm import DEBIAN_PACKAGES, KerberosLab, kerberos_lab, missing_tools  # noqa: E402


@pytest.fixture(scope="session")
def krb5_realm() -> Iterator[KerberosLab]:
    """The session's loopback Kerberos realm (tickets last 1 h): rcmd/localhost (the
    gateway's keytab), HTTP/localhost, alice and bob with ccaches; os.environ points
    Kerberos at it for the session. Missing MIT tools: fails under CI, else skips."""
    missing = missing_tools()
    if missing:
        message = f"{', '.join(missing)} not installed (Debian: {DEBIAN_PACKAGES})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    with kerberos_lab() as lab:
        yield lab
