"""translator.metrics: hot-path counts wait in a dict and reach the metrics before any
collection reads them, however the registry is read."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from translator.metrics import Metrics


def _value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_a_collection_by_the_registry_itself_sees_pending_counts() -> None:
    m = Metrics(process=False)
    m.request("CONNECT", "ipv4", 0)
    m.session_started("handshake")
    m.session_changed("handshake", "CONNECT")
    m.connection_accepted("127.0.0.1:1080")
    m.auth_result("none", "ok")
    text = generate_latest(m.registry).decode()  # not through Metrics.render
    assert _value(text, "socks64_requests_total", command="CONNECT", atyp="ipv4", rep="0") == 1
    assert _value(text, "socks64_sessions_active", command="handshake") == 0
    assert _value(text, "socks64_sessions_active", command="CONNECT") == 1
    assert _value(text, "socks64_connections_accepted_total", listener="127.0.0.1:1080") == 1
    assert _value(text, "socks64_auth_total", method="none", result="ok") == 1
    assert m.registry.get_sample_value(
        "socks64_requests_total", {"command": "CONNECT", "atyp": "ipv4", "rep": "0"}
    ) == 1  # fmt: skip


def test_counts_add_up_across_flushes() -> None:
    m = Metrics(process=False)
    for _ in range(3):
        m.bytes_relayed("tcp", "ipv6", 10, 20)
    m.render()
    m.bytes_relayed("tcp", "ipv6", 1, 0)
    m.session_started("handshake")
    m.session_ended("handshake", "client_gone")
    text = m.render().decode()
    up = _value(text, "socks64_relayed_bytes_total", protocol="tcp", direction="up", family="ipv6")
    down = _value(
        text, "socks64_relayed_bytes_total", protocol="tcp", direction="down", family="ipv6"
    )
    assert (up, down) == (31, 60)
    assert _value(text, "socks64_sessions_active", command="handshake") == 0
    assert _value(text, "socks64_sessions_total", command="handshake", end="client_gone") == 1


def test_observations_wait_for_a_scrape_but_not_forever() -> None:
    m = Metrics(process=False)
    child = m.connect_seconds.labels("ipv4")
    m.observe(child, 0.003)
    text = m.render().decode()
    assert _value(text, "socks64_connect_duration_seconds_count", family="ipv4") == 1
    assert _value(text, "socks64_connect_duration_seconds_bucket", family="ipv4", le="0.005") == 1
    for _ in range(5000):  # nobody scrapes: the list is applied when it grows
        m.observe(child, 0.5)
    assert len(m._observed) < 5000
    text = m.render().decode()
    assert _value(text, "socks64_connect_duration_seconds_count", family="ipv4") == 5001
