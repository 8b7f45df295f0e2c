"""A gateway started as root with ``user: nobody`` runs as nobody and still does its work.

One ``socks64 serve`` process for the module: started as root, it drops to nobody (keeping
CAP_NET_ADMIN and CAP_NET_BIND_SERVICE) and then serves real clients on loopback: curl,
ncat, python-socks, and the project's client for ADDRESS ASSOCIATE, CONNECT by ID, BIND,
UDP ASSOCIATE and username authentication; a SIGHUP reload (which adds a listener below
port 1024), a reload of a config nobody may not read, a /metrics scrape, and SIGTERM.

Why it is a test of its own: the interpreter may live where nobody cannot read it
(/root/.pyenv), so a module first imported after the drop cannot be imported at all. Every
path here is one a running gateway takes after the drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
import yaml
from python_socks.async_.asyncio import Proxy

from tests.conftest import HTTP_BODY, IN_CI, need_tool
from tests.dnsserver import DnsServer
from translator.auth import hash_password
from translator.client import AddressId, SocksClient, SocksReplyError
from translator.service.privileges import CAP_NET_ADMIN, CAP_NET_BIND_SERVICE

SOCKS64 = [sys.executable, "-m", "translator.cli"]
KEPT = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_BIND_SERVICE)
LOOPBACK = ["127.0.0.0/8", "::1/128"]
USER, PASSWORD = "alice", "s3cret"
START_TIMEOUT = 15.0
# What must never show in the gateway's log: a module imported after the drop (the runner
# warns even where it could still be read), an import that failed, any traceback.
BROKEN = re.compile(
    r"imported after dropping privileges|cannot preload|Traceback|ImportError"
    r"|ModuleNotFoundError|LookupError|PermissionError"
)


def _need_root_and_nobody() -> pwd.struct_passwd:
    problem = None
    if os.geteuid() != 0:
        problem = "dropping privileges needs the test run as root"
    else:
        try:
            return pwd.getpwnam("nobody")
        except KeyError:
            problem = "there is no user nobody on this machine"
    if IN_CI:
        pytest.fail(problem)
    pytest.skip(problem)


@dataclass
class Served:
    """The running gateway: its process, files and the endpoints it logged."""

    process: subprocess.Popen[bytes]
    directory: Path
    config: Path
    log: Path
    document: dict[str, Any]
    v4: str = ""  # "127.0.0.1:PORT"
    v6: str = ""  # "[::1]:PORT"
    metrics: str = ""  # "127.0.0.1:PORT"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_log(self, pattern: str, start: int = 0, timeout: float = 10.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log after offset ``start``."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log_text()[start:])
            if found:
                return found
            if self.process.poll() is not None:
                pytest.fail(f"gateway exited ({self.process.returncode}):\n{self.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} in the gateway log:\n{self.log_text()}")
            time.sleep(0.05)

    def write_config(self, document: dict[str, Any]) -> None:
        self.config.write_text(yaml.safe_dump(document), encoding="utf-8")
        self.config.chmod(0o644)

    def reload(self, expect: str) -> str:
        """SIGHUP, then the log line matching ``expect`` that it caused."""
        start = len(self.log_text())
        self.process.send_signal(signal.SIGHUP)
        return self.wait_log(expect, start).group(0)


def config_document(dns: DnsServer, users: Path) -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:0", "[::1]:0"],
        "user": "nobody",
        "auth": {"methods": ["none", "username"], "users_file": str(users)},
        "resolver": {"nameservers": [dns.address], "hosts_file": None, "timeout": 1.0},
        "timeouts": {"handshake": 5.0, "connect": 3.0, "idle": 30.0, "bind_accept": 10.0},
        "metrics": {"listen": "127.0.0.1:0"},
        "shutdown_grace": 1.0,
        "policy": {
            "default": "deny",
            "rules": [{"action": "allow", "clients": LOOPBACK, "destinations": LOOPBACK}],
        },
    }


@pytest.fixture(scope="module")
def served(dns: DnsServer) -> Iterator[Served]:
    """``socks64 serve`` started as root with ``user: nobody``; stopped at the end."""
    _need_root_and_nobody()
    # Read as root at start, but re-read as nobody on SIGHUP: a directory nobody can enter.
    directory = Path(tempfile.mkdtemp(prefix="socks64-unprivileged-"))
    directory.chmod(0o755)
    users = directory / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD)}\n", encoding="utf-8")
    users.chmod(0o644)
    config = directory / "socks64.yaml"
    log = directory / "gateway.log"
    document = config_document(dns, users)
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    config.chmod(0o644)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*SOCKS64, "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    gateway = Served(process, directory, config, log, document)
    try:
        gateway.wait_log(r"config \S+; ready", timeout=START_TIMEOUT)
        text = gateway.log_text()
        endpoints = re.findall(r"listening on (\S+)", text)
        gateway.v4 = next(e for e in endpoints if e.startswith("127."))
        gateway.v6 = next(e for e in endpoints if e.startswith("["))
        found = re.search(r"metrics at http://(\S+)/metrics", text)
        assert found, text
        gateway.metrics = found.group(1)
        yield gateway
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _status(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_runs_as_nobody_with_only_the_two_capabilities(served: Served) -> None:
    nobody = pwd.getpwnam("nobody")
    status = _status(Path(f"/proc/{served.process.pid}/status"))
    assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
    assert status["Gid"].split() == [str(nobody.pw_gid)] * 4
    assert status["Groups"] == ""
    assert int(status["CapEff"], 16) == KEPT
    assert int(status["CapPrm"], 16) == KEPT
    assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
    # Every thread (the netlink thread was started before the drop) is nobody as well,
    # with no capability beyond the kept ones.
    for task in Path(f"/proc/{served.process.pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a worker thread that just ended
            thread = _status(task / "status")
            assert thread["Uid"].split() == [str(nobody.pw_uid)] * 4, task
            assert int(thread["CapEff"], 16) & ~KEPT == 0, task
    assert re.search(r"running as nobody \(uid \d+, gid \d+\), keeping", served.log_text())


# --- real clients ---------------------------------------------------------------------


async def run(*argv: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), 20)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out, err


async def curl(proxy: str, url: str) -> tuple[int, bytes, bytes]:
    need_tool("curl")
    return await run(
        "curl", "-sS", "--max-time", "10", "--noproxy", "", "-x", f"socks5h://{proxy}", url
    )


@pytest.mark.parametrize(
    ("listener", "host", "server"), [("v4", "web6.test", "v6"), ("v6", "web4.test", "v4")]
)
async def test_curl_by_name_to_the_other_family(
    served: Served, http_servers: dict[str, int], listener: str, host: str, server: str
) -> None:
    code, out, err = await curl(getattr(served, listener), f"http://{host}:{http_servers[server]}/")
    assert code == 0, err
    assert out == HTTP_BODY


async def test_ncat(served: Served, echo_server: dict[str, int]) -> None:
    need_tool("ncat")
    code, out, err = await run(
        "ncat",
        "--proxy",
        served.v4,
        "--proxy-type",
        "socks5",
        "--proxy-dns",
        "remote",
        "web6.test",
        str(echo_server["v6"]),
        stdin=b"hello as nobody\n",
    )
    assert code == 0, err
    assert out == b"hello as nobody\n"


@pytest.mark.parametrize(
    ("listener", "dest", "server"), [("v6", "web4.test", "v4"), ("v4", "web6.test", "v6")]
)
async def test_python_socks(
    served: Served, echo_server: dict[str, int], listener: str, dest: str, server: str
) -> None:
    proxy = Proxy.from_url(f"socks5://{getattr(served, listener)}", rdns=True)
    sock = await proxy.connect(dest_host=dest, dest_port=echo_server[server], timeout=5)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"python-socks")
    assert await asyncio.wait_for(reader.readexactly(12), 5) == b"python-socks"
    writer.close()
    await writer.wait_closed()


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


async def _client(
    served: Served, listener: str = "v4", username: str | None = None, password: str | None = None
) -> SocksClient:
    host, port = _host_port(getattr(served, listener))
    return await SocksClient.open(host, port, username=username, password=password)


async def test_address_associate_then_connect_by_id(
    served: Served, http_servers: dict[str, int]
) -> None:
    async with await _client(served) as client:
        realid = await client.associate("web6.test")
        assert isinstance(realid, AddressId) and realid.realid != 0
        assert await client.resolve("web4.test", socket.AF_INET) == IPv4Address("127.0.0.1")
        assert await client.reverse(IPv6Address("::1")) == "web6.test"  # PTR through aiodns
        stream = await client.connect(realid, http_servers["v6"])
        stream.writer.write(b"GET / HTTP/1.0\r\nHost: web6.test\r\n\r\n")
        response = await asyncio.wait_for(stream.reader.read(), 10)
        await stream.close()
    assert response.startswith(b"HTTP/1.0 200") and response.endswith(HTTP_BODY)


async def test_bind_across_families(served: Served) -> None:
    async with await _client(served) as client:
        listener = await client.bind(IPv6Address("::1"), 0, real_family=True)
        address, port = listener.bound
        assert address == IPv6Address("::1") and port > 0

        async def peer() -> bytes:
            reader, writer = await asyncio.open_connection("::1", port)
            writer.write(b"from peer")
            data = await asyncio.wait_for(reader.readexactly(4), 5)
            writer.close()
            await writer.wait_closed()
            return data

        connecting = asyncio.create_task(peer())
        stream = await listener.accept(timeout=5)
        assert await asyncio.wait_for(stream.reader.readexactly(9), 5) == b"from peer"
        stream.writer.write(b"back")
        assert await connecting == b"back"


class _UdpEcho(asyncio.DatagramProtocol):
    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo:" + data, addr)


@pytest.fixture
async def udp_echo() -> AsyncIterator[dict[str, int]]:
    """UDP echo servers on 127.0.0.1 and ::1: {"v4": port, "v6": port}."""
    loop = asyncio.get_running_loop()
    t4, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    t6, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("::1", 0))
    yield {"v4": t4.get_extra_info("sockname")[1], "v6": t6.get_extra_info("sockname")[1]}
    t4.close()
    t6.close()


@pytest.mark.parametrize(
    ("listener", "name", "server"), [("v4", "web6.test", "v6"), ("v6", "web4.test", "v4")]
)
async def test_udp_associate_by_name_to_the_other_family(
    served: Served, udp_echo: dict[str, int], listener: str, name: str, server: str
) -> None:
    client = await _client(served, listener)
    async with await client.udp_associate() as udp:
        await udp.send(name, udp_echo[server], b"datagram")
        got = await udp.recv()
        assert (got.address, got.port, got.data) == (name, udp_echo[server], b"echo:datagram")


async def test_username_authentication(served: Served, echo_server: dict[str, int]) -> None:
    # The password check runs on a worker thread started after the drop.
    async with await _client(served, username=USER, password=PASSWORD) as client:
        stream = await client.connect("web4.test", echo_server["v4"])
        stream.writer.write(b"authenticated")
        assert await asyncio.wait_for(stream.reader.readexactly(13), 5) == b"authenticated"
        await stream.close()
    with pytest.raises(SocksReplyError):
        await _client(served, username=USER, password="wrong")


# --- metrics, reload, stop ------------------------------------------------------------


def scrape(served: Served) -> str:
    with socket.create_connection(_host_port(served.metrics), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: socks64\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks).decode()
    head, _, body = response.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.") and " 200 " in head.splitlines()[0], head
    return body


def reloads(served: Served, result: str) -> float:
    found = re.search(
        rf'^socks64_config_reloads_total\{{result="{result}"\}} (\S+)$',
        scrape(served),
        re.MULTILINE,
    )
    return float(found.group(1)) if found else 0.0


def test_metrics_scrape(served: Served) -> None:
    body = scrape(served)
    assert "# TYPE socks64_" in body
    assert re.search(r"^socks64_\w+ ", body, re.MULTILINE)


def _free_privileged_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


async def _socks_answers(host: str, port: int) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x05\x01\x00")
    try:
        return await asyncio.wait_for(reader.readexactly(2), 5) == b"\x05\x00"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_sighup_reload_as_nobody(served: Served, http_servers: dict[str, int]) -> None:
    # The config is re-read as nobody; the new listener below 1024 needs the kept
    # CAP_NET_BIND_SERVICE.
    port = _free_privileged_port()
    document = {**served.document, "listen": [*served.document["listen"], f"127.0.0.1:{port}"]}
    served.write_config(document)
    line = await asyncio.to_thread(served.reload, r"reloaded .*")
    assert f"127.0.0.1:{port}" in line
    assert reloads(served, "ok") == 1
    assert await _socks_answers("127.0.0.1", port)
    code, out, err = await curl(f"127.0.0.1:{port}", f"http://web6.test:{http_servers['v6']}/")
    assert (code, out) == (0, HTTP_BODY), err
    # A config nobody may not read: a clean "reload failed", the running config stays.
    served.config.chmod(0o600)
    try:
        line = await asyncio.to_thread(served.reload, r"reload failed.*")
    finally:
        served.config.chmod(0o644)
    assert "Permission denied" in line
    assert reloads(served, "error") == 1 and reloads(served, "ok") == 1
    assert await _socks_answers("127.0.0.1", port)
    assert await _socks_answers(*_host_port(served.v4))


def test_sigterm_exits_0_and_nothing_broke(served: Served) -> None:
    """Last: stop the gateway and read its whole log."""
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(15) == 0
    text = served.log_text()
    assert "stopping" in text
    assert not BROKEN.search(text.replace("Permission denied", "")), text
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert all("reload failed" in line for line in errors), errors
    assert stat.S_IMODE(served.config.stat().st_mode) == 0o644
