"""The supervisor's exposition: every worker's families merged into one process's."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from translator.metrics import Metrics, table_metrics
from translator.service.metricsmerge import merge, render


def worker(sessions: int, ids: int) -> list:
    metrics = Metrics()
    metrics.set_listeners(["127.0.0.1:1080"])
    for _ in range(sessions):
        metrics.session_started("CONNECT")
        metrics.session_ended("CONNECT", "ok")
    metrics.config_reload(True)
    families = list(metrics.registry.collect())
    return families + table_metrics(ids, 1, 0, ids, 0, 0, 0)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_counters_add_up_and_shared_things_count_once() -> None:
    merged = samples(render(merge([worker(3, 7), worker(5, 7)])))
    assert merged[("socks64_sessions_total", (("command", "CONNECT"), ("end", "ok")))] == 8
    assert merged[("socks64_address_ids", ())] == 7  # one table, seen whole by both
    assert merged[("socks64_address_ids_pinned", ())] == 2  # each worker's own pins
    assert merged[("socks64_listener_info", (("endpoint", "127.0.0.1:1080"),))] == 1
    assert merged[("socks64_config_reloads_total", (("result", "ok"),))] == 1  # one SIGHUP
    cpu = [v for (name, _), v in merged.items() if name == "process_cpu_seconds_total"]
    assert len(cpu) <= 1  # a single series (summed), where the platform has it


def test_created_and_start_times_take_the_earliest() -> None:
    first, second = worker(1, 0), worker(1, 0)
    merged = samples(render(merge([first, second])))
    created = [
        s.value
        for family in [*first, *second]
        for s in family.samples
        if s.name == "socks64_sessions_created"
    ]
    assert merged[("socks64_sessions_created", (("command", "CONNECT"), ("end", "ok")))] == min(
        created
    )


def test_no_worker_answering_gives_an_empty_but_valid_exposition() -> None:
    assert samples(render(merge([]))) == {}
