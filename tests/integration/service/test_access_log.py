"""The access log as an operator reads it: one line per finished session on stderr, in text
or JSON, with ``--log-level`` / ``--log-format`` before or after ``serve``."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.dnsserver import DnsServer

from .gateway_process import (
    GatewayProcess,
    Spawn,
    TcpServer,
    connect_request,
    echo_handler,
    echo_round_trip,
    free_port,
    gateway_config,
    socks_connect,
    socks_greet,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    write_config,
)

DENIED_PORT = 9  # the policy denies CONNECT to it (nothing listens there)


def _config(tmp_path: Path, dns: DnsServer, port: int) -> Path:
    rules = [{"action": "deny", "commands": ["connect"], "ports": [DENIED_PORT]}]
    return write_config(
        tmp_path / "socks64.yaml",
        gateway_config(dns.address, [f"127.0.0.1:{port}"], rules=rules),
    )


def _sessions(gateway: tuple[str, int], echo6: TcpServer) -> tuple[str, str]:
    """One relayed CONNECT from IPv4 to web6.test (::1), one refused by the policy; the
    client labels ("127.0.0.1:PORT") of both."""
    with socks_connect(gateway, "web6.test", echo6.port) as relayed:
        ok_client = f"127.0.0.1:{relayed.getsockname()[1]}"
        echo_round_trip(relayed, b"hello")
        echo_round_trip(relayed, b"world!")
    with socks_greet(gateway) as sock:
        refused_client = f"127.0.0.1:{sock.getsockname()[1]}"
        assert connect_request(sock, "127.0.0.1", DENIED_PORT) == 2
        assert sock.recv(10) == b""  # the gateway closes after the failure reply
    return ok_client, refused_client


def _stop(child: GatewayProcess) -> None:
    assert child.stop() == 0
    child.assert_clean()


def test_text_access_lines(tmp_path: Path, dns: DnsServer, spawn: Spawn) -> None:
    port = free_port()
    with tcp_server(echo_handler, "::1") as echo6:
        child = spawn("serve", "--config", str(_config(tmp_path, dns, port)))
        child.wait_for(r"; ready$")
        ok_client, refused_client = _sessions(("127.0.0.1", port), echo6)
        _stop(child)  # every session has finished (and been logged) before the exit

    access = child.find(r" INFO socks64\.access: (.*)$")
    assert len(access) == 2, child.output
    # (the relay's line may come second: it ends when the gateway sees the client's EOF)
    ok, refused = sorted((m.group(1) for m in access), key=lambda line: refused_client in line)
    expected = (
        rf"^{re.escape(ok_client)}: user=- CONNECT web6\.test:{echo6.port} -> "
        rf"\[::1\]:{echo6.port} ipv4->ipv6 up=11 down=11 bytes \d+\.\d{{3}}s ok$"
    )
    assert re.search(expected, ok), ok
    assert refused.startswith(f"{refused_client}: user=- CONNECT 127.0.0.1:{DENIED_PORT} -> - ")
    assert re.search(r" up=0 down=0 bytes \S+ refused REP 2 NOT_ALLOWED: denied by policy", refused)
    # Logged once: the access line is the only line naming either client.
    for client in (ok_client, refused_client):
        assert sum(client in line for line in child.lines) == 1, child.output


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (["--log-format", "json"], ["--log-level", "debug"]),
        (["--log-level", "DEBUG"], ["--log-format", "JSON"]),
    ],
    ids=["format-before-level-after", "level-before-format-after"],
)
def test_json_lines_with_options_before_and_after_serve(
    tmp_path: Path, dns: DnsServer, spawn: Spawn, before: list[str], after: list[str]
) -> None:
    port = free_port()
    with tcp_server(echo_handler, "::1") as echo6:
        child = spawn(*before, "serve", "--config", str(_config(tmp_path, dns, port)), *after)
        child.wait_for(r'"message": "config .*; ready"')
        ok_client, refused_client = _sessions(("127.0.0.1", port), echo6)
        _stop(child)

    records: list[dict[str, Any]] = []
    for line in child.lines:
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    assert any(r["level"] == "DEBUG" for r in records)  # --log-level DEBUG took effect
    access = [r for r in records if r["logger"] == "socks64.access"]
    assert len(access) == 2, records
    keys = {"client", "user", "command", "requested", "reached", "client_family"}
    keys |= {"destination_family", "up", "down", "duration", "end"}
    for record in access:
        assert keys <= record.keys(), record
    ok, refused = sorted(access, key=lambda record: record["client"] == refused_client)
    assert ok["client"] == ok_client and ok["user"] is None and ok["command"] == "CONNECT"
    assert ok["requested"] == f"web6.test:{echo6.port}"
    assert ok["reached"] == f"[::1]:{echo6.port}"
    assert (ok["client_family"], ok["destination_family"]) == ("ipv4", "ipv6")
    assert (ok["up"], ok["down"], ok["end"]) == (11, 11, "ok")
    assert isinstance(ok["duration"], float | int) and ok["duration"] >= 0
    assert refused["client"] == refused_client
    assert refused["requested"] == f"127.0.0.1:{DENIED_PORT}" and refused["reached"] == "-"
    assert (refused["end"], refused["rep"]) == ("refused", 2)
    assert "denied by policy" in refused["reason"]
    # The refusal is told once at INFO and above: by its access record.
    for client in (ok_client, refused_client):
        naming = [r for r in records if r["level"] != "DEBUG" and client in json.dumps(r)]
        assert len(naming) == 1, naming


def test_log_level_warning_silences_the_access_log(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    port = free_port()
    with tcp_server(echo_handler, "::1") as echo6:
        child = spawn(
            "serve", "--config", str(_config(tmp_path, dns, port)), "--log-level", "warning"
        )
        # Nothing is logged at start: wait for the port instead of a line.
        _wait_accepting(("127.0.0.1", port), child)
        _sessions(("127.0.0.1", port), echo6)
        _stop(child)
    assert child.lines == [], child.output


def _wait_accepting(address: tuple[str, int], child: GatewayProcess) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(address, timeout=2).close()
            return
        except ConnectionRefusedError:
            assert child.process.poll() is None, child.output
            assert time.monotonic() < deadline, "the gateway never listened"
            time.sleep(0.05)
