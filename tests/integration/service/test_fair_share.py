"""Fair share per client address, on a ``socks64 serve`` child with the default limits: one
address flooding the gateway with idle unauthenticated connections takes only its share,
every other address is served at once, and the flood is counted and logged once a second."""

from __future__ import annotations

import contextlib
import http.client
import resource
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dnsserver import DnsServer
from translator.config import Limits

from .gateway_process import (
    GatewayProcess,
    Sample,
    Spawn,
    connect_request,
    echo_handler,
    echo_round_trip,
    free_port,
    gateway_config,
    serve,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    value,
    write_config,
)

FLOOD = 4200  # idle connections 127.0.0.1 holds
CHURN_PER_SECOND = 1000  # then: new connections per second while the probes run
PROBES = 5
PROBE_DEADLINE = 1.0  # seconds for a SOCKS5 CONNECT from another address
REJECTED = "socks64_connections_rejected_total"
SHARE = Limits().per_client_handshake  # the default: idle connections one address may hold


@contextlib.contextmanager
def nofile_at_least(wanted: int) -> Iterator[None]:
    """This test process may hold ``wanted`` descriptors (the soft limit raised to the hard
    one, and the hard one raised when we may); restored afterwards."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = before[1]
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            hard = wanted
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def scrape(port: int) -> list[Sample]:
    """/metrics on loopback (http.client: never an environment proxy)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        connection.close()
    return [
        Sample(sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def timed_connect(
    gateway: tuple[str, int], source: str, dest_port: int, timeout: float = 5.0
) -> tuple[socket.socket, float]:
    """A SOCKS5 CONNECT from ``source`` to 127.0.0.1:dest_port; the relayed socket and the
    seconds from the TCP connect to the CONNECT reply."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        started = time.monotonic()
        sock.connect(gateway)
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert connect_request(sock, "127.0.0.1", dest_port) == 0
        elapsed = time.monotonic() - started
    except BaseException:
        sock.close()
        raise
    return sock, elapsed


def closed_at_once(gateway: tuple[str, int], source: str) -> bool:
    """Whether the gateway closes a new connection from ``source`` without a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.bind((source, 0))
        sock.connect(gateway)
        try:
            sock.sendall(b"\x05\x01\x00")
            return sock.recv(2) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


class Flood:
    """A thread holding ``FLOOD`` idle connections from 127.0.0.1 (no greeting), then
    replacing some of them (``CHURN_PER_SECOND``) until stopped: new connections keep
    arriving while the probes run. All bounded in count and time; closed by ``close``."""

    def __init__(self, gateway: tuple[str, int]) -> None:
        self.gateway = gateway
        self.held: list[socket.socket] = []
        self.opened = 0
        self.errors: list[str] = []
        self.started = time.monotonic()
        self.ended = self.started
        self.reached = threading.Event()  # all FLOOD connections open
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(3.0)
            sock.bind(("127.0.0.1", 0))
            sock.connect(self.gateway)
        except OSError as exc:
            sock.close()
            self.errors.append(repr(exc))
            return None
        self.opened += 1
        return sock

    def _run(self) -> None:
        deadline = time.monotonic() + 20
        while len(self.held) < FLOOD and not self._stop.is_set() and len(self.errors) < 20:
            if time.monotonic() > deadline:
                self.errors.append("flood: too slow")
                return
            sock = self._connect()
            if sock is not None:
                with self._lock:
                    self.held.append(sock)
        self.reached.set()
        batch = CHURN_PER_SECOND // 20
        while not self._stop.wait(0.05) and time.monotonic() < deadline and len(self.errors) < 20:
            for _ in range(batch):  # the latest ones (refused): the first SHARE keep their slots
                with self._lock:
                    old = self.held.pop()
                old.close()
                sock = self._connect()
                if sock is not None:
                    with self._lock:
                        self.held.append(sock)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.ended = time.monotonic()
        with self._lock:
            held, self.held = self.held, []
        for sock in held:
            sock.close()


@contextlib.contextmanager
def flood(gateway: tuple[str, int]) -> Iterator[Flood]:
    running = Flood(gateway)
    try:
        yield running
    finally:
        running.close()


def rejection_lines(child: GatewayProcess) -> list[str]:
    return [m.string for m in child.find(r"per_client_handshake limit reached")]


def test_an_idle_flood_from_one_address_does_not_slow_another(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    port, metrics_port = free_port(), free_port()
    config = write_config(
        tmp_path / "socks64.yaml",
        gateway_config(dns.address, [f"127.0.0.1:{port}"], metrics_port=metrics_port),
    )
    gateway = ("127.0.0.1", port)
    with nofile_at_least(FLOOD + 1024), tcp_server(echo_handler) as echo:
        child = serve(spawn, config)
        probes: list[float] = []
        with flood(gateway) as running:
            # the first probe during the burst, the others while all FLOOD are held and new
            # ones keep coming
            deadline = time.monotonic() + 10
            while running.opened < FLOOD // 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            for probe in range(PROBES):
                relayed, elapsed = timed_connect(gateway, "127.0.0.2", echo.port)
                with relayed:
                    echo_round_trip(relayed, b"fair share")
                probes.append(elapsed)
                if probe == 0:
                    assert running.reached.wait(20), running.errors
                time.sleep(0.2)
            assert running.reached.is_set() and not running.errors, running.errors
            assert FLOOD - 1 <= len(running.held) <= FLOOD  # (one may be being replaced)
            # 127.0.0.1 itself is at its share: closed at once
            assert closed_at_once(gateway, "127.0.0.1")
            opened = running.opened
            during = rejection_lines(child)
        flood_seconds = running.ended - running.started
        assert max(probes) < PROBE_DEADLINE, probes

        # counted: every flood connection past the first SHARE (a few may still wait in the
        # backlog when scraped)
        rejected = value(scrape(metrics_port), REJECTED, reason="per_client_handshake")
        assert rejected > 0
        assert rejected >= 0.9 * (opened - SHARE), (rejected, opened)
        assert value(scrape(metrics_port), REJECTED, reason="per_client") == 0
        assert value(scrape(metrics_port), REJECTED, reason="max_clients") == 0
        # ... and logged about once a second, not once per connection
        assert 1 <= len(during) <= flood_seconds + 2, (len(during), flood_seconds, during)
        summarized = [int(m.group(1)) for m in child.find(r"limit reached \(and (\d+) more\)")]
        assert summarized and max(summarized) > 100, during

        # The flood is over: 127.0.0.1 is served again (its idle sessions end on EOF).
        deadline = time.monotonic() + 5
        while True:
            try:
                relayed, elapsed = timed_connect(gateway, "127.0.0.1", echo.port, timeout=2)
            except (OSError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            with relayed:
                echo_round_trip(relayed, b"served again")
            break
        assert elapsed < PROBE_DEADLINE
        assert time.monotonic() < deadline
        assert child.stop() == 0
    child.assert_clean()
    print(f"probes {[round(p, 3) for p in probes]} s; {opened} flood connections in ", end="")
    print(f"{flood_seconds:.1f} s, {rejected:.0f} rejected, {len(during)} log lines")


def test_both_bounds_on_a_small_share(tmp_path: Path, dns: DnsServer, spawn: Spawn) -> None:
    """per_client_handshake: 2, per_client: 3: a third idle connection is closed at once,
    and so is a fourth connection when two of three are past their first request."""
    port, metrics_port = free_port(), free_port()
    data = gateway_config(dns.address, [f"127.0.0.1:{port}"], metrics_port=metrics_port)
    data["limits"] = {"per_client_handshake": 2, "per_client": 3}
    child = serve(spawn, write_config(tmp_path / "socks64.yaml", data))
    gateway = ("127.0.0.1", port)
    with contextlib.ExitStack() as held, tcp_server(echo_handler) as echo:
        for _ in range(2):
            held.enter_context(socket.create_connection(gateway, timeout=2))
        assert closed_at_once(gateway, "127.0.0.1")
        found = child.wait_for(r"closing a connection from (\S+): (\S+) limit reached")
        assert found.groups() == ("127.0.0.1", "per_client_handshake")

        for _ in range(2):  # past their first request: they hold no handshake slot
            relayed, _ = timed_connect(gateway, "127.0.0.3", echo.port)
            held.enter_context(relayed)
        held.enter_context(_connect_from("127.0.0.3", gateway))
        assert closed_at_once(gateway, "127.0.0.3")  # (its log line waits a second: counted)
        # nobody else is affected
        assert not closed_at_once(gateway, "127.0.0.4")
        m = scrape(metrics_port)
        assert value(m, REJECTED, reason="per_client_handshake") == 1
        assert value(m, REJECTED, reason="per_client") == 1
    assert child.stop() == 0
    child.assert_clean()


def _connect_from(source: str, gateway: tuple[str, int]) -> socket.socket:
    return socket.create_connection(gateway, timeout=2, source_address=(source, 0))


def test_connections_reset_before_they_are_served_log_no_error(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    """A burst of connections that the client resets (RST) while they wait in the backlog:
    each is accepted and ends quietly, and the gateway serves on."""
    port = free_port()
    config = write_config(
        tmp_path / "socks64.yaml", gateway_config(dns.address, [f"127.0.0.1:{port}"])
    )
    gateway = ("127.0.0.1", port)
    child = serve(spawn, config)
    child.signal(signal.SIGSTOP)  # they all wait in the backlog, reset, until it runs on
    try:
        for _ in range(50):
            sock = socket.create_connection(gateway, timeout=2)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
    finally:
        child.signal(signal.SIGCONT)
    with tcp_server(echo_handler) as echo:
        relayed, elapsed = timed_connect(gateway, "127.0.0.2", echo.port)
        with relayed:
            echo_round_trip(relayed, b"still serving")
    assert elapsed < PROBE_DEADLINE
    assert child.stop() == 0
    assert " ERROR " not in child.output, child.output[-3000:]
    child.assert_clean()
