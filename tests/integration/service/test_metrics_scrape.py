"""/metrics after a known set of requests: every counter exact, no traffic data in labels,
and ``socks64 status`` showing the same numbers."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from pathlib import Path

from tests.dnsserver import DnsServer
from translator.client import AddressId, SocksClient

from .gateway_process import (
    SOCKS64,
    Spawn,
    echo_handler,
    echo_round_trip,
    free_port,
    gateway_config,
    recv_exactly,
    refused_rep,
    serve,
    sink_handler,
    socks_connect,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    value,
    wait_for_metric,
    write_config,
)

DENIED_PORT = 9
V4_PAYLOADS = (1, 1000, 300_000)  # the last one is large enough for the splice path
V6_PAYLOAD = 4321


async def _associate(port: int) -> list[AddressId]:
    async with await SocksClient.open("127.0.0.1", port) as client:
        first = await client.associate("web4.test")
        second = await client.associate("web6.test")
        again = await client.associate("web4.test")  # the same ID, not a new one
    assert isinstance(first, AddressId) and isinstance(second, AddressId)
    assert again == first and first != second
    return [first, second]


def test_counters_match_what_was_done(tmp_path: Path, dns: DnsServer, spawn: Spawn) -> None:
    port, metrics_port, closed_port = free_port(), free_port(), free_port()
    rules = [{"action": "deny", "commands": ["connect"], "ports": [DENIED_PORT]}]
    config = write_config(
        tmp_path / "socks64.yaml",
        gateway_config(dns.address, [f"127.0.0.1:{port}"], metrics_port=metrics_port, rules=rules),
    )
    gateway = ("127.0.0.1", port)
    with tcp_server(echo_handler) as echo4, tcp_server(sink_handler, "::1") as sink6:
        child = serve(spawn, config)
        clients: list[str] = []
        for size in V4_PAYLOADS:
            with socks_connect(gateway, "127.0.0.1", echo4.port) as relayed:
                clients.append(f"127.0.0.1:{relayed.getsockname()[1]}")
                echo_round_trip(relayed, b"x" * size)
        with socks_connect(gateway, "web6.test", sink6.port) as relayed:  # IPv4 -> IPv6
            relayed.sendall(b"y" * V6_PAYLOAD)
            relayed.shutdown(socket.SHUT_WR)
            assert recv_exactly(relayed, 8) == V6_PAYLOAD.to_bytes(8, "big")  # the sink's count
        assert refused_rep(gateway, "127.0.0.1", closed_port) == 5
        assert refused_rep(gateway, "127.0.0.1", DENIED_PORT) == 2
        ids = asyncio.run(_associate(port))

        connects = len(V4_PAYLOADS) + 1
        sessions = connects + 2 + 1  # the relays, the two refusals, the ADDRESS control
        m = wait_for_metric(metrics_port, "socks64_sessions_total", sessions)

        def metric(name: str, **labels: str) -> float:
            return value(m, name, **labels)

        requests = "socks64_requests_total"
        assert metric(requests, command="CONNECT", rep="0") == connects
        assert metric(requests, command="CONNECT", atyp="ipv4", rep="0") == len(V4_PAYLOADS)
        assert metric(requests, command="CONNECT", atyp="domain", rep="0") == 1
        assert metric(requests, rep="5") == 1
        assert metric(requests, rep="2") == 1
        assert metric(requests, command="ADDRESS_ASSOCIATE", rep="0") == 3
        assert metric(requests) == connects + 2 + 3
        assert metric("socks64_address_ids_issued_total") == len(ids)
        assert metric("socks64_address_ids") == len(ids)

        sessions_total = "socks64_sessions_total"
        assert metric(sessions_total, command="CONNECT", end="ok") == connects
        assert metric(sessions_total, command="CONNECT", end="refused") == 2
        assert metric(sessions_total, command="ADDRESS_ASSOCIATE") == 1
        assert metric("socks64_sessions_active") == 0
        assert metric("socks64_auth_total", method="none", result="ok") == sessions
        assert metric("socks64_auth_total") == sessions
        assert metric("socks64_connections_accepted_total") == sessions

        relayed_bytes = "socks64_relayed_bytes_total"
        v4_bytes = sum(V4_PAYLOADS)
        assert metric(relayed_bytes, protocol="tcp", direction="up", family="ipv4") == v4_bytes
        assert metric(relayed_bytes, protocol="tcp", direction="down", family="ipv4") == v4_bytes
        assert metric(relayed_bytes, protocol="tcp", direction="up", family="ipv6") == V6_PAYLOAD
        assert metric(relayed_bytes, protocol="tcp", direction="down", family="ipv6") == 8
        translations = "socks64_translations_total"
        v4_to = {"protocol": "tcp", "client_family": "ipv4"}
        assert metric(translations, **v4_to, destination_family="ipv6") == 1
        assert metric(translations, **v4_to, destination_family="ipv4") == len(V4_PAYLOADS)
        assert metric(translations) == connects
        assert metric("socks64_config_reloads_total") == 0
        assert metric("socks64_listener_info", endpoint=f"127.0.0.1:{port}") == 1
        assert metric("process_resident_memory_bytes") > 0
        assert any(s.name == "process_open_fds" for s in m)

        # No label carries a client address, a destination or a name (only the gateway's
        # own listener endpoints may look like an address).
        used = {"127.0.0.1", "::1", "[::1]", "web4.test", "web6.test", *clients}
        used |= {f"127.0.0.1:{p}" for p in (echo4.port, closed_port, DENIED_PORT)}
        used |= {f"[::1]:{sink6.port}", f"web6.test:{sink6.port}", str(ids[0].realid)}
        for sample in m:
            if not sample.name.startswith("socks64_"):
                continue
            for label, text in sample.labels.items():
                if label in ("listener", "endpoint"):
                    continue
                assert text not in used, sample
                assert not re.search(r"\d+\.\d+\.\d+\.\d+|::|\.test", text), sample

        status = subprocess.run(
            [*SOCKS64, "status", "--metrics", f"http://127.0.0.1:{metrics_port}/metrics"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0, status.stderr
        view = status.stdout
        assert f"listeners: 127.0.0.1:{port}" in view, view
        assert "sessions: 0 active" in view, view
        assert f"connections: {sessions} accepted, 0 rejected" in view, view
        assert re.search(r"^\s+1\s+REP 5 \(connection refused\)$", view, re.MULTILINE), view
        assert re.search(r"^\s+1\s+REP 2 \(not allowed by ruleset\)$", view, re.MULTILINE), view
        assert "ADDRESS IDs: 2 live, 2 issued" in view, view
        assert "ipv6: up 4.2 KiB, down 8 B" in view, view
        assert "process: RSS " in view, view
        assert child.stop() == 0
    child.assert_clean()
