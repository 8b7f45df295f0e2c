"""translator.service.status: the human view of /metrics, and the command against a server."""

from __future__ import annotations

import asyncio
import io
import socket

from translator.metrics import Metrics, table_metrics, transparent_metrics, udp_metrics
from translator.net.exporter import MetricsServer
from translator.service.status import human_bytes, main, summarize


def busy_gateway() -> Metrics:
    """A Metrics with known values, as a gateway would have produced them."""
    m = Metrics()
    m.set_listeners(["127.0.0.1:1080", "[::1]:1080"])
    for _ in range(3):
        m.session_started("handshake")
    m.session_changed("handshake", "CONNECT")
    m.session_changed("handshake", "UDP_ASSOCIATE")
    for _ in range(10):
        m.connection_accepted("127.0.0.1:1080")
    m.connection_accepted("[::1]:1080")
    m.connection_rejected("per_client")
    m.connection_rejected("per_client")
    for _ in range(4):
        m.request("CONNECT", "domain", 0)
    for _ in range(7):
        m.request("CONNECT", "ipv4", 2)
    m.request("CONNECT", "ipv6", 2)
    for _ in range(3):
        m.request("CONNECT", "domain", 5)
    m.request("BIND", "ipv4", 7)
    m.bytes_relayed("tcp", "ipv4", 1536, 3 * 1024 * 1024)
    m.bytes_relayed("udp", "ipv4", 512, 0)
    m.bytes_relayed("tcp", "ipv6", 100, 200)
    m.config_reload(True)
    m.config_reload(True)
    m.config_reload(False)
    m.add_source(lambda: table_metrics(5, 1, 2, 12, 7, 0, 0))
    m.add_source(lambda: udp_metrics(1, 10, 9, {}, 0))
    return m


def test_summarize_a_known_gateway() -> None:
    view = summarize(busy_gateway().render().decode())
    lines = view.splitlines()
    assert "listeners: 127.0.0.1:1080, [::1]:1080" in lines
    assert "sessions: 3 active (CONNECT 1, UDP_ASSOCIATE 1, handshake 1)" in lines
    assert "UDP associations: 1 active" in lines
    assert "ADDRESS IDs: 5 live, 12 issued, 2 quarantined" in lines
    assert "connections: 11 accepted, 2 rejected" in lines
    top = lines[lines.index("top refusals:") + 1 :][:4]
    assert [line.split(None, 1) for line in top] == [
        ["8", "REP 2 (not allowed by ruleset)"],
        ["3", "REP 5 (connection refused)"],
        ["2", "rejected at accept: per_client"],
        ["1", "REP 7 (command not supported)"],
    ]
    assert "  ipv4: up 2.0 KiB, down 3.0 MiB" in lines
    assert "  ipv6: up 100 B, down 200 B" in lines
    assert "config reloads: 2 ok, 1 error" in lines
    process = next(line for line in lines if line.startswith("process: "))
    assert "RSS " in process and "CPU " in process and "open fds" in process


def test_missing_metrics_leave_their_lines_out() -> None:
    m = Metrics(process=False)
    m.request("CONNECT", "ipv4", 0)
    view = summarize(m.render().decode())
    assert "UDP associations" not in view
    assert "ADDRESS IDs" not in view
    assert "process:" not in view
    assert "top refusals" not in view
    assert summarize("") == ""


def test_top_refusals_stop_at_five() -> None:
    m = Metrics(process=False)
    for rep in range(1, 10):
        for _ in range(rep):
            m.request("CONNECT", "ipv4", rep)
    lines = summarize(m.render().decode()).splitlines()
    start = lines.index("top refusals:") + 1
    top = [line for line in lines[start:] if line.startswith(" ")]  # its indented entries
    assert [line.split()[1:3] for line in top] == [["REP", str(r)] for r in (9, 8, 7, 6, 5)]


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1024) == "1.0 KiB"
    assert human_bytes(int(1.2 * 1024**2)) == "1.2 MiB"
    assert human_bytes(5 * 1024**4) == "5.0 TiB"
    assert human_bytes(2048 * 1024**4) == "2048.0 TiB"


async def test_main_prints_the_view_from_a_server() -> None:
    server = MetricsServer(busy_gateway(), "127.0.0.1", 0)
    await server.start()
    out, err = io.StringIO(), io.StringIO()
    try:
        url = f"http://{server.endpoint}/metrics"
        status = await asyncio.to_thread(main, ["--metrics", url], stdout=out, stderr=err)
    finally:
        await server.close()
    assert status == 0, err.getvalue()
    assert "ADDRESS IDs: 5 live, 12 issued, 2 quarantined" in out.getvalue()
    assert "REP 2 (not allowed by ruleset)" in out.getvalue()
    assert err.getvalue() == ""


async def test_main_on_a_wrong_path_reports_the_http_status() -> None:
    server = MetricsServer(Metrics(process=False), "127.0.0.1", 0)
    await server.start()
    err = io.StringIO()
    try:
        url = f"http://{server.endpoint}/nothing"
        status = await asyncio.to_thread(main, ["--metrics", url], stdout=io.StringIO(), stderr=err)
    finally:
        await server.close()
    assert status == 1
    assert err.getvalue() == f"socks64 status: {url} answered HTTP 404 Not Found\n"


def test_main_on_an_unreachable_url() -> None:
    with socket.socket() as grab:
        grab.bind(("127.0.0.1", 0))
        port = grab.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    out, err = io.StringIO(), io.StringIO()
    assert main(["--metrics", url], stdout=out, stderr=err) == 1
    assert out.getvalue() == ""
    assert err.getvalue().startswith(f"socks64 status: cannot reach {url}: ")
    assert "refused" in err.getvalue().lower()


def test_the_transparent_front_has_its_line_and_its_refusals() -> None:
    m = Metrics(process=False)
    m.add_source(
        lambda: transparent_metrics(
            answers={"synthesized": 4, "forwarded": 9},
            flows={("tcp", "ipv6"): 3, ("udp", "ipv6"): 1},
            refusals={("tcp", "unbound"): 2},
            active={"tcp": 1, "udp": 0},
            bound=2,
            quarantined=0,
            size=131070,
        )
    )
    lines = summarize(m.render().decode()).splitlines()
    assert (
        "transparent: 2 of 131070 pool addresses bound; DNS46 4 synthesized, 9 forwarded; "
        "flows tcp 3 (1 open), udp 1 (0 open)"
    ) in lines
    assert lines[lines.index("top refusals:") + 1].split(None, 1) == ["2", "transparent: unbound"]


def test_workers_have_their_line() -> None:
    text = (
        "# TYPE socks64_workers gauge\nsocks64_workers 4.0\n"
        "# TYPE socks64_worker_restarts counter\nsocks64_worker_restarts_total 1.0\n"
    )
    assert "workers: 4 running, 1 restarted" in summarize(text).splitlines()
    assert "workers" not in summarize(busy_gateway().render().decode())
