"""translator.metrics: names, counts, listener labels, scrape-time sources."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from translator.metrics import Metrics, table_metrics, udp_metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    """Every sample in a render(), keyed by sample name and label set."""
    out: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def test_exposition_names_every_metric() -> None:
    text = Metrics().render().decode()
    for name in (
        "socks64_connections_accepted_total",
        "socks64_connections_rejected_total",
        "socks64_accept_paused_total",
        "socks64_sessions_active",
        "socks64_sessions_total",
        "socks64_requests_total",
        "socks64_auth_total",
        "socks64_relayed_bytes_total",
        "socks64_translations_total",
        "socks64_connect_duration_seconds",
        "socks64_dns_duration_seconds",
        "socks64_config_reloads_total",
        "socks64_listener_info",
        "process_cpu_seconds_total",
        "python_info",
        "python_gc_objects_collected_total",
    ):
        assert f"# TYPE {name} " in text, name


def test_registries_are_private() -> None:
    """Two gateways in one process: no duplicate-registration error, no shared counts."""
    a, b = Metrics(), Metrics()
    a.request("CONNECT", "ipv4", 0)
    assert value(a, "socks64_requests_total", command="CONNECT", atyp="ipv4", rep="0") == 1
    assert value(b, "socks64_requests_total", command="CONNECT", atyp="ipv4", rep="0") is None


def test_counters_count_what_was_done() -> None:
    m = Metrics(process=False)
    for _ in range(3):
        m.request("CONNECT", "ipv6", 0)
    m.request("CONNECT", "domain", 2)
    m.bytes_relayed("tcp", "ipv4", 100, 2500)
    m.bytes_relayed("tcp", "ipv4", 0, 500)
    m.translation("tcp", "ipv6", "ipv4")
    m.translation("udp", "ipv4", "ipv6", n=7)
    m.connection_accepted("[::1]:1080")
    m.connection_rejected("per_client")
    m.accept_pause("EMFILE")
    m.auth_result("username", "failed")
    m.config_reload(True)
    m.config_reload(False)
    m.connect_seconds.labels("ipv6").observe(0.003)
    m.dns_seconds.observe(0.2)

    v = samples(m)

    def get(name: str, **labels: str) -> float | None:
        return v.get((name, frozenset(labels.items())))

    assert get("socks64_requests_total", command="CONNECT", atyp="ipv6", rep="0") == 3
    assert get("socks64_requests_total", command="CONNECT", atyp="domain", rep="2") == 1
    assert get("socks64_relayed_bytes_total", protocol="tcp", direction="up", family="ipv4") == 100
    assert (
        get("socks64_relayed_bytes_total", protocol="tcp", direction="down", family="ipv4") == 3000
    )
    assert (
        get("socks64_translations_total", protocol="tcp", client_family="ipv6",
            destination_family="ipv4") == 1
    )  # fmt: skip
    assert (
        get("socks64_translations_total", protocol="udp", client_family="ipv4",
            destination_family="ipv6") == 7
    )  # fmt: skip
    assert get("socks64_connections_accepted_total", listener="[::1]:1080") == 1
    assert get("socks64_connections_rejected_total", reason="per_client") == 1
    assert get("socks64_accept_paused_total", reason="EMFILE") == 1
    assert get("socks64_auth_total", method="username", result="failed") == 1
    assert get("socks64_config_reloads_total", result="ok") == 1
    assert get("socks64_config_reloads_total", result="error") == 1
    assert get("socks64_connect_duration_seconds_bucket", family="ipv6", le="0.005") == 1
    assert get("socks64_connect_duration_seconds_bucket", family="ipv6", le="0.0025") == 0
    assert get("socks64_dns_duration_seconds_count") == 1


def test_sessions_active_follows_the_session() -> None:
    m = Metrics(process=False)
    m.session_started("handshake")
    m.session_started("handshake")
    m.session_changed("handshake", "CONNECT")
    assert value(m, "socks64_sessions_active", command="handshake") == 1
    assert value(m, "socks64_sessions_active", command="CONNECT") == 1
    m.session_ended("CONNECT", "ok")
    m.session_ended("handshake", "client_gone")
    assert value(m, "socks64_sessions_active", command="handshake") == 0
    assert value(m, "socks64_sessions_active", command="CONNECT") == 0
    assert value(m, "socks64_sessions_total", command="CONNECT", end="ok") == 1
    assert value(m, "socks64_sessions_total", command="handshake", end="client_gone") == 1


def test_set_listeners_removes_stale_endpoints() -> None:
    m = Metrics(process=False)
    m.set_listeners(["127.0.0.1:1080", "[::1]:1080"])
    assert value(m, "socks64_listener_info", endpoint="127.0.0.1:1080") == 1
    assert value(m, "socks64_listener_info", endpoint="[::1]:1080") == 1
    m.set_listeners(["[::1]:1080", "0.0.0.0:1081"])
    assert value(m, "socks64_listener_info", endpoint="127.0.0.1:1080") is None
    assert value(m, "socks64_listener_info", endpoint="[::1]:1080") == 1
    assert value(m, "socks64_listener_info", endpoint="0.0.0.0:1081") == 1
    m.set_listeners([])
    assert not any(name == "socks64_listener_info" for name, _ in samples(m))


def test_sources_are_read_at_scrape_time() -> None:
    m = Metrics(process=False)
    state = {"live": 3}
    m.add_source(lambda: table_metrics(state["live"], 1, 2, 10, 7, 4, 5))
    m.add_source(lambda: udp_metrics(2, 100, 90, {"policy": 3, "oversize": 1}, 6))
    state["live"] = 4
    v = samples(m)

    def get(name: str, **labels: str) -> float | None:
        return v.get((name, frozenset(labels.items())))

    assert get("socks64_address_ids") == 4
    assert get("socks64_address_ids_pinned") == 1
    assert get("socks64_address_ids_quarantined") == 2
    assert get("socks64_address_ids_issued_total") == 10
    assert get("socks64_address_ids_expired_total") == 7
    assert get("socks64_address_ids_refused_total", reason="quota") == 4
    assert get("socks64_address_ids_refused_total", reason="capacity") == 5
    assert get("socks64_udp_associations_active") == 2
    assert get("socks64_udp_datagrams_total", direction="up") == 100
    assert get("socks64_udp_datagrams_total", direction="down") == 90
    assert get("socks64_udp_dropped_total", reason="policy") == 3
    assert get("socks64_udp_dropped_total", reason="oversize") == 1
    assert get("socks64_udp_peer_evictions_total") == 6
    text = m.render().decode()
    assert "# TYPE socks64_address_ids_issued_total counter" in text
    assert "_total_total" not in text
