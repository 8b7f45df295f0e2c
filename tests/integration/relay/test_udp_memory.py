"""A flood of datagrams to ever new peers must not grow the gateway: 50 UDP associations
of one loopback client are fed hostile datagrams to random loopback destinations for
90 seconds, and the gateway's resident memory stays put (the peer caches are bounded by
``udp.max_peers_per_client``, at its default). Right after, a legitimate datagram to a UDP
echo server is relayed and answered at once.

The gateway runs as ``socks64 serve`` in a subprocess, so its RSS is its own. Every
destination is in 127.0.0.0/8 (the gateway's policy allows nothing else), on ports above
the kernel's ephemeral range that no socket of this host has bound.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from translator.wire import Command, Rep, Request, UdpDatagram, decode_reply, decode_udp_datagram

REPO = Path(__file__).resolve().parents[3]
ASSOCIATIONS = 50
WARM_UP = 5.0  # seconds of flood before the first measurement
FLOOD_SECONDS = 90.0  # of flood after it
RATE = 2000  # datagrams per second, all associations together
MAX_GROWTH_KIB = 10 * 1024
CONFIG = """\
listen: ["127.0.0.1:0"]
resolver: {hosts_file: null}
policy:
  default: deny
  rules:
    - action: allow
      clients: [127.0.0.0/8]
      destinations: [127.0.0.0/8]
      comment: loopback clients, loopback destinations only
"""


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert found is not None, status
        return int(found.group(1))


def start_gateway(root: Path, tmp: Path, config: str = CONFIG) -> GatewayProcess:
    """``socks64 serve`` from the source tree at ``root``, on a free loopback port."""
    path = tmp / "socks64.yaml"
    path.write_text(config)
    log = tmp / "gateway.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "translator.cli", "serve", "--config", str(path)],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
            if found:
                return GatewayProcess(process, int(found.group(1)), log)
            time.sleep(0.05)
        raise AssertionError(f"the gateway did not start:\n{log.read_text()}")
    except BaseException:
        stop_gateway(process)
        raise


def stop_gateway(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Association:
    """A UDP ASSOCIATE from 127.0.0.1: its TCP connection, relay endpoint and UDP socket."""

    control: socket.socket
    relay: tuple[str, int]
    udp: socket.socket

    @classmethod
    def open(cls, gateway_port: int, stack: contextlib.ExitStack) -> Association:
        control = stack.enter_context(socket.create_connection(("127.0.0.1", gateway_port), 5))
        control.sendall(b"\x05\x01\x00")
        assert _read(control, 2) == b"\x05\x00"
        control.sendall(Request(Command.UDP_ASSOCIATE, IPv4Address(0), 0).encode())
        buffer = b""
        while (got := decode_reply(buffer)) is None:
            buffer += _read(control, 1)
        reply, _ = got
        assert reply.rep == Rep.SUCCEEDED, reply
        udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp.bind(("127.0.0.1", 0))
        return cls(control, (str(reply.address), reply.port), udp)

    def send(self, address: IPv4Address, port: int, data: bytes) -> None:
        self.udp.sendto(UdpDatagram(address, port, data).encode(), self.relay)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the gateway closed the connection")
        data += chunk
    return data


def unbound_high_ports() -> list[int]:
    """Ports above the ephemeral range that no UDP socket of this host has bound."""
    first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[1]) + 1
    bound: set[int] = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                bound.add(int(line.split()[1].rsplit(":", 1)[1], 16))
    return [port for port in range(max(first, 1024), 65536) if port not in bound]


@dataclass
class Flood:
    """Hostile datagrams to random 127.x.y.z destinations, ``RATE`` a second in all."""

    associations: list[Association]
    ports: list[int]
    rng: random.Random = field(default_factory=lambda: random.Random(64))
    sent: int = 0

    def run(self, seconds: float) -> None:
        start = time.monotonic()
        first = self.sent
        while (elapsed := time.monotonic() - start) < seconds:
            due = first + int(elapsed * RATE)
            while self.sent < due:
                association = self.associations[self.sent % len(self.associations)]
                destination = IPv4Address((127 << 24) | self.rng.getrandbits(24))
                association.send(destination, self.rng.choice(self.ports), b"hostile payload")
                self.sent += 1
            time.sleep(0.005)


class EchoServer:
    """A UDP echo server on 127.0.0.1 (answers "echo:" + data), in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.sock.sendto(b"echo:" + data, source)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()


def echo_round_trip(association: Association, echo_port: int, data: bytes) -> float:
    """Seconds for ``data`` to reach the echo server and its answer to come back."""
    started = time.monotonic()
    association.send(IPv4Address("127.0.0.1"), echo_port, data)
    association.udp.settimeout(1.0)
    while True:  # (nothing else is expected on the socket: the flood's ports are closed)
        packet = association.udp.recv(65535)
        datagram = decode_udp_datagram(packet)
        if datagram.data == b"echo:" + data:
            assert (datagram.address, datagram.port) == (IPv4Address("127.0.0.1"), echo_port)
            return time.monotonic() - started


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[GatewayProcess]:
    gateway = start_gateway(REPO, tmp_path)
    try:
        yield gateway
    finally:
        stop_gateway(gateway.process)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


def test_a_flood_of_new_peers_does_not_grow_the_gateway(
    gateway_process: GatewayProcess, echo: EchoServer
) -> None:
    with contextlib.ExitStack() as stack:
        associations = [Association.open(gateway_process.port, stack) for _ in range(ASSOCIATIONS)]
        for association in associations:  # each pins its client port, and works
            assert echo_round_trip(association, echo.port, b"hello") < 1.0
        flood = Flood(associations, unbound_high_ports())
        flood.run(WARM_UP)
        before = gateway_process.rss_kib()
        samples = [before]
        for _ in range(6):
            flood.run(FLOOD_SECONDS / 6)
            samples.append(gateway_process.rss_kib())
        after = samples[-1]
        print(
            f"\ngateway RSS over {FLOOD_SECONDS:g} s of flood ({flood.sent} datagrams): "
            + " ".join(f"{kib / 1024:.1f}" for kib in samples)
            + f" MiB; growth {(after - before) / 1024:.1f} MiB"
        )
        assert gateway_process.process.poll() is None
        assert flood.sent >= RATE * (WARM_UP + FLOOD_SECONDS) * 0.9
        assert after - before < MAX_GROWTH_KIB, samples

        # Legitimate traffic right after, on associations that were flooded:
        for association in (associations[0], associations[-1]):
            assert echo_round_trip(association, echo.port, b"legitimate") < 1.0
    assert "Traceback" not in gateway_process.log.read_text()
