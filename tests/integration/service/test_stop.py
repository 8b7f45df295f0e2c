"""SIGTERM: no new connections at once, ``shutdown_grace`` for the running relays, exit 0."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from tests.dnsserver import DnsServer

from .gateway_process import (
    Spawn,
    connection_refused,
    echo_handler,
    echo_round_trip,
    free_port,
    gateway_config,
    serve,
    socks_connect,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    write_config,
)


def test_sigterm_stops_accepting_and_lets_a_running_relay_finish(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    grace = 3.0
    port = free_port()
    config = write_config(
        tmp_path / "socks64.yaml",
        gateway_config(dns.address, [f"127.0.0.1:{port}"], shutdown_grace=grace),
    )
    with tcp_server(echo_handler) as echo:
        child = serve(spawn, config)
        gateway = ("127.0.0.1", port)
        with socks_connect(gateway, "127.0.0.1", echo.port) as relayed:
            echo_round_trip(relayed, b"before")
            mark = child.mark()
            stopped_at = time.monotonic()
            child.signal(signal.SIGTERM)
            child.wait_for(r"stopped accepting; 1 session\(s\) have 3 s", after=mark, timeout=5)
            # The listener is closed by now: refused, not queued in a backlog.
            assert connection_refused(gateway)
            assert time.monotonic() - stopped_at < 1.0
            # A reload now (`socks64 reload` from cron) is ignored, never fatal.
            child.signal(signal.SIGHUP)
            child.wait_for(r"SIGHUP while stopping: not reloading", after=mark, timeout=5)
            # The relay keeps working inside the grace, the process waits for it.
            for n in range(5):
                echo_round_trip(relayed, b"during %d" % n)
                time.sleep(0.1)
            assert child.process.poll() is None
            assert connection_refused(gateway)
        # The client leaves: the last session is done, the process ends before the grace.
        assert child.wait(timeout=grace + 2) == 0
        assert time.monotonic() - stopped_at < grace + 2
    assert child.find(r"socks64\.access: .* CONNECT 127\.0\.0\.1:\d+ .* up=46 down=46 .* ok"), (
        child.output
    )
    child.assert_clean()


def test_a_session_outliving_the_grace_is_closed_and_the_process_exits_0(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    grace = 1.5
    port = free_port()
    config = write_config(
        tmp_path / "socks64.yaml",
        gateway_config(dns.address, [f"127.0.0.1:{port}"], shutdown_grace=grace),
    )
    with tcp_server(echo_handler) as echo:
        child = serve(spawn, config)
        with socks_connect(("127.0.0.1", port), "127.0.0.1", echo.port) as relayed:
            echo_round_trip(relayed, b"ping")
            stopped_at = time.monotonic()
            child.signal(signal.SIGTERM)
            time.sleep(0.3)
            echo_round_trip(relayed, b"still relayed")  # within the grace
            # The client stays: at the end of the grace the gateway closes the relay.
            relayed.settimeout(grace + 5)
            assert relayed.recv(100) == b""
            closed_after = time.monotonic() - stopped_at
            assert grace - 0.2 <= closed_after <= grace + 2, closed_after
        assert child.wait(timeout=5) == 0
        assert time.monotonic() - stopped_at <= grace + 2
    # The session that was cut short is logged once, as stopped.
    access = child.find(r"socks64\.access: .* CONNECT ")
    assert len(access) == 1, child.output
    assert re.search(r" up=17 down=17 bytes \S+ stopped$", access[0].string), child.output
    child.assert_clean()


def test_a_second_sigterm_ends_the_grace_at_once(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "socks64.yaml",
        gateway_config(dns.address, [f"127.0.0.1:{port}"], shutdown_grace=60.0),
    )
    with tcp_server(echo_handler) as echo:
        child = serve(spawn, config)
        with socks_connect(("127.0.0.1", port), "127.0.0.1", echo.port) as relayed:
            echo_round_trip(relayed, b"ping")
            mark = child.mark()
            child.signal(signal.SIGTERM)
            child.wait_for(r"stopped accepting; 1 session\(s\) have 60 s", after=mark, timeout=5)
            echo_round_trip(relayed, b"in the grace")
            again = time.monotonic()
            child.signal(signal.SIGTERM)
            relayed.settimeout(10)
            assert relayed.recv(100) == b""  # closed now, not after 60 s
            assert child.wait(timeout=5) == 0
            assert time.monotonic() - again < 3
    child.wait_for(r"stop signal again: closing 1 session\(s\) now", after=mark, timeout=1)
    # Logged once, with the bytes it relayed before it was cut.
    stopped = child.find(r"socks64\.access: .* CONNECT ")
    assert len(stopped) == 1, child.output
    assert re.search(r" up=16 down=16 bytes \S+ stopped$", stopped[0].string), child.output
    child.assert_clean()
