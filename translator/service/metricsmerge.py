"""One exposition for all workers: their metric families, merged at scrape time.

Counters, histograms and most gauges add up across workers (sessions, bytes, CPU seconds,
memory). A few families describe something every worker sees whole, and are taken once
(the maximum): the shared ID table's counters, the listeners, the reloads (each worker
reloads once per SIGHUP), the interpreter. Start times take the earliest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.samples import Sample

#: families every worker reports in full: summing would count them once per worker
SAME_IN_EVERY_WORKER = frozenset(
    {
        "socks64_address_ids",
        "socks64_address_ids_expired",
        "socks64_address_ids_issued",
        "socks64_address_ids_quarantined",
        "socks64_address_ids_refused",
        "socks64_config_reloads",
        "socks64_listener_info",
        "python_info",
    }
)


def _combine(family: str, sample: str, old: float, new: float) -> float:
    if sample.endswith("_created") or sample == "process_start_time_seconds":
        return min(old, new)
    if family in SAME_IN_EVERY_WORKER:
        return max(old, new)
    return old + new


def merge(workers: Sequence[Iterable[Metric]]) -> list[Metric]:
    """The families of every worker as one process's."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in workers:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            found = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = found.get(key)
                found[key] = (
                    sample.value
                    if old is None
                    else _combine(family.name, sample.name, old, sample.value)
                )
    for name, family in merged.items():
        family.samples = [
            Sample(sample, dict(labels), value) for (sample, labels), value in values[name].items()
        ]
    return list(merged.values())


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render(families: list[Metric]) -> bytes:
    """The text exposition of already collected families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


CONTENT_TYPE = CONTENT_TYPE_LATEST
