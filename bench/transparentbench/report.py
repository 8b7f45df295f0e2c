"""The report: medians over runs, transparent / SOCKS ratios, Markdown and JSON output.

Each cell is the median over the runs, the ratio is transparent / SOCKS of the medians,
set against the issue's targets, with the per-run ratios of the paths measured back to
back beside it; a second table gives the CPU of every party per workload. ``render`` puts
the header (machine, version, sizes), the tables, the profile if any and the notes (errors,
counters that disagree, an overloaded generator) together; ``write`` stores the Markdown
and the raw numbers beside it as ``.json``; ``describe_version`` names what was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from relaybench.targets import REPO_DIR

from .config import (
    NAME,
    PATH_LABEL,
    PATHS,
    PROXY,
    SERVER,
    TARGETS,
    VENV,
    WORKLOADS,
    Result,
    Runs,
    Sizes,
)
from .profile import PY_SPY_RATE, profile_tables

CPUS = os.cpu_count() or 1


def rate(result: Result) -> float | None:
    if "error" in result:
        return None
    if result["mode"] == "sessions":
        return float(result["rate"]) if result["completed"] else None
    return float(result["mb_per_s"]) if result.get("connected") else None


def value(key: str) -> Callable[[Result], float | None]:
    def read(result: Result) -> float | None:
        found = result.get(key)
        return float(found) if found is not None and "error" not in result else None

    return read


def median_of(results: list[Result], read: Callable[[Result], float | None]) -> float | None:
    values = [v for r in results if (v := read(r)) is not None]
    return statistics.median(values) if values else None


def paired_ratios(runs: Runs, workload: str, read: Callable[[Result], float | None]) -> list[float]:
    """transparent / SOCKS of each run (the two measured back to back)."""
    ratios = []
    pairs = zip(runs["transparent"][workload], runs["socks"][workload], strict=False)
    for t, s in pairs:
        a, b = read(t), read(s)
        if a is not None and b:
            ratios.append(a / b)
    return ratios


@dataclass(frozen=True)
class Row:
    label: str
    workload: str
    read: Callable[[Result], float | None]
    digits: int
    target: float | None = None  # lowest acceptable ratio; None = no target


ROWS = (
    Row("bulk, 1 stream, MB/s", "bulk1", rate, 0, TARGETS["bulk1"]),
    Row("bulk, 8 streams, MB/s", "bulk8", rate, 0, TARGETS["bulk8"]),
    Row("new flows/s (sessions, c=64)", "sessions", rate, 0, TARGETS["sessions"]),
    Row("session p50, ms", "sessions", value("p50_ms"), 2),
    Row("session p99, ms", "sessions", value("p99_ms"), 2),
    Row("gateway CPU per flow, us", "sessions", value("gateway_us_per_flow"), 0),
    Row("... of which user, us", "sessions", value("gateway_user_us_per_flow"), 0),
    Row("gateway CPU per GB, bulk 1 stream, s", "bulk1", value("gateway_s_per_gb"), 3),
    Row("gateway CPU per GB, bulk 8 streams, s", "bulk8", value("gateway_s_per_gb"), 3),
)


def _fmt(number: float | None, digits: int) -> str:
    return "—" if number is None else f"{number:,.{digits}f}"


def main_table(runs: Runs, sizes: Sizes) -> tuple[list[str], dict[str, Any]]:
    """The Markdown table (ratio first) and the same numbers for the JSON."""
    lines = [
        "| measure | transparent / SOCKS | per-run ratios | target | verdict "
        "| transparent | SOCKS |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    figures: dict[str, Any] = {}
    for row in ROWS:
        if row.workload == "sessions" and row.target is not None:
            row = replace(row, label=f"new flows/s (sessions, c={sizes.concurrency})")
        t = median_of(runs["transparent"][row.workload], row.read)
        s = median_of(runs["socks"][row.workload], row.read)
        ratio = t / s if t is not None and s else None
        each = paired_ratios(runs, row.workload, row.read)
        spread = f"{min(each):.2f}-{max(each):.2f}" if len(each) > 1 else "—"
        if row.target is None:
            target, verdict = "—", ""
        else:
            target = f">= {row.target:.2f}x"
            verdict = "—" if ratio is None else ("met" if ratio >= row.target else "**missed**")
        shown = "—" if ratio is None else f"**{ratio:.2f}x**" if row.target else f"{ratio:.2f}x"
        lines.append(
            f"| {row.label} | {shown} | {spread} | {target} | {verdict} "
            f"| {_fmt(t, row.digits)} | {_fmt(s, row.digits)} |"
        )
        figures[row.label] = {
            "transparent": t,
            "socks": s,
            "ratio": ratio,
            "per_run_ratios": each,
            "target": row.target,
            "met": None if ratio is None or row.target is None else ratio >= row.target,
        }
    return lines, figures


def cpu_table(runs: Runs) -> list[str]:
    lines = [
        "| path | " + " | ".join(WORKLOADS) + " |",
        "|---|" + "---:|" * len(WORKLOADS),
    ]
    parts = ("gen", "gateway", "server", "softirq", "machine")
    for path in PATHS:
        cells = []
        for workload in WORKLOADS:
            results = [r for r in runs[path][workload] if "cpu" in r]
            if not results:
                cells.append("—")
                continue
            medians = [statistics.median(r["cpu"][p] for r in results) for p in parts]
            cells.append(" / ".join(f"{m:.0f}" for m in medians))
        lines.append(f"| {PATH_LABEL[path]} | " + " | ".join(cells) + " |")
    return lines


def notes(runs: Runs, sizes: Sizes) -> list[str]:
    found: list[str] = []
    for path in PATHS:
        for workload in WORKLOADS:
            for index, result in enumerate(runs[path][workload], 1):
                where = f"{PATH_LABEL[path]} {workload} run {index}"
                if "error" in result:
                    found.append(f"{where}: {result['error']}")
                    continue
                if result.get("check"):
                    found.append(f"{where}: counters disagree: {result['check']}")
                if result["counters"]["refused"]:
                    found.append(f"{where}: {result['counters']['refused']:.0f} flows refused")
                if result["mode"] == "sessions" and result["errors"]:
                    found.append(f"{where}: {result['errors']} failed sessions")
                if result["mode"] == "bulk" and not result.get("complete"):
                    found.append(f"{where}: hit the {sizes.bulk_seconds:g} s limit")
                if result["cpu"]["gen"] > 90:
                    found.append(f"{where}: generator at {result['cpu']['gen']:.0f} % of a core")
    queries = sum(
        r["counters"]["dns_queries"]
        for path in PATHS
        for r in runs[path]["sessions"]
        if "counters" in r
    )
    flows = sum(r.get("flows", 0) for path in PATHS for r in runs[path]["sessions"])
    if flows and queries > 0.01 * flows:
        found.append(
            f"the gateway's resolver asked DNS {queries:.0f} times for {flows} flows: "
            "its cache did not hold the name"
        )
    return found


def render(
    args: argparse.Namespace,
    runs: Runs,
    sizes: Sizes,
    meta: dict[str, Any],
    profiles: list[Result],
) -> tuple[str, dict[str, Any]]:
    table, figures = main_table(runs, sizes)
    s = sizes
    lines = [
        f"Transparent front vs the SOCKS path, {meta['started']} UTC: `{meta['command']}`",
        "",
        f"Machine: {os.cpu_count()} CPUs, Linux {platform.release()}; a netnslab lab (veth "
        f"pairs between namespaces); load average at start {meta['load_start']}, at end "
        f"{meta['load_end']}. socks64 {meta['version']} ({meta['commit']}), Python "
        f"{platform.python_version()}. Median of {args.runs} run(s), the two paths "
        "alternating (ABBA) workload by workload.",
        f"c4 (IPv4-only) resolves `{NAME}` through DNS46 to {meta['pool_address']}; "
        f"transparent = loadgen straight to it (TPROXY), SOCKS = loadgen CONNECT to it via "
        f"{PROXY}; both reach [{SERVER}] in s6 (IPv6-only) through the same splice relay.",
        f"Sessions: c={s.concurrency}, {s.payload}-byte echo, server closes, "
        f"{s.session_seconds:g} s (at most {s.session_max:,}). Bulk: "
        f"{s.bulk_bytes / 2**20:,.0f} MiB to a sink over 1 or 8 streams "
        f"({s.bulk_seconds:g} s limit).",
        "",
        *table,
        "",
        "Ratios are transparent / SOCKS of the medians (above 1: the transparent path is "
        "faster for rates, costlier for latency and CPU); per-run ratios pair the two paths "
        "measured back to back. Gateway CPU is utime+stime of the socks64 process "
        "(/proc/PID/stat) over the workload, per completed session or per 10^9 bytes.",
        "",
        "CPU during each workload, % of one core: generator (c4) / gateway / loadgen server "
        f"(s6) / kernel softirq (veth networking) / the whole machine (of {100 * CPUS}). "
        "Softirq that runs in a process's context is also in that process's system time.",
        "",
        *cpu_table(runs),
    ]
    if profiles:
        lines += [
            "",
            f"Profile (`--profile`): py-spy at {PY_SPY_RATE} samples/s on the gateway during "
            "one more, unmeasured sessions workload per path. Each stage or function gets its "
            "share of the event loop's samples times the gateway's CPU per flow (/proc) in "
            "that workload; a sample goes to the stage of its frame nearest the leaf.",
            *profile_tables(profiles),
        ]
    found = notes(runs, sizes) + meta.get("notes", [])
    if found:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in found]
    return "\n".join(lines) + "\n", figures


def describe_version() -> tuple[str, str]:
    python = VENV / "bin" / "python"
    version = "?"
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('socks64'))"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode == 0:
        version = done.stdout.strip()
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        commit = f"{head}{' + uncommitted changes' if dirty else ''}" if head else "?"
    return version, commit


def write(output: Path, text: str, raw: dict[str, Any]) -> Path:
    """The Markdown at ``output``, the raw numbers beside it as .json (returned)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    path = output.with_suffix(".json")
    path.write_text(json.dumps(raw, indent=1) + "\n")
    return path
