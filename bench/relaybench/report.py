"""Medians over runs, ratios to the best peer, and the Markdown tables."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Result = dict[str, Any]
Runs = dict[str, dict[str, list[Result]]]  # target -> workload -> one result per run


def _sessions(r: Result) -> float | None:
    return float(r["rate"]) if r.get("completed") else None


def _latency(key: str) -> Callable[[Result], float | None]:
    return lambda r: float(r[key]) if r.get("completed") else None


def _bulk(r: Result) -> float | None:
    return float(r["mb_per_s"]) if r.get("connected") else None


def _udp(key: str) -> Callable[[Result], float | None]:
    return lambda r: float(r[key]) if r.get("supported") else None


def _idle(r: Result) -> float | None:
    value = r.get("kib_per_conn")
    return float(value) if value is not None else None


@dataclass(frozen=True)
class Column:
    header: str
    workload: str
    value: Callable[[Result], float | None]
    higher_is_better: bool
    digits: int
    ratio: bool = True
    show_gen: bool = False


COLUMNS = (
    Column("sessions/s", "sessions", _sessions, True, 0, show_gen=True),
    Column("p50 ms", "sessions", _latency("p50_ms"), False, 2),
    Column("p99 ms", "sessions", _latency("p99_ms"), False, 2),
    Column("bulk 1 stream MB/s", "bulk1", _bulk, True, 0, show_gen=True),
    Column("bulk 8 streams MB/s", "bulk8", _bulk, True, 0, show_gen=True),
    Column("UDP datagrams/s", "udp", _udp("rate"), True, 0, show_gen=True),
    Column("UDP loss %", "udp", lambda r: _percent(_udp("loss")(r)), False, 2, ratio=False),
    Column("idle KiB/conn", "idle", _idle, False, 1),
)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def column_median(column: Column, results: list[Result]) -> float | None:
    return median([v for r in results if (v := column.value(r)) is not None])


def gen_median(results: list[Result]) -> float | None:
    return median([r["cpu"]["gen"] for r in results if "cpu" in r])


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _missing_text(column: Column, results: list[Result]) -> str:
    if not results:
        return "—"
    if column.workload == "udp" and not any(r.get("supported") for r in results):
        rep = results[-1].get("rep")
        return f"no UDP (REP {rep})" if isinstance(rep, int) and rep >= 0 else "no UDP"
    return "failed"


def main_table(runs: Runs, targets: list[str]) -> list[str]:
    """One row per target; peers (not ``direct``) get their ratio to the best peer."""
    medians = {
        t: {c.header: column_median(c, runs.get(t, {}).get(c.workload, [])) for c in COLUMNS}
        for t in targets
    }
    peers = [t for t in targets if t != "direct"]
    lines = [
        "| target | " + " | ".join(c.header for c in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for target in targets:
        cells = []
        for column in COLUMNS:
            results = runs.get(target, {}).get(column.workload, [])
            value = medians[target][column.header]
            if value is None:
                cells.append(_missing_text(column, results))
                continue
            text = _number(value, column.digits)
            if column.workload.startswith("bulk") and not all(r.get("complete") for r in results):
                text += "*"
            known = [v for p in peers if (v := medians[p][column.header]) is not None]
            if column.ratio and target != "direct" and known:
                best = max(known) if column.higher_is_better else min(known)
                if best > 0:
                    text += f" ({value / best:.2f}x)"
            gen = gen_median(results)
            if column.show_gen and gen is not None:
                text += f" g{gen:.0f}%"
            cells.append(text)
        label = "direct (no proxy)" if target == "direct" else target
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


CPU_PARTS = ("gen", "proxy", "server", "softirq", "other")


def cpu_table(runs: Runs, targets: list[str], workloads: tuple[str, ...]) -> list[str]:
    """Median CPU (% of one core): generator / proxy / echo-sink server / softirq / rest."""
    shown = [w for w in workloads if w != "idle"]
    lines = ["| target | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
    for target in targets:
        cells = []
        for workload in shown:
            cpu = [r["cpu"] for r in runs.get(target, {}).get(workload, []) if "cpu" in r]
            if not cpu:
                cells.append("—")
                continue
            parts = [median([c[k] for c in cpu]) or 0.0 for k in CPU_PARTS]
            cells.append(" / ".join(f"{p:.0f}" for p in parts))
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return lines


def notes(runs: Runs) -> list[str]:
    """Things a reader must know to trust the numbers: errors, timeouts, saturation."""
    found = []
    for target, workloads in runs.items():
        for workload, results in workloads.items():
            for i, r in enumerate(results, 1):
                where = f"{target} {workload} run {i}"
                if "error" in r:
                    found.append(f"{where}: {r['error']}")
                if r.get("errors"):
                    found.append(f"{where}: {r['errors']} failed sessions/connections")
                if r.get("abandoned"):
                    found.append(f"{where}: {r['abandoned']} sessions still open at the deadline")
                if workload.startswith("bulk") and r.get("connected") and not r.get("complete"):
                    found.append(f"{where}: hit the time limit; rate is bytes sent / time")
                if workload == "idle" and r.get("opened") is not None:
                    wanted = r.get("wanted")
                    if wanted and r["opened"] < wanted:
                        found.append(f"{where}: only {r['opened']} of {wanted} connections")
                gen = r.get("cpu", {}).get("gen", 0.0)
                if workload in ("sessions", "udp", "bulk1") and gen > 90:
                    found.append(f"{where}: generator at {gen:.0f}% of a core (may be the limit)")
    return found
