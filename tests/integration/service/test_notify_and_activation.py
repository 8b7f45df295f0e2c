"""The systemd protocol against real sockets: sd_notify datagrams on an AF_UNIX socket of
our own (NOTIFY_SOCKET), and socket activation with a listener passed as fd 3."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer

from .gateway_process import (
    Spawn,
    echo_handler,
    echo_round_trip,
    free_port,
    gateway_config,
    socks_connect,
    socks_greet,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    wait_for_metric,
    write_config,
)

_SUN_PATH_MAX = 107


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """An AF_UNIX datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify"
    short: tempfile.TemporaryDirectory[str] | None = None
    if len(str(path).encode()) > _SUN_PATH_MAX:  # a long tmp_path: sun_path is 108 bytes
        short = tempfile.TemporaryDirectory(prefix="s64n")
        path = Path(short.name) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        yield sock
    finally:
        sock.close()
        if short is not None:
            short.cleanup()


def _message(sock: socket.socket, timeout: float = 15.0) -> dict[str, str]:
    """The next state message as {KEY: VALUE}, skipping the periodic STATUS= updates."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no notify message in time"
        sock.settimeout(left)
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.split("\n") if line)
        if set(fields) != {"STATUS"}:
            return fields


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_ready_reloading_stopping(
    tmp_path: Path, dns: DnsServer, spawn: Spawn, notify_socket: socket.socket
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "socks64.yaml", gateway_config(dns.address, [f"127.0.0.1:{port}"])
    )
    child = spawn(
        "serve", "--config", str(config), env={"NOTIFY_SOCKET": notify_socket.getsockname()}
    )
    ready = _message(notify_socket)
    # The first message is READY=1, and by then the listener accepts and serves.
    socks_greet(("127.0.0.1", port)).close()
    assert ready["READY"] == "1", ready
    assert f"listening on 127.0.0.1:{port}" in ready["STATUS"], ready
    assert "0 sessions" in ready["STATUS"], ready

    # SIGHUP: RELOADING=1 with the time the reload began, then READY=1 once it is done.
    mark = child.mark()
    before = _monotonic_usec()
    child.signal(signal.SIGHUP)
    reloading = _message(notify_socket)
    after = _monotonic_usec()
    assert reloading.keys() == {"RELOADING", "MONOTONIC_USEC"}, reloading
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    ready = _message(notify_socket)
    assert ready["READY"] == "1" and "STATUS" in ready, ready
    child.wait_for(r"socks64\.server: reloaded ", after=mark, timeout=5)  # before READY=1

    # SIGTERM: STOPPING=1, then a clean exit.
    child.signal(signal.SIGTERM)
    assert _message(notify_socket) == {"STOPPING": "1"}
    assert child.wait(timeout=10) == 0
    child.assert_clean()


def test_a_reload_that_fails_unexpectedly_still_ends_with_ready(
    tmp_path: Path, dns: DnsServer, spawn: Spawn, notify_socket: socket.socket
) -> None:
    port, metrics_port = free_port(), free_port()
    document = gateway_config(dns.address, [f"127.0.0.1:{port}"], metrics_port=metrics_port)
    config = write_config(tmp_path / "socks64.yaml", document)
    child = spawn(
        "serve", "--config", str(config), env={"NOTIFY_SOCKET": notify_socket.getsockname()}
    )
    assert _message(notify_socket)["READY"] == "1"
    # A group id too large for the system: reading it raises OverflowError, not ConfigError.
    write_config(config, {**document, "group": 1 << 70})
    mark = child.mark()
    child.signal(signal.SIGHUP)
    assert _message(notify_socket)["RELOADING"] == "1"
    assert _message(notify_socket)["READY"] == "1"  # systemd is not left "reloading"
    child.wait_for(r"ERROR socks64(\.server)?: reload failed", after=mark, timeout=5)
    wait_for_metric(metrics_port, "socks64_config_reloads_total", 1, result="error")
    with (
        tcp_server(echo_handler) as echo,
        socks_connect(("127.0.0.1", port), "127.0.0.1", echo.port) as relayed,
    ):
        echo_round_trip(relayed, b"still serving")
    child.signal(signal.SIGTERM)
    assert _message(notify_socket) == {"STOPPING": "1"}
    assert child.wait(timeout=10) == 0


# Sets the socket-activation variables for its own pid, moves the passed socket to fd 3
# (SD_LISTEN_FDS_START) and execs socks64: the pid stays the same, as under systemd.
_ACTIVATE = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.executable, [sys.executable, "-m", "translator.cli", *sys.argv[2:]])
"""


def test_socket_activation_serves_the_passed_listener(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    own_port = free_port()  # the config's listen: somewhere else
    config = write_config(
        tmp_path / "socks64.yaml", gateway_config(dns.address, [f"127.0.0.1:{own_port}"])
    )
    pid_file = tmp_path / "socks64.pid"
    passed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with contextlib.closing(passed), tcp_server(echo_handler) as echo:
        passed.bind(("127.0.0.1", 0))
        passed.listen(16)
        activated = ("127.0.0.1", int(passed.getsockname()[1]))
        argv = [sys.executable, "-c", _ACTIVATE, str(passed.fileno())]
        argv += ["serve", "--config", str(config), "--pid-file", str(pid_file)]
        child = spawn(argv=argv, pass_fds=[passed.fileno()])
        child.wait_for(r"; ready$")
        passed.close()  # only the gateway holds the listener now
        # LISTEN_PID named the gateway itself: the wrapper exec'd, the pid is the child's.
        assert int(pid_file.read_text()) == child.pid
        assert child.listening() == [activated, ("127.0.0.1", own_port)], child.output

        with socks_connect(activated, "127.0.0.1", echo.port) as relayed:
            echo_round_trip(relayed, b"through the passed socket")
        # A reload never closes a passed listener.
        mark = child.mark()
        child.signal(signal.SIGHUP)
        child.wait_for(r"socks64\.server: reloaded ", after=mark)
        with socks_connect(activated, "127.0.0.1", echo.port) as relayed:
            echo_round_trip(relayed, b"after the reload")
        assert child.stop() == 0
    child.assert_clean()
