"""sd_notify against a real AF_UNIX datagram socket; socket activation in a child process
that receives a real listening socket as fd 3, as systemd would pass it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from translator.service.notify import Notifier, listen_fds

REPO = Path(__file__).resolve().parents[3]
TIMEOUT = 30


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value. Short
    directory: AF_UNIX paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="sd") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            yield sock, path


@pytest.fixture
def notifier(receiver: tuple[socket.socket, str]) -> Iterator[Notifier]:
    n = Notifier.from_env({"NOTIFY_SOCKET": receiver[1]})
    try:
        yield n
    finally:
        n.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on sock (at least one), as text."""
    messages = [sock.recv(4096).decode()]
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return messages


def test_ready_sends_ready_and_status(
    receiver: tuple[socket.socket, str], notifier: Notifier
) -> None:
    assert notifier.enabled
    assert notifier.ready("listening on 127.0.0.1:1080")
    assert received(receiver[0]) == ["READY=1\nSTATUS=listening on 127.0.0.1:1080"]


def test_reloading_carries_monotonic_timestamp(
    receiver: tuple[socket.socket, str], notifier: Notifier
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = received(receiver[0])
    first, second = message.split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping_and_status(receiver: tuple[socket.socket, str], notifier: Notifier) -> None:
    assert notifier.status("serving 3 clients\nof 4096")
    assert notifier.stopping()
    assert received(receiver[0]) == ["STATUS=serving 3 clients of 4096", "STOPPING=1"]


def test_one_socket_for_all_messages(
    receiver: tuple[socket.socket, str], notifier: Notifier
) -> None:
    """The socket is opened once and kept: the sender address stays the same."""
    senders = []
    for i in range(3):
        assert notifier.status(f"n={i}")
        _, sender = receiver[0].recvfrom(4096)
        senders.append(sender)
    assert senders[0] == senders[1] == senders[2]


def test_abstract_socket() -> None:
    name = f"socks64-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        try:
            assert notifier.ready("up")
        finally:
            notifier.close()
        assert received(sock) == ["READY=1\nSTATUS=up"]


def test_disabled_without_notify_socket(receiver: tuple[socket.socket, str]) -> None:
    for environ in ({}, {"NOTIFY_SOCKET": ""}):
        notifier = Notifier.from_env(environ)
        assert not notifier.enabled
        assert not notifier.ready("up")
        assert not notifier.reloading()
        assert not notifier.stopping()
        assert not notifier.status("x")
        notifier.close()
    receiver[0].setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver[0].recv(4096)


def test_closed_notifier_sends_nothing(
    receiver: tuple[socket.socket, str], notifier: Notifier
) -> None:
    notifier.close()
    assert not notifier.enabled
    assert not notifier.ready("up")
    receiver[0].setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver[0].recv(4096)


def test_vanished_socket_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with tempfile.TemporaryDirectory(prefix="sd") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
        os.unlink(path)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
        try:
            with caplog.at_level(logging.WARNING, logger="socks64.service"):
                assert not notifier.ready("up")
                assert not notifier.stopping()
        finally:
            notifier.close()
    warnings = [r for r in caplog.records if r.name == "socks64.service"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert path in warnings[0].getMessage()


def test_malformed_line_is_a_programming_error() -> None:
    notifier = Notifier.from_env({})
    with pytest.raises(ValueError):
        notifier.send("READY")
    with pytest.raises(ValueError):
        notifier.send("STATUS=a\nREADY=1")


# --- socket activation -------------------------------------------------------------------

# Plays systemd: puts the passed descriptor on fd 3 and execs the service with LISTEN_PID
# set to its own pid, which exec keeps.
LAUNCHER = """
import os, sys
fd, count = int(sys.argv[1]), sys.argv[2]
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=count, LISTEN_FDNAMES="socks")
os.execve(sys.executable, [sys.executable, "-c", sys.argv[3]], env)
"""

SERVICE = """
import json, os
from translator.service.notify import listen_fds
try:
    sockets = listen_fds()
except ValueError as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({
        "socknames": [list(s.getsockname()[:2]) for s in sockets],
        "blocking": [s.getblocking() for s in sockets],
        "inheritable": [os.get_inheritable(s.fileno()) for s in sockets],
        "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }))
"""


def activate(fd: int, count: int = 1) -> dict[str, object]:
    """Run SERVICE as systemd would start it with fd passed as fd 3; its JSON report."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(fd), str(count), SERVICE],
        pass_fds=(fd,),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    return report


def test_listen_fds_takes_the_passed_listener() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        report = activate(listener.fileno())
        assert report == {
            "socknames": [list(listener.getsockname())],
            "blocking": [False],
            "inheritable": [False],
            "env": [],
        }


def test_listen_fds_rejects_a_datagram_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        report = activate(udp.fileno())
    error = str(report.get("error"))
    assert "fd 3" in error and "SOCK_DGRAM" in error


def test_listen_fds_rejects_a_tcp_socket_that_does_not_listen() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        report = activate(tcp.fileno())
    error = str(report.get("error"))
    assert "fd 3" in error and "not listening" in error


def test_listen_fds_rejects_a_non_socket() -> None:
    read_end, write_end = os.pipe()
    try:
        report = activate(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    error = str(report.get("error"))
    assert "fd 3" in error and "not a socket" in error


def test_listen_fds_rejects_a_missing_descriptor() -> None:
    """LISTEN_FDS=2 but only fd 3 was passed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        report = activate(listener.fileno(), count=2)
    error = str(report.get("error"))
    assert "fd 4" in error and "not open" in error


def test_listen_fds_for_another_process() -> None:
    """The variables were meant for another pid (inherited): nothing is taken, and they are
    removed so that no process started later takes them either."""
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "socks", "PATH": "/bin"}
    assert listen_fds(environ, pid=4242) == []
    assert environ == {"PATH": "/bin"}


def test_listen_fds_without_activation() -> None:
    environ = {"PATH": "/bin"}
    assert listen_fds(environ) == []
    assert environ == {"PATH": "/bin"}


def test_listen_fds_malformed_pid() -> None:
    with pytest.raises(ValueError, match="LISTEN_PID"):
        listen_fds({"LISTEN_PID": "abc", "LISTEN_FDS": "1"})
