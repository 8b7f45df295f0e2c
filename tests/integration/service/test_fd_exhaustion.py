"""A ``socks64 serve`` child that runs out of descriptors: it says so at start, rests
instead of spinning while saturated (accepting pauses and resumes by itself), and serves a
new client at once when descriptors come free. ``check-config`` warns likewise."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.dnsserver import DnsServer

from .gateway_process import (
    ROOT,
    SOCKS64,
    Spawn,
    connect_request,
    echo_handler,
    echo_round_trip,
    free_port,
    gateway_config,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    value,
    write_config,
)
from .test_fair_share import nofile_at_least, scrape, timed_connect

NOFILE = 256  # soft and hard: the start-up raise cannot lift it
FLOOD = 600  # connections held open: more than NOFILE can take (the rest wait in the backlog)
SOURCES = [f"127.0.0.{i}" for i in range(1, 7)]
CPU_WINDOW = 2.0
MAX_CPU = 0.5  # cores, while saturated
TICKS = os.sysconf("SC_CLK_TCK")
CAPACITY_WARNING = (
    r"limits\.max_clients is (\d+) but the descriptor limit \(RLIMIT_NOFILE 256\) "
    r"serves about (\d+) clients"
)
#: runs argv[1:] with RLIMIT_NOFILE soft and hard at NOFILE (exec: the pid stays the same)
LIMITED = [
    sys.executable,
    "-c",
    "import os, resource, sys\n"
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE}))\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
]


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of stat(5)


def flood_size() -> int:
    """FLOOD, or fewer when a small net.core.somaxconn would leave connects hanging (a full
    backlog drops SYNs): still well past what NOFILE descriptors can take."""
    with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
        backlog = min(1024, int(f.read()))
    return min(FLOOD, NOFILE + backlog - 16)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def held_connections(gateway: tuple[str, int], count: int) -> Iterator[list[socket.socket]]:
    """``count`` idle connections from 127.0.0.x; the kernel completes them into the
    listener's backlog even when the gateway cannot accept them. Closed on the way out."""
    held: list[socket.socket] = []
    try:
        for i in range(count):
            source = SOURCES[i % len(SOURCES)]
            held.append(socket.create_connection(gateway, timeout=3, source_address=(source, 0)))
        yield held
    finally:
        for sock in held:
            sock.close()


def test_out_of_descriptors_rests_and_recovers(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    port, metrics_port = free_port(), free_port()
    data = gateway_config(dns.address, [f"127.0.0.1:{port}"], metrics_port=metrics_port)
    data["limits"] = {"max_clients": 4096, "per_client": 100000, "per_client_handshake": 100000}
    # the flood must stay while the CPU is measured
    data["timeouts"] = {**data["timeouts"], "handshake": 60.0}
    config = write_config(tmp_path / "socks64.yaml", data)
    gateway = ("127.0.0.1", port)
    with nofile_at_least(FLOOD + 1024), tcp_server(echo_handler) as echo:
        child = spawn(argv=[*LIMITED, "-m", "translator.cli", "serve", "--config", str(config)])
        child.wait_for(r"; ready$")
        # the start-up warning: 4096 clients cannot be served with 256 descriptors
        warning = child.wait_for(CAPACITY_WARNING)
        assert warning.groups() == ("4096", str((NOFILE - 64) // 2))
        with open(f"/proc/{child.pid}/limits", encoding="ascii") as f:
            assert any(
                line.startswith("Max open files") and line.split()[3:5] == [str(NOFILE)] * 2
                for line in f
            )
        # served normally before the flood
        relayed, _ = timed_connect(gateway, "127.0.0.9", echo.port)
        with relayed:
            echo_round_trip(relayed, b"before")

        with held_connections(gateway, flood_size()) as held:
            child.wait_for(r"cannot accept \(\[Errno 24\]")  # EMFILE: paused
            deadline = time.monotonic() + 5
            while open_fds(child.pid) < NOFILE - 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert open_fds(child.pid) >= NOFILE - 2  # saturated
            before, started = cpu_seconds(child.pid), time.monotonic()
            time.sleep(CPU_WINDOW)
            cpu = (cpu_seconds(child.pid) - before) / (time.monotonic() - started)
            assert cpu < MAX_CPU, f"{cpu:.2f} cores while out of descriptors"
            assert open_fds(child.pid) >= NOFILE - 2  # still saturated: measured the right thing
            pause_lines = child.find(r"cannot accept \(")
            # a session it holds still answers: it cannot open its outbound socket (REP 1)
            first = held[0]
            first.sendall(b"\x05\x01\x00")
            assert first.recv(2) == b"\x05\x00"
            assert connect_request(first, "127.0.0.1", echo.port) == 1
            child.wait_for(r"refused REP 1 GENERAL_FAILURE: EMFILE")
            flood_ended = time.monotonic()

        # descriptors come free: a new client is served at once
        relayed, elapsed = timed_connect(gateway, "127.0.0.10", echo.port, timeout=3)
        with relayed:
            echo_round_trip(relayed, b"after")
        served_after = time.monotonic() - flood_ended
        assert served_after < 1.0, served_after

        m = scrape(metrics_port)
        paused = value(m, "socks64_accept_paused_total", reason="EMFILE")
        # about ten pauses a second while saturated, logged about once a second
        assert paused > 0
        assert 1 <= len(pause_lines) <= CPU_WINDOW + 4, pause_lines
        assert child.stop() == 0
    child.assert_clean()
    print(
        f"saturated: {cpu:.3f} cores; {paused:.0f} pauses; served {served_after:.3f} s "
        f"after the flood ended ({elapsed:.3f} s for the CONNECT)"
    )


def test_check_config_warns_when_the_hard_limit_is_too_low(tmp_path: Path) -> None:
    config = tmp_path / "big.yaml"
    config.write_text("limits: {max_clients: 100000}\n", encoding="utf-8")

    done = subprocess.run(
        [*LIMITED, *SOCKS64[1:], "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout, done.stdout
    assert f"{config}: warning: " in done.stderr, done.stderr
    assert "limits.max_clients is 100000 but the descriptor limit (RLIMIT_NOFILE 256)" in (
        done.stderr
    )
    # a max_clients the limit can serve: no warning
    config.write_text("limits: {max_clients: 96}\n", encoding="utf-8")
    done = subprocess.run(
        [*LIMITED, *SOCKS64[1:], "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
