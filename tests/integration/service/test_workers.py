"""``workers: N``: N processes serve the same listeners and share one ADDRESS ID table.

Real ``socks64 serve`` processes; the kernel spreads connections over the workers'
SO_REUSEPORT sockets, so a test opens enough connections to reach every worker (with 16,
all on one of two workers has odds of 1 in 32768) and reads from the access log (its
logger names the worker: ``socks64.access[1]``) which worker served which.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from tests.dnsserver import DnsServer
from translator.wire import (
    AddressId,
    Command,
    Rep,
    Reply,
    Request,
    UdpDatagram,
    decode_reply,
    decode_udp_datagram,
)

from .gateway_process import (
    GatewayProcess,
    Spawn,
    echo_handler,
    echo_round_trip,
    free_port,
    gateway_config,
    recv_exactly,
    scrape,
    socks_connect,
    socks_greet,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    udp_echo,
    value,
    wait_for_metric,
    write_config,
)
from .test_notify_and_activation import _ACTIVATE as ACTIVATE
from .test_notify_and_activation import _message as notify_message
from .test_notify_and_activation import notify_socket  # noqa: F401 (the fixture)
from .test_unprivileged import BROKEN
from .test_unprivileged import _need_root_and_nobody as need_root_and_nobody

CONNECTIONS = 16
BOTH = {"0", "1"}
LOOPBACK = IPv4Address("127.0.0.1")


def two_workers(
    tmp_path: Path, dns: DnsServer, spawn: Spawn, metrics_port: int | None = None
) -> tuple[GatewayProcess, tuple[str, int]]:
    """A gateway with two workers on a loopback port of its own, ready; and that port."""
    port = free_port()
    document = gateway_config(
        dns.address, [f"127.0.0.1:{port}"], metrics_port=metrics_port, workers=2
    )
    child = serve_workers(spawn, write_config(tmp_path / "socks64.yaml", document))
    return child, ("127.0.0.1", port)


def serve_workers(spawn: Spawn, config: Path, count: int = 2) -> GatewayProcess:
    child = spawn("serve", "--config", str(config))
    child.wait_for(rf"{count} workers ready \(pids [\d, ]+\)")
    return child


def worker_pids(child: GatewayProcess) -> list[int]:
    found = child.find(r"workers ready \(pids ([\d, ]+)\)")
    return [int(pid) for pid in found[-1].group(1).split(", ")]


def ask(sock: socket.socket, request: Request) -> Reply:
    """One request on a greeted connection; its reply."""
    sock.sendall(request.encode())
    buffer = b""
    while True:
        got = decode_reply(buffer)
        if got is not None:
            return got[0]
        buffer += recv_exactly(sock, 1)


def associate(gateway: tuple[str, int], target: Any) -> Reply:
    with socks_greet(gateway) as sock:
        return ask(sock, Request(Command.ADDRESS_ASSOCIATE, target, 0))


@contextmanager
def connected_by_id(gateway: tuple[str, int], realid: int, port: int) -> Iterator[socket.socket]:
    sock = socks_greet(gateway)
    try:
        reply = ask(sock, Request(Command.CONNECT, AddressId(realid), port))
        assert reply.rep == Rep.SUCCEEDED, reply
        yield sock
    finally:
        sock.close()


def workers_in_log(
    child: GatewayProcess,
    after: int = 0,
    *,
    command: str = "",
    expect: set[str] | None = None,
    timeout: float = 5.0,
) -> set[str]:
    """Which workers wrote an access line (for ``command``); with ``expect``, waits (up to
    ``timeout``) until those are seen: an access line is written as its session ends, and
    stderr reaches the test through a reader thread."""
    pattern = rf"socks64\.access\[(\d+)\]: .*{command}"
    deadline = time.monotonic() + timeout
    while True:
        seen = {m.group(1) for m in child.find(pattern, after=after)}
        if expect is None or seen == expect or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_an_id_from_one_worker_works_on_every_worker(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    metrics = free_port()
    with tcp_server(echo_handler) as echo:
        child, gateway = two_workers(tmp_path, dns, spawn, metrics)
        replies = [associate(gateway, LOOPBACK) for _ in range(CONNECTIONS)]
        assert {r.rep for r in replies} == {Rep.SUCCEEDED}
        ids = {r.address for r in replies}
        assert len(ids) == 1, ids  # the same owner and target: the same ID on every worker
        (realid,) = (i.realid for i in ids if isinstance(i, AddressId))
        for n in range(CONNECTIONS):
            with connected_by_id(gateway, realid, echo.port) as relayed:
                echo_round_trip(relayed, b"by id %d" % n)
        wait_for_metric(metrics, "socks64_sessions_total", CONNECTIONS, command="CONNECT")
        assert workers_in_log(child, command=f"CONNECT \\[id:{realid:06x}\\]", expect=BOTH) == BOTH
        samples = scrape(metrics)
        assert value(samples, "socks64_workers") == 2
        assert value(samples, "socks64_address_ids") == 1  # one table, not one per worker
        # A foreign owner's view is an unknown ID wherever it lands: REP X'09'.
        with socks_greet(gateway) as sock:
            reply = ask(sock, Request(Command.CONNECT, AddressId(realid ^ 0x5A5A5A), echo.port))
            assert reply.rep == Rep.INVALID_ADDRESS
        assert child.stop() == 0
    child.assert_clean()


def test_a_dead_worker_is_replaced_and_only_its_clients_lose_their_sessions(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    metrics = free_port()
    with tcp_server(echo_handler) as echo, ExitStack() as stack:
        child, gateway = two_workers(tmp_path, dns, spawn, metrics)
        realid = associate(gateway, LOOPBACK).address
        assert isinstance(realid, AddressId)
        sessions = [
            stack.enter_context(connected_by_id(gateway, realid.realid, echo.port))
            for _ in range(CONNECTIONS)
        ]
        for sock in sessions:
            echo_round_trip(sock, b"before")
        victim = worker_pids(child)[0]
        mark = child.mark()
        os.kill(victim, signal.SIGKILL)
        child.wait_for(rf"worker 0 \(pid {victim}\) exited with signal SIGKILL", after=mark)
        child.wait_for(r"socks64\[0\]: config .*; ready", after=mark, timeout=20)
        survivors = lost = 0
        for sock in sessions:
            sock.settimeout(5)
            try:
                echo_round_trip(sock, b"after")
            except (ConnectionError, OSError):
                lost += 1
            else:
                survivors += 1
        assert survivors and lost, (survivors, lost)  # only the dead worker's clients
        # The table lives in the supervisor: the ID still works, on the new worker too.
        for _ in range(CONNECTIONS):
            with connected_by_id(gateway, realid.realid, echo.port) as relayed:
                echo_round_trip(relayed, b"new")
        assert workers_in_log(child, after=mark, expect=BOTH) == BOTH
        wait_for_metric(metrics, "socks64_worker_restarts_total", 1)
        wait_for_metric(metrics, "socks64_workers", 2)
    assert child.stop() == 0
    child.assert_clean()


def test_reload_and_stop_reach_every_worker(tmp_path: Path, dns: DnsServer, spawn: Spawn) -> None:
    port = free_port()
    path = tmp_path / "socks64.yaml"
    config = write_config(path, gateway_config(dns.address, [f"127.0.0.1:{port}"], workers=2))
    child = serve_workers(spawn, config)
    mark = child.mark()
    rules = [{"action": "deny", "commands": ["ASSOCIATE"]}]
    write_config(path, gateway_config(dns.address, [f"127.0.0.1:{port}"], rules=rules, workers=2))
    child.signal(signal.SIGHUP)
    for slot in (0, 1):
        child.wait_for(rf"socks64\.server\[{slot}\]: reloaded {re.escape(str(path))}", after=mark)
    # Whichever worker answers, the new policy is in force.
    for _ in range(CONNECTIONS):
        assert associate(("127.0.0.1", port), LOOPBACK).rep == Rep.NOT_ALLOWED
    mark = child.mark()
    child.signal(signal.SIGTERM)
    assert child.wait(timeout=15) == 0
    for slot in (0, 1):
        assert child.find(rf"socks64\[{slot}\]: stopping", after=mark)
    assert child.find(r"socks64: stopped$", after=mark)
    child.assert_clean()


def test_systemd_hears_from_the_supervisor_once_for_all_workers(
    tmp_path: Path,
    dns: DnsServer,
    spawn: Spawn,
    notify_socket: socket.socket,  # noqa: F811 (the fixture)
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "socks64.yaml", gateway_config(dns.address, [f"127.0.0.1:{port}"], workers=2)
    )
    child = spawn(
        "serve", "--config", str(config), env={"NOTIFY_SOCKET": notify_socket.getsockname()}
    )
    ready = notify_message(notify_socket)
    assert ready["READY"] == "1" and "2/2 workers" in ready["STATUS"], ready
    for slot in (0, 1):  # both were ready before READY=1 (their lines may still be in transit)
        child.wait_for(rf"socks64\[{slot}\]: config .*; ready$", timeout=5)
    mark = child.mark()
    child.signal(signal.SIGHUP)
    assert notify_message(notify_socket)["RELOADING"] == "1"
    assert notify_message(notify_socket)["READY"] == "1"
    for slot in (0, 1):
        child.wait_for(rf"socks64\.server\[{slot}\]: reloaded ", after=mark, timeout=5)
    child.signal(signal.SIGTERM)
    assert notify_message(notify_socket) == {"STOPPING": "1"}
    assert child.wait(timeout=15) == 0
    child.assert_clean()


def test_workers_share_a_socket_passed_by_systemd(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    own_port = free_port()
    config = write_config(
        tmp_path / "socks64.yaml",
        gateway_config(dns.address, [f"127.0.0.1:{own_port}"], workers=2),
    )
    passed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with contextlib.closing(passed), tcp_server(echo_handler) as echo:
        passed.bind(("127.0.0.1", 0))
        passed.listen(64)
        activated = ("127.0.0.1", int(passed.getsockname()[1]))
        argv = [sys.executable, "-c", ACTIVATE, str(passed.fileno())]
        argv += ["serve", "--config", str(config)]
        child = spawn(argv=argv, pass_fds=[passed.fileno()])
        child.wait_for(r"2 workers ready .*; listening on .*")
        passed.close()
        # One socket for all: whichever worker the kernel wakes first accepts, so which
        # serves is not spread evenly. What matters: every worker serves it, so one dying
        # leaves it served.
        for n in range(4):
            with socks_connect(activated, "127.0.0.1", echo.port) as relayed:
                echo_round_trip(relayed, b"passed %d" % n)
        # Every access line so far has reached us before a mark (they are written as each
        # session ends, and read by a thread): the line after a mark is the next session's.
        deadline = time.monotonic() + 5
        while len(child.find(r"socks64\.access\[")) < 4:
            assert time.monotonic() < deadline, child.output
            time.sleep(0.05)
        for slot in (0, 1):  # each worker alone in turn (the other just died) serves it
            mark = child.mark()
            os.kill(worker_pids(child)[slot], signal.SIGKILL)
            child.wait_for(rf"worker {slot} \(pid \d+\) exited", after=mark)
            with socks_connect(activated, "127.0.0.1", echo.port) as relayed:
                echo_round_trip(relayed, b"by the other worker")
            served = child.wait_for(r"socks64\.access\[(\d+)\]:", after=mark)
            assert served.group(1) == str(1 - slot)
            child.wait_for(rf"socks64\[{slot}\]: config .*; ready$", after=mark, timeout=20)
        assert child.stop() == 0
    child.assert_clean()


def test_workers_drop_to_the_user_and_the_supervisor_keeps_root(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    nobody = need_root_and_nobody()
    tmp_path.chmod(0o755)  # nobody reads the config on reload
    port = free_port()
    config = write_config(
        tmp_path / "socks64.yaml",
        gateway_config(dns.address, [f"127.0.0.1:{port}"], workers=2, user="nobody"),
    )
    config.chmod(0o644)
    gateway = ("127.0.0.1", port)
    with tcp_server(echo_handler) as echo:
        child = serve_workers(spawn, config)
        for pid in worker_pids(child):
            assert _uid_of(pid) == nobody.pw_uid
        assert _uid_of(child.pid) == 0  # it starts workers exactly like the first ones
        realid = associate(gateway, LOOPBACK).address
        assert isinstance(realid, AddressId)
        for _ in range(CONNECTIONS):
            with connected_by_id(gateway, realid.realid, echo.port) as relayed:
                echo_round_trip(relayed, b"as nobody")
        assert workers_in_log(child, expect=BOTH) == BOTH
        victim = worker_pids(child)[1]
        mark = child.mark()
        os.kill(victim, signal.SIGKILL)
        child.wait_for(r"socks64\[1\]: config .*; ready$", after=mark, timeout=20)
        assert child.stop() == 0
    assert not BROKEN.search(child.output), child.output
    child.assert_clean()


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


@contextmanager
def udp_session(
    gateway: tuple[str, int], command: Command
) -> Iterator[tuple[socket.socket, tuple[str, int]]]:
    """A UDP association (its control connection held open): the client's socket and the
    relay's address."""
    with (
        socks_greet(gateway) as control,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        reply = ask(control, Request(command, LOOPBACK, client.getsockname()[1]))
        assert reply.rep == Rep.SUCCEEDED, reply
        yield client, ("127.0.0.1", reply.port)


def test_a_datagram_to_an_id_made_on_another_worker_is_relayed(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    with udp_echo() as echo:
        child, gateway = two_workers(tmp_path, dns, spawn)
        realid = associate(gateway, LOOPBACK).address
        assert isinstance(realid, AddressId)
        for n in range(CONNECTIONS):
            with udp_session(gateway, Command.UDP_ASSOCIATE) as (client, relay):
                payload = b"datagram %d" % n
                client.sendto(UdpDatagram(realid, echo.port, payload).encode(), relay)
                answer = decode_udp_datagram(client.recv(65536))
                assert answer.data == b"echo:" + payload
                assert answer.address == LOOPBACK and answer.port == echo.port
        assert workers_in_log(child, command="UDP_ASSOCIATE ", expect=BOTH) == BOTH
        assert child.stop() == 0
    child.assert_clean()


def test_udp_aa_names_peers_by_ids_every_worker_knows(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    with udp_echo() as echo:
        child, gateway = two_workers(tmp_path, dns, spawn)
        seen: set[AddressId] = set()
        for n in range(CONNECTIONS):
            with udp_session(gateway, Command.UDP_ASSOCIATE_AA) as (client, relay):
                payload = b"aa %d" % n
                client.sendto(UdpDatagram(LOOPBACK, echo.port, payload).encode(), relay)
                answer = decode_udp_datagram(client.recv(65536))
                assert answer.data == b"echo:" + payload
                assert isinstance(answer.address, AddressId)  # the peer, as an ID
                seen.add(answer.address)
        assert len(seen) == 1  # one owner, one peer: one ID, whichever worker rendered it
        (peer,) = seen
        for _ in range(4):
            assert associate(gateway, peer).address == peer  # and every worker knows it
        assert workers_in_log(child, command="UDP_ASSOCIATE_AA ", expect=BOTH) == BOTH
        assert child.stop() == 0
    child.assert_clean()
