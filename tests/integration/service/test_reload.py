"""SIGHUP reload of a running ``socks64 serve``: new requests follow the new config at once,
everything already running (a 1 GiB relay, a UDP association, ADDRESS IDs, kept
listeners) carries on untouched, and a broken config changes nothing."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.dnsserver import DnsServer
from translator.client import AddressId, SocksClient
from translator.wire import Atyp

from .gateway_process import (
    SOCKS64,
    GatewayProcess,
    Spawn,
    connection_refused,
    echo_handler,
    echo_round_trip,
    free_port,
    gateway_config,
    refused_rep,
    scrape,
    serve,
    sink_handler,
    socks_connect,
    socks_greet,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    udp_echo,
    value,
    wait_for_metric,
    write_config,
)

GIB = 1 << 30
_CHUNK = 16 << 20


def _reload(child: GatewayProcess, config: Path, data: dict[str, Any]) -> int:
    """Write the new config and SIGHUP; the log mark to wait for the outcome from."""
    write_config(config, data)
    mark = child.mark()
    child.signal(signal.SIGHUP)
    return mark


def _deny_connect_to(port: int) -> list[dict[str, Any]]:
    return [{"action": "deny", "commands": ["connect"], "ports": [port], "comment": "reload"}]


class _Upload(threading.Thread):
    """1 GiB through a CONNECT relay to the counting sink, in two halves: the second half
    waits for ``resume`` (so the reload falls inside the transfer). ``reported`` is the
    count the sink answers after our EOF."""

    def __init__(self, gateway: tuple[str, int], port: int) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.port = port
        self.half_sent = threading.Event()
        self.resume = threading.Event()
        self.sent = 0
        self.reported: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with socks_connect(self.gateway, "127.0.0.1", self.port) as sock:
                sock.settimeout(60)
                block = memoryview(bytes(_CHUNK))
                for half in (0, 1):
                    if half:
                        self.half_sent.set()
                        if not self.resume.wait(60):
                            raise TimeoutError("the test never resumed the upload")
                    for _ in range(GIB // 2 // _CHUNK):
                        sock.sendall(block)
                        self.sent += _CHUNK
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while len(answer) < 8:
                    data = sock.recv(8 - len(answer))
                    if not data:
                        raise ConnectionError("no count from the sink")
                    answer += data
                self.reported = int.from_bytes(answer, "big")
                assert sock.recv(1) == b""
        except BaseException as exc:
            self.error = exc
            self.half_sent.set()


async def test_reload_keeps_a_transfer_an_association_and_ids(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    port, metrics_port = free_port(), free_port()
    gateway = ("127.0.0.1", port)
    config = tmp_path / "socks64.yaml"
    old = gateway_config(dns.address, [f"127.0.0.1:{port}"], metrics_port=metrics_port)
    write_config(config, old)
    with (
        tcp_server(sink_handler) as sink,
        tcp_server(echo_handler, "::1") as echo6,
        udp_echo() as udp_peer,
    ):
        child = serve(spawn, config)
        upload = _Upload(gateway, sink.port)
        upload.start()
        try:
            async with (
                await SocksClient.open(*gateway) as control,
                await (await SocksClient.open(*gateway)).udp_associate() as udp,
            ):
                # Before: an ID on a control connection we keep, a UDP round trip.
                realid = await control.associate("web6.test")
                assert isinstance(realid, AddressId) and realid.realid != 0
                await udp.send("127.0.0.1", udp_peer.port, b"before")
                assert (await udp.recv()).data == b"echo:before"
                assert await asyncio.to_thread(upload.half_sent.wait, 60)
                assert upload.error is None, upload.error
                assert sink.received > 0

                # The new policy denies CONNECT to the very port the upload goes to.
                new = {**old, "policy": {**old["policy"]}}
                new["policy"]["rules"] = _deny_connect_to(sink.port) + old["policy"]["rules"]
                mark = _reload(child, config, new)
                await child.await_line(r"socks64\.server: reloaded .*; 2 policy rules", after=mark)

                # New requests follow the new policy at once.
                assert await asyncio.to_thread(refused_rep, gateway, "127.0.0.1", sink.port) == 2
                # The association carries on.
                await udp.send("127.0.0.1", udp_peer.port, b"after")
                assert (await udp.recv()).data == b"echo:after"
                # The ID still names web6.test: by a new connection, and on the kept one.
                async with await SocksClient.open(*gateway) as again:
                    stream = await again.connect(realid, echo6.port)
                    stream.writer.write(b"by id")
                    assert await asyncio.wait_for(stream.reader.readexactly(5), 5) == b"by id"
                assert await control.associate(realid, Atyp.DOMAIN) == "web6.test"
                stream = await control.connect(realid, echo6.port)
                stream.writer.write(b"kept")
                assert await asyncio.wait_for(stream.reader.readexactly(4), 5) == b"kept"
                # The upload has been waiting all this time, half done.
                assert upload.is_alive() and upload.sent == GIB // 2
        finally:
            upload.resume.set()
            await asyncio.to_thread(upload.join, 120)
        assert not upload.is_alive()
        assert upload.error is None, upload.error
        assert upload.sent == GIB and upload.reported == GIB and sink.received == GIB

        # The gateway counted it too: the whole GiB up, the 8-byte count down.
        samples = await asyncio.to_thread(
            wait_for_metric, metrics_port, "socks64_config_reloads_total", 1, result="ok"
        )
        assert value(samples, "socks64_config_reloads_total", result="error") == 0
        sunk = rf"127\.0\.0\.1:{sink.port}"
        line = await child.await_line(rf"CONNECT {sunk} -> {sunk} .* up=(\d+) down=(\d+) .* ok$")
        assert (int(line.group(1)), int(line.group(2))) == (GIB, 8), line.string
        assert (await asyncio.to_thread(child.stop)) == 0
    child.assert_clean()


def test_a_broken_config_changes_nothing(tmp_path: Path, dns: DnsServer, spawn: Spawn) -> None:
    port, added, metrics_port = free_port(), free_port(), free_port()
    gateway = ("127.0.0.1", port)
    config = tmp_path / "socks64.yaml"
    old = gateway_config(dns.address, [f"127.0.0.1:{port}"], metrics_port=metrics_port)
    write_config(config, old)
    with tcp_server(echo_handler) as echo:
        child = serve(spawn, config)
        with socks_connect(gateway, "127.0.0.1", echo.port) as relayed:
            echo_round_trip(relayed, b"before")

        # A valid-looking file (a new listener, a policy that denies the echo port) with one
        # unknown key: rejected as a whole.
        broken = gateway_config(
            dns.address,
            [f"127.0.0.1:{port}", f"127.0.0.1:{added}"],
            metrics_port=metrics_port,
            rules=_deny_connect_to(echo.port),
            limits={"max_clientz": 10},
        )
        mark = _reload(child, config, broken)
        failed = child.wait_for(r"ERROR socks64\.server: reload failed", after=mark)
        assert "(limits.max_clientz)" in failed.string and "unknown key" in failed.string
        samples = wait_for_metric(metrics_port, "socks64_config_reloads_total", 1, result="error")
        assert value(samples, "socks64_config_reloads_total", result="ok") == 0
        _assert_unchanged(gateway, added, echo.port, samples)

        # Not YAML at all: the same.
        config.write_text("listen: [127.0.0.1:1\npolicy: {", encoding="utf-8")
        mark = child.mark()
        child.signal(signal.SIGHUP)
        failed = child.wait_for(r"ERROR socks64\.server: reload failed", after=mark)
        assert "not valid YAML" in failed.string
        samples = wait_for_metric(metrics_port, "socks64_config_reloads_total", 2, result="error")
        _assert_unchanged(gateway, added, echo.port, samples)
        assert child.stop() == 0
    child.assert_clean()


def _assert_unchanged(
    gateway: tuple[str, int], added: int, echo_port: int, samples: list[Any]
) -> None:
    with socks_connect(gateway, "127.0.0.1", echo_port) as relayed:  # the old policy
        echo_round_trip(relayed, b"still allowed")
    assert connection_refused(("127.0.0.1", added))
    listeners = {s.labels["endpoint"] for s in samples if s.name == "socks64_listener_info"}
    assert listeners == {f"127.0.0.1:{gateway[1]}"}


def _listening_inode(port: int) -> str:
    """The inode of the socket listening on 127.0.0.1:PORT (/proc/net/tcp)."""
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":  # TCP_LISTEN
            return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


class _Hammer(threading.Thread):
    """Opens SOCKS connections (greeting answered) to one listener until stopped."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.stop = threading.Event()
        self.served = 0
        self.failures: list[BaseException] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                socks_greet(self.address, timeout=5).close()
                self.served += 1
            except (OSError, AssertionError) as exc:
                self.failures.append(exc)


def test_listeners_added_removed_and_kept(tmp_path: Path, dns: DnsServer, spawn: Spawn) -> None:
    kept, removed, added, metrics_port = (free_port() for _ in range(4))
    config = tmp_path / "socks64.yaml"
    old = gateway_config(
        dns.address,
        [f"127.0.0.1:{kept}", f"127.0.0.1:{removed}"],
        metrics_port=metrics_port,
        limits={"per_client_handshake": 1024},  # the hammer's connections may pile up
    )
    write_config(config, old)
    with tcp_server(echo_handler) as echo:
        child = serve(spawn, config)
        assert connection_refused(("127.0.0.1", added))
        inode = _listening_inode(kept)
        hammer = _Hammer(("127.0.0.1", kept))
        with socks_connect(("127.0.0.1", removed), "127.0.0.1", echo.port) as through_removed:
            echo_round_trip(through_removed, b"before")
            hammer.start()
            try:
                deadline = time.monotonic() + 10
                while hammer.served < 20:  # connecting while the reload happens
                    assert time.monotonic() < deadline and not hammer.failures
                    time.sleep(0.01)
                new = {**old, "listen": [f"127.0.0.1:{kept}", f"127.0.0.1:{added}"]}
                mark = _reload(child, config, new)
                child.wait_for(
                    rf"reloaded .*: 1 listener\(s\) added 127\.0\.0\.1:{added}, "
                    rf"1 removed 127\.0\.0\.1:{removed};",
                    after=mark,
                )
                served_at_reload = hammer.served
                while hammer.served < served_at_reload + 20:
                    assert time.monotonic() < deadline and not hammer.failures
                    time.sleep(0.01)
            finally:
                hammer.stop.set()
                hammer.join(10)
            assert not hammer.failures, hammer.failures[:3]
            assert _listening_inode(kept) == inode  # the same socket, never reopened

            assert connection_refused(("127.0.0.1", removed))
            echo_round_trip(through_removed, b"after")  # the session through it carries on
        with socks_connect(("127.0.0.1", added), "127.0.0.1", echo.port) as relayed:
            echo_round_trip(relayed, b"new listener")
        with socks_connect(("127.0.0.1", kept), "127.0.0.1", echo.port) as relayed:
            echo_round_trip(relayed, b"kept listener")
        samples = scrape(metrics_port)
        listeners = {s.labels["endpoint"] for s in samples if s.name == "socks64_listener_info"}
        assert listeners == {f"127.0.0.1:{kept}", f"127.0.0.1:{added}"}
        assert child.stop() == 0
    access = child.find(rf"CONNECT 127\.0\.0\.1:{echo.port} .* up=11 down=11 .* ok$")
    assert len(access) == 1, child.output  # the relay through the removed listener, whole
    child.assert_clean()


def test_socks64_reload_with_the_pid_file(tmp_path: Path, dns: DnsServer, spawn: Spawn) -> None:
    port, metrics_port = free_port(), free_port()
    gateway = ("127.0.0.1", port)
    config = tmp_path / "socks64.yaml"
    pid_file = tmp_path / "socks64.pid"
    old = gateway_config(dns.address, [f"127.0.0.1:{port}"], metrics_port=metrics_port)
    write_config(config, old)
    with tcp_server(echo_handler) as echo:
        child = serve(spawn, config, "--pid-file", str(pid_file))
        assert pid_file.read_text() == f"{child.pid}\n"
        with socks_connect(gateway, "127.0.0.1", echo.port) as relayed:
            echo_round_trip(relayed, b"allowed")

        write_config(config, {**old, "policy": {"rules": _deny_connect_to(echo.port)}})
        mark = child.mark()
        done = subprocess.run(
            [*SOCKS64, "reload", "--pid-file", str(pid_file)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"sent SIGHUP to {child.pid}"
        child.wait_for(r"socks64: SIGHUP: reloading ", after=mark)
        child.wait_for(r"socks64\.server: reloaded .*; 1 policy rules", after=mark)
        wait_for_metric(metrics_port, "socks64_config_reloads_total", 1, result="ok")
        assert refused_rep(gateway, "127.0.0.1", echo.port) == 2  # the new policy
        assert child.stop() == 0
    assert not pid_file.exists()  # removed at exit
    child.assert_clean()

    # No gateway behind the file: a clear error, exit 1.
    done = subprocess.run(
        [*SOCKS64, "reload", "--pid-file", str(pid_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and str(pid_file) in done.stderr and not done.stdout
