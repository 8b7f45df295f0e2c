"""``socks64 serve`` as a child process, and the small loopback tools its tests share.

Every gateway is its own process group (killed at teardown, also on failure), resolves
only through the test dnsmasq and may reach only loopback destinations. Its stderr is read
by a thread into ``lines``; tests wait for a line with a deadline, never sleep-and-hope.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[3]
SOCKS64 = [sys.executable, "-m", "translator.cli"]
LOOPBACK = ["127.0.0.0/8", "::1/128"]
#: variables of the service protocol a test must set itself, never inherit
_SERVICE_VARS = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, below the ephemeral range: the port stays free
    until the gateway binds it, since no bind(0) and no outgoing connection (of this test's
    servers or anyone else's) is given a port from there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ceiling = min(_ephemeral_floor(), 65536)
    floor = 10000 if ceiling > 12000 else 1024
    for _ in range(200):
        port = random.randrange(floor, ceiling)
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise AssertionError("no free port below the ephemeral range")


def allow_loopback(**criteria: Any) -> dict[str, Any]:
    """A policy rule allowing loopback clients to loopback destinations only."""
    return {"action": "allow", "clients": LOOPBACK, "destinations": LOOPBACK, **criteria}


def gateway_config(
    dns_address: str,
    listen: Sequence[str],
    *,
    metrics_port: int | None = None,
    rules: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A config document: loopback listeners, the test DNS only, loopback destinations only
    (``rules`` go before the final allow-loopback rule; the default is deny)."""
    data: dict[str, Any] = {
        "listen": list(listen),
        "resolver": {"nameservers": [dns_address], "hosts_file": None, "timeout": 1.0},
        "timeouts": {"handshake": 5.0, "connect": 3.0, "idle": 60.0, "bind_accept": 10.0},
        "policy": {"default": "deny", "rules": [*(rules or ()), allow_loopback()]},
        "shutdown_grace": 3.0,
    }
    if metrics_port is not None:
        data["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    data.update(extra)
    return data


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


# -- the process ------------------------------------------------------------------------


class GatewayProcess:
    """One ``socks64`` child. ``lines`` grows as the child writes to stderr."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        environment = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARS}
        environment.update(env or {})
        self.argv = list(argv)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: killed as one at teardown
            pass_fds=tuple(pass_fds),
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """The number of lines so far: pass it as ``after`` to wait only for newer ones."""
        with self._changed:
            return len(self.lines)

    def find(self, pattern: str, after: int = 0) -> list[re.Match[str]]:
        regex = re.compile(pattern)
        with self._changed:
            found = [regex.search(line) for line in self.lines[after:]]
        return [m for m in found if m is not None]

    def wait_for(self, pattern: str, *, after: int = 0, timeout: float = 15.0) -> re.Match[str]:
        """The first stderr line from ``after`` on that matches; fails at the deadline or
        when the process has exited without writing one."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = after
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    found = regex.search(line)
                    if found is not None:
                        return found
                seen = max(seen, len(self.lines))
                finished = not self._reader.is_alive()
                left = deadline - time.monotonic()
                if finished or left <= 0:
                    raise AssertionError(
                        f"no stderr line matching {pattern!r} "
                        f"({'the process ended' if finished else f'within {timeout} s'}):\n"
                        + "\n".join(self.lines[-40:])
                    )
                self._changed.wait(min(left, 0.2))

    async def await_line(
        self,
        pattern: str,
        *,
        after: int = 0,
        timeout: float = 15.0,  # noqa: ASYNC109 (the deadline of a blocking wait in a thread)
    ) -> re.Match[str]:
        """``wait_for`` without blocking the test's event loop."""
        return await asyncio.to_thread(self.wait_for, pattern, after=after, timeout=timeout)

    def listening(self) -> list[tuple[str, int]]:
        """Every "listening on HOST:PORT" endpoint logged so far, as (host, port)."""
        return [split_endpoint(m.group(1)) for m in self.find(r"listening on (\S+)")]

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """The exit status, within ``timeout`` seconds (subprocess.TimeoutExpired after)."""
        status = self.process.wait(timeout)
        self._reader.join(timeout=5)
        return status

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, and the exit status."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """Kill the whole process group (teardown; harmless when it is gone)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        if self.process.stderr is not None:
            self._reader.join(timeout=5)
            self.process.stderr.close()

    def assert_clean(self) -> None:
        """Nothing crashed: no traceback and no internal error in the log."""
        text = self.output
        assert "Traceback" not in text and "internal error" not in text, text


Spawn = Callable[..., GatewayProcess]


@pytest.fixture(name="spawn")
def spawn_fixture() -> Iterator[Spawn]:
    """``spawn(*cli_args, env=..., pass_fds=...)`` -> a started ``socks64`` child; every
    child is killed (its whole process group) at teardown, also when the test failed."""
    started: list[GatewayProcess] = []

    def start(
        *args: str,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> GatewayProcess:
        """``socks64 ARGS``, or exactly ``argv`` (a wrapper that execs socks64)."""
        command = list(argv) if argv is not None else [*SOCKS64, *args]
        child = GatewayProcess(command, env=env, pass_fds=pass_fds)
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in started:
            child.kill()


def serve(
    spawn: Spawn, config: Path, *args: str, env: Mapping[str, str] | None = None
) -> GatewayProcess:
    """``socks64 serve --config FILE ARGS``, returned once it says it is ready."""
    child = spawn("serve", "--config", str(config), *args, env=env)
    child.wait_for(r"; ready$")
    return child


def split_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- metrics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(port: int, timeout: float = 5.0) -> list[Sample]:
    """Every sample at http://127.0.0.1:PORT/metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    return [
        Sample(sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def value(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """The sum of the ``name`` samples whose labels include ``labels`` (0 when none)."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def wait_for_metric(
    port: int, name: str, expected: float, *, timeout: float = 10.0, **labels: str
) -> list[Sample]:
    """Scrape until ``value(name, labels) == expected``; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        got = value(samples, name, **labels)
        if got == expected:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {got}, not {expected}")
        time.sleep(0.05)


# -- a blocking SOCKS5 client (bulk data never goes through asyncio) -------------------


class SocksRefused(Exception):
    def __init__(self, rep: int) -> None:
        super().__init__(f"SOCKS reply {rep}")
        self.rep = rep


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def socks_greet(gateway: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A connection to the gateway that has chosen NO AUTH."""
    sock = socket.create_connection(gateway, timeout=timeout)
    try:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
    except BaseException:
        sock.close()
        raise
    return sock


def connect_request(sock: socket.socket, host: str, port: int) -> int:
    """Send CONNECT on a greeted connection; the reply's REP."""
    try:
        address = ip_address(host)
    except ValueError:
        name = host.encode()
        dst = b"\x03" + bytes([len(name)]) + name
    else:
        dst = (b"\x01" if address.version == 4 else b"\x04") + address.packed
    sock.sendall(b"\x05\x01\x00" + dst + struct.pack("!H", port))
    head = recv_exactly(sock, 4)
    atyp = head[3]
    rest = recv_exactly(sock, 1)[0] + 2 if atyp == 3 else {1: 4, 4: 16}.get(atyp, 4) + 2
    recv_exactly(sock, rest)
    return head[1]


def socks_connect(
    gateway: tuple[str, int], host: str, port: int, timeout: float = 10.0
) -> socket.socket:
    """CONNECT through the gateway; the relayed socket (blocking), or SocksRefused."""
    sock = socks_greet(gateway, timeout)
    try:
        rep = connect_request(sock, host, port)
        if rep != 0:
            raise SocksRefused(rep)
    except BaseException:
        sock.close()
        raise
    return sock


def refused_rep(gateway: tuple[str, int], host: str, port: int) -> int:
    """The REP of a CONNECT that must fail (AssertionError when it succeeds)."""
    try:
        socks_connect(gateway, host, port).close()
    except SocksRefused as exc:
        return exc.rep
    raise AssertionError(f"CONNECT {host}:{port} succeeded")


def echo_round_trip(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def connection_refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# -- loopback servers in threads ---------------------------------------------------------


class TcpServer:
    """A threaded TCP server on loopback; ``handler(conn, server)`` per connection."""

    def __init__(
        self, handler: Callable[[socket.socket, TcpServer], None], host: str = "127.0.0.1"
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.host = host
        self.port = int(self.listener.getsockname()[1])
        self.received = 0  # bytes, for the sink
        self.connections: list[socket.socket] = []
        self._handler = handler
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self.connections.append(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            self._handler(conn, self)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self.connections)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._accepter.join(5)
        for thread in self._threads:
            thread.join(5)


def echo_handler(conn: socket.socket, server: TcpServer) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def sink_handler(conn: socket.socket, server: TcpServer) -> None:
    """Count bytes until EOF, answer the count (8 bytes, big endian), close."""
    buffer = bytearray(4 << 20)
    count = 0
    while n := conn.recv_into(buffer):
        count += n
        server.received += n
    conn.sendall(count.to_bytes(8, "big"))


@contextlib.contextmanager
def tcp_server(
    handler: Callable[[socket.socket, TcpServer], None], host: str = "127.0.0.1"
) -> Iterator[TcpServer]:
    server = TcpServer(handler, host)
    try:
        yield server
    finally:
        server.close()


class UdpEcho:
    """A UDP echo server on loopback (answers ``b"echo:" + data``) in a thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError):
                self.sock.sendto(b"echo:" + data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def udp_echo(host: str = "127.0.0.1") -> Iterator[UdpEcho]:
    server = UdpEcho(host)
    try:
        yield server
    finally:
        server.close()
