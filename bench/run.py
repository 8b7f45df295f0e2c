#!/usr/bin/env python3
"""Relay benchmark: socks64 against Dante and microsocks, and a direct (no proxy) ceiling.

    python bench/run.py                  # full run (about 5-10 minutes), median of 3 runs
    python bench/run.py --quick          # smoke run, under a minute
    python bench/run.py --only socks64,dante --runs 1

Installs dante-server and microsocks from Debian when absent (root), compiles
bench/loadgen.c into a cache directory, runs every workload against every target on
127.0.0.1, prints a Markdown table with ratios to the best peer and writes it to
bench/results/latest.md (raw numbers in latest.json).  See docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relaybench import report
from relaybench.procs import Supervisor, free_port, wait_for_port
from relaybench.targets import (
    BENCH_DIR,
    TARGETS,
    Target,
    build_loadgen,
    find_binary,
    install_packages,
    version_of,
)
from relaybench.workloads import FULL, QUICK, WORKLOADS, Bench, Result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (< 60 s)")
    parser.add_argument(
        "--only",
        default=",".join(TARGETS),
        help="comma-separated targets among: " + ", ".join(TARGETS) + " (default: all)",
    )
    parser.add_argument("--runs", type=int, help="runs per workload (default 3, --quick 1)")
    parser.add_argument(
        "--udp-window",
        type=int,
        help="UDP datagrams in flight (default 64; 0 = unpaced blast, loss then measures overload)",
    )
    parser.add_argument("--socks64", help="socks64 executable (default: .venv/bin/socks64)")
    parser.add_argument("--no-install", action="store_true", help="never call apt-get")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "socks64-bench",
        help="where the compiled loadgen is kept",
    )
    parser.add_argument(
        "--output", type=Path, default=BENCH_DIR / "results" / "latest.md", help="Markdown output"
    )
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    args.targets = [t for t in TARGETS if t in args.targets]  # table order is fixed
    args.runs = args.runs or (1 if args.quick else 3)
    return args


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def resolve_binaries(args: argparse.Namespace, log: Path) -> tuple[dict[str, str], list[str]]:
    """Binary per proxy target, installing missing Debian packages; plus skip notes."""
    proxies = [TARGETS[t] for t in args.targets if TARGETS[t].is_proxy]
    found = {t.name: find_binary(t, args.socks64) for t in proxies}
    missing = sorted({t.package for t in proxies if not found[t.name] and t.package})
    skipped: list[str] = []
    if missing and not args.no_install:
        say(f"installing {', '.join(missing)} (apt-get; services kept from starting)")
        error = install_packages(missing, log)
        if error:
            skipped.append(error)
        found = {t.name: find_binary(t, args.socks64) for t in proxies}
    for name, binary in found.items():
        if not binary:
            skipped.append(f"{name}: not installed, skipped")
    return {name: binary for name, binary in found.items() if binary}, skipped


def summary(result: Result) -> str:
    if "error" in result:
        return "ERROR " + str(result["error"])[:120]
    mode = result.get("mode")
    if mode == "sessions":
        latency = f"p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms"
        return f"{result['rate']:,.0f}/s {latency}"
    if mode == "bulk":
        return f"{result['mb_per_s']:,.0f} MB/s"
    if mode == "udp":
        if not result.get("supported"):
            return f"no UDP (REP {result.get('rep')})"
        return f"{result['rate']:,.0f}/s loss {100 * result['loss']:.2f}%"
    if mode == "idle":
        per = result.get("kib_per_conn")
        return f"{result['opened']} conns, {per:.1f} KiB/conn" if per is not None else "n/a"
    return json.dumps(result)


def run_target(
    bench: Bench,
    supervisor: Supervisor,
    target: Target,
    binary: str | None,
    workdir: Path,
    runs: report.Runs,
) -> None:
    """All workloads against one target: a fresh proxy, warmed up, memory measured first."""
    results = runs.setdefault(target.name, {})
    proc = None
    proxy = None
    try:
        if binary is not None:
            port = free_port()
            proc = supervisor.spawn(target.name, target.argv(binary, port, workdir))
            wait_for_port(port, proc, 15.0, time.monotonic)
            proxy = f"127.0.0.1:{port}"
            bench.warm_up(proxy)
        for workload in WORKLOADS:
            if workload == "idle" and proc is None:
                continue
            try:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{target.name} exited with status {proc.returncode}")
                result = bench.run(workload, proxy, proc.pid if proc else None)
                if workload == "idle":
                    result["wanted"] = bench.sizes.idle_conns
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                result = {"mode": workload, "error": str(exc)}
            results.setdefault(workload, []).append(result)
            say(f"  {target.name:10} {workload:8} {summary(result)}")
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        say(f"  {target.name}: {exc}")
        for workload in WORKLOADS:
            results.setdefault(workload, []).append({"mode": workload, "error": str(exc)})
    finally:
        if proc is not None:
            supervisor.stop(proc)


def render(
    args: argparse.Namespace,
    runs: report.Runs,
    versions: dict[str, str],
    skipped: list[str],
    started: datetime,
    loads: tuple[str, str],
    sizes_text: str,
) -> str:
    command = "python bench/run.py " + " ".join(sys.argv[1:])
    shown = [t for t in args.targets if t in runs]
    lines = [
        f"Relay benchmark, {started:%Y-%m-%d %H:%M} UTC: `{command.strip()}`",
        "",
        f"Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, loopback; "
        f"load average at start {loads[0]}, at end {loads[1]}. "
        f"Median of {args.runs} run(s). {sizes_text}",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        *report.main_table(runs, shown),
        "",
        "Ratios are value / best peer in the column (direct excluded; 1.00x is the best): below",
        "1 is slower for rates, above 1 is slower or bigger for latency and memory. `gN%` is the",
        "load generator's CPU in percent of one core during that workload (shown when the",
        "workload ran long enough to measure). `*` = hit its time limit.",
        "",
        "CPU during each workload, % of one core: generator / proxy process tree / echo-sink",
        "server / kernel softirq (loopback networking) / everything else on the machine:",
        "",
        *report.cpu_table(runs, shown, WORKLOADS),
    ]
    found = report.notes(runs) + skipped
    if found:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in found]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.udp_window is not None:
        sizes = dataclasses.replace(sizes, udp_window=args.udp_window)

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through the finally blocks that stop everything

    signal.signal(signal.SIGTERM, terminate)
    started = datetime.now(UTC)
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    workdir = Path(tempfile.mkdtemp(prefix="socks64-bench-"))
    supervisor = Supervisor(workdir)
    runs: report.Runs = {}
    ok = False
    try:
        binaries, skipped = resolve_binaries(args, workdir / "apt.log")
        targets = [t for t in args.targets if not TARGETS[t].is_proxy or t in binaries]
        loadgen = build_loadgen(args.cache_dir)
        versions = {t: version_of(TARGETS[t], binaries[t]) for t in targets if t in binaries}
        bench = Bench(loadgen, supervisor, sizes)
        bench.start_server()
        say(f"loadgen {loadgen}; echo {bench.echo}, sink {bench.sink}; logs in {workdir}")
        for run in range(args.runs):
            say(f"run {run + 1}/{args.runs}")
            for name in targets:
                run_target(bench, supervisor, TARGETS[name], binaries.get(name), workdir, runs)
        load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        s = sizes
        sizes_text = (
            f"Sessions: c={s.concurrency}, {s.payload}-byte echo, {s.session_seconds:g} s. "
            f"Bulk: {s.bulk_bytes / 2**20:,.0f} MiB. UDP: {s.udp_count:,} x {s.udp_size} B, "
            f"window {s.udp_window}. Idle: {s.idle_conns:,} connections."
        )
        text = render(args, runs, versions, skipped, started, (load_start, load_end), sizes_text)
        print(text)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
        say(f"wrote {args.output}")
        ok = True
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
    finally:
        supervisor.stop_all()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"logs kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
