#!/usr/bin/env python3
"""Relay throughput with GSS-API per-message protection (RFC 1961) against the plain path.

    .venv/bin/python bench/gssapi_bench.py                   # 256 MiB each way, 3 rounds
    .venv/bin/python bench/gssapi_bench.py --mib 64 --rounds 1
    .venv/bin/python bench/gssapi_bench.py --modes plain --socks64 /tmp/before-bin/socks64

One ``socks64 serve`` (offering gssapi and none, every level allowed), a throw-away MIT
realm on loopback (tests/krb5realm.py), and a sink and a source server on loopback. Each
mode moves the same bytes up (client -> sink) and down (source -> client), one connection:

* ``plain``: no authentication (the splice relay);
* ``level0``: GSS-API, no per-message protection (the same splice relay);
* ``integrity`` / ``confidentiality``: every message wrapped (the copying relay).

The client does as little as it can, so that the gateway is what is measured: its upload is
wrapped before the clock starts (tokens carry sequence numbers, so they can be made ahead),
and its download is counted, not unwrapped (the first message is unwrapped, as a check).
Gateway CPU comes from /proc. Loopback only, bounded in bytes and time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gssapi  # noqa: E402
import gssapi.raw  # noqa: E402
import yaml  # noqa: E402
from relaybench.procs import free_port, tree_cpu_seconds, wait_for_port  # noqa: E402

from tests.krb5realm import KerberosLab, kerberos_lab  # noqa: E402

MODES = ("plain", "level0", "integrity", "confidentiality")
LEVEL = {"level0": 0, "integrity": 1, "confidentiality": 2}
MAX_TOKEN = 0xFFFF
CHUNK = 1 << 16
TIMEOUT = 120.0


# -- the far side ------------------------------------------------------------------------


def serve(listener: socket.socket, handler: Any) -> None:
    def accept_loop() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()


def sink(conn: socket.socket) -> None:
    """Count bytes to EOF, answer the count (8 octets)."""
    buffer = bytearray(1 << 20)
    count = 0
    with conn:
        while n := conn.recv_into(buffer):
            count += n
        conn.sendall(struct.pack("!Q", count))


def source(conn: socket.socket) -> None:
    """Read a count (8 octets), send that many bytes, close."""
    with conn:
        (count,) = struct.unpack("!Q", recv_exactly(conn, 8))
        block = bytes(1 << 20)
        while count:
            count -= conn.send(memoryview(block)[: min(count, len(block))])


def listening() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("closed early")
        data += chunk
    return data


# -- the client ----------------------------------------------------------------------------


class Client:
    """One SOCKS connection, authenticated as ``mode`` says; CONNECT to ``port``."""

    def __init__(self, gateway: int, mode: str, ccache: Path, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", gateway), timeout=TIMEOUT)
        self.context: Any = None
        self.level = LEVEL.get(mode)
        if self.level is None:
            self.sock.sendall(b"\x05\x01\x00")
            assert recv_exactly(self.sock, 2) == b"\x05\x00"
        else:
            self.sock.sendall(b"\x05\x01\x01")
            assert recv_exactly(self.sock, 2) == b"\x05\x01"
            self._authenticate(ccache)
        self.send(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", port))
        reply = self.recv_message()
        assert reply[:2] == b"\x05\x00", reply

    def _authenticate(self, ccache: Path) -> None:
        flags = [
            gssapi.RequirementFlag.mutual_authentication,
            gssapi.RequirementFlag.replay_detection,
            gssapi.RequirementFlag.out_of_sequence_detection,
        ]
        creds = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"})
        name = gssapi.Name("rcmd@localhost", gssapi.NameType.hostbased_service)
        self.context = gssapi.SecurityContext(name=name, creds=creds, flags=flags)
        token = self.context.step()
        while True:
            self.sock.sendall(b"\x01\x01" + struct.pack("!H", len(token or b"")) + (token or b""))
            answer = self.read_frame(1)
            if self.context.complete:
                break
            token = self.context.step(answer)
            if self.context.complete and not token:
                break
        wrapped = self.context.wrap(bytes([self.level]), False).message
        self.sock.sendall(b"\x01\x02" + struct.pack("!H", len(wrapped)) + wrapped)
        assert self.context.unwrap(self.read_frame(2)).message == bytes([self.level])

    @property
    def protected(self) -> bool:
        return bool(self.level)

    def read_frame(self, mtyp: int) -> bytes:
        head = recv_exactly(self.sock, 4)
        assert head[:2] == bytes([1, mtyp]), head
        return recv_exactly(self.sock, struct.unpack("!H", head[2:])[0])

    def seal(self, data: bytes) -> bytes:
        if not self.protected:
            return data
        token = self.context.wrap(data, self.level == 2).message
        return b"\x01\x03" + struct.pack("!H", len(token)) + token

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.seal(data))

    def recv_message(self) -> bytes:
        """One reply: a wrapped message, or what one read gives on a plain stream."""
        if self.protected:
            return bytes(self.context.unwrap(self.read_frame(3)).message)
        return self.sock.recv(4096)

    def sealed_upload(self, total: int) -> list[bytes]:
        """``total`` bytes as the wire will carry them, made before the clock starts."""
        if not self.protected:
            return [bytes(CHUNK)] * (total // CHUNK)
        limit = self.context.get_wrap_size_limit(MAX_TOKEN, self.level == 2)
        block = bytes(limit)
        frames, left = [], total
        while left:
            frames.append(self.seal(block[: min(left, limit)]))
            left -= min(left, limit)
        return frames


def upload(gateway: int, mode: str, ccache: Path, sink_port: int, total: int) -> float:
    client = Client(gateway, mode, ccache, sink_port)
    frames = client.sealed_upload(total)
    with client.sock:
        start = time.perf_counter()
        for frame in frames:
            client.sock.sendall(frame)
        client.sock.shutdown(socket.SHUT_WR)
        count = struct.unpack("!Q", client.recv_message()[:8])[0]
        seconds = time.perf_counter() - start
    assert count == total, (count, total)
    return seconds


def download(gateway: int, mode: str, ccache: Path, source_port: int, total: int) -> float:
    client = Client(gateway, mode, ccache, source_port)
    buffer = bytearray(1 << 20)
    with client.sock:
        start = time.perf_counter()
        client.send(struct.pack("!Q", total))
        received = 0
        first = b""
        while n := client.sock.recv_into(buffer):
            if received < 4 + MAX_TOKEN and client.protected:
                first += buffer[:n]
            received += n
        seconds = time.perf_counter() - start
    if client.protected:  # a check that what came is wrapped as agreed
        length = struct.unpack("!H", first[2:4])[0]
        result = client.context.unwrap(first[4 : 4 + length])
        assert result.encrypted == (client.level == 2) and set(result.message) == {0}
        assert received > total  # the plaintext and one header and MIC or more per message
    else:
        assert received == total, (received, total)
    return seconds


# -- the run ---------------------------------------------------------------------------


def crypto_ceiling(lab: KerberosLab, rounds: int = 400) -> list[tuple[str, float, float]]:
    """gss_wrap and gss_unwrap alone, in this process, on full-size messages: what MIT
    Kerberos' cipher allows before any socket is touched. (level, wrap, unwrap) in B/s."""
    creds = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{lab.ccache('alice')}"})
    acceptor_creds = gssapi.Credentials(usage="accept", store={"keytab": str(lab.keytab)})
    name = gssapi.Name("rcmd@localhost", gssapi.NameType.hostbased_service)
    initiator = gssapi.SecurityContext(name=name, creds=creds)
    acceptor = gssapi.SecurityContext(creds=acceptor_creds, usage="accept")
    initiator.step(acceptor.step(initiator.step()))
    rates = []
    for level, conf in (("integrity", False), ("confidentiality", True)):
        size = initiator.get_wrap_size_limit(MAX_TOKEN, conf)
        data = bytes(size)
        start = time.perf_counter()
        tokens = [gssapi.raw.wrap(initiator, data, conf).message for _ in range(rounds)]
        wrapped = time.perf_counter()
        for token in tokens:
            gssapi.raw.unwrap(acceptor, token)
        unwrapped = time.perf_counter()
        total = size * rounds
        rates.append((level, total / (wrapped - start), total / (unwrapped - wrapped)))
    return rates


@contextlib.contextmanager
def gateway(binary: str, lab: KerberosLab, workdir: Path, gss: bool) -> Iterator[tuple[int, int]]:
    port = free_port()
    auth: dict[str, Any] = {"methods": ["none"]}
    if gss:  # left out for plain alone, so a build from before GSS-API can be measured
        auth = {
            "methods": ["gssapi", "none"],
            "gssapi": {
                "keytab": str(lab.keytab),
                "protection": ["none", "integrity", "confidentiality"],
            },
        }
    config = {
        "listen": [f"127.0.0.1:{port}"],
        "auth": auth,
        # Nothing is resolved here; should anything be, it goes nowhere.
        "resolver": {"nameservers": ["127.0.0.1:9"], "hosts_file": None},
        "policy": {"default": "deny", "rules": [{"action": "allow", "clients": ["127.0.0.0/8"],
                                                  "destinations": ["127.0.0.0/8"]}]},
    }  # fmt: skip
    path = workdir / "socks64.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            binary,
            "--log-level",
            os.environ.get("BENCH_LOG", "WARNING"),
            "serve",
            "--config",
            str(path),
        ],
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc, 30.0, time.monotonic)
        yield port, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB each way per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--socks64", default=str(ROOT / ".venv" / "bin" / "socks64"))
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    total = args.mib << 20
    sinks, sources = listening(), listening()
    serve(sinks, sink)
    serve(sources, source)
    rows = []
    with kerberos_lab() as lab, tempfile.TemporaryDirectory() as tmp:
        ccache = lab.ccache("alice")
        gss = modes != ["plain"]
        with gateway(args.socks64, lab, Path(tmp), gss) as (port, pid):
            # A first, unmeasured round: the gateway's first connections pay for imports,
            # caches and the allocator's first growth.
            upload(port, "plain", ccache, sinks.getsockname()[1], min(total, 64 << 20))
            download(port, "plain", ccache, sources.getsockname()[1], min(total, 64 << 20))
            for mode in modes:
                ups, downs, cpu = [], [], []
                for _ in range(args.rounds):
                    before = tree_cpu_seconds(pid)
                    ups.append(upload(port, mode, ccache, sinks.getsockname()[1], total))
                    downs.append(download(port, mode, ccache, sources.getsockname()[1], total))
                    cpu.append((tree_cpu_seconds(pid) - before) / (2 * total / (1 << 30)))
                rows.append((mode, total / median(ups), total / median(downs), median(cpu)))
        ceiling = crypto_ceiling(lab) if gss else []
    base = {mode: (up, down) for mode, up, down, _ in rows}.get("plain")
    print(f"{args.mib} MiB each way, median of {args.rounds}; gateway: {args.socks64}")
    print("| mode | up MiB/s | down MiB/s | gateway CPU s/GiB | up vs plain | down vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, up, down, cpu in rows:
        ratio = f"{up / base[0]:.2f}x | {down / base[1]:.2f}x" if base else "- | -"
        print(f"| {mode} | {up / 2**20:,.0f} | {down / 2**20:,.0f} | {cpu:.2f} | {ratio} |")
    if ceiling:
        relayed = {mode: (up, down) for mode, up, down, _ in rows}
        print()
        print(
            "| level | gss_wrap alone MiB/s | gss_unwrap alone MiB/s"
            " | relay up / unwrap | relay down / wrap |"
        )
        print("|---|---:|---:|---:|---:|")
        for level, wrap, unwrap in ceiling:
            up, down = relayed.get(level, (0.0, 0.0))
            print(
                f"| {level} | {wrap / 2**20:,.0f} | {unwrap / 2**20:,.0f} |"
                f" {up / unwrap:.2f} | {down / wrap:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
