"""The workloads: loadgen in c4 over either path, the gateway's CPU around it, ABBA order.

``Bench`` adds measuring to the lab: the loadgen command line of a workload over the
transparent path (straight to the pool address) or the SOCKS path (CONNECT through gw), a
warm-up per path that also checks the path works, and one measurement with the gateway's
CPU (utime+stime from /proc/PID/stat), the server's and the machine's around it, per flow
or per GB, and the gateway's counters checked against the path. ``measure_all`` runs every
workload over both paths, the paths alternating run by run (ABBA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from relaybench.procs import system_cpu_seconds, tree_cpu_seconds

from .config import PATH_LABEL, PATHS, PROXY, SESSION_PORT, SINK_PORT, WORKLOADS, Result, Runs, say
from .lab import GatewayLab

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Bench(GatewayLab):
    """The running lab, the loadgen server in s6, and one measurement at a time."""

    def loadgen_argv(self, path: str, workload: str) -> tuple[list[str], float]:
        """The c4 side of one workload over ``path``, and its time limit."""
        s = self.sizes
        via = ["--proxy", PROXY] if path == "socks" else []
        if workload in ("sessions", "warmup"):
            count = s.warmup_sessions if workload == "warmup" else s.session_max
            seconds = 10.0 if workload == "warmup" else s.session_seconds
            concurrency = 8 if workload == "warmup" else s.concurrency
            args = ["sessions", *via, "--target", f"{self.pool_address}:{SESSION_PORT}"]
            args += ["-c", str(concurrency), "-n", str(count), "-t", str(seconds)]
            args += ["-s", str(s.payload)]
            return args, seconds + 20
        streams = {"bulk1": 1, "bulk8": 8}[workload]
        args = ["bulk", *via, "--target", f"{self.pool_address}:{SINK_PORT}"]
        args += ["--streams", str(streams), "--bytes", str(s.bulk_bytes)]
        return [*args, "-t", str(s.bulk_seconds)], s.bulk_seconds + 20

    def run_loadgen(self, args: list[str], timeout: float) -> Result:
        done = subprocess.run(
            self.lab.command("c4", [str(self.loadgen), *args]),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"loadgen {args[0]} failed: {done.stderr.strip()[-500:]}")
        result: Result = json.loads(lines[-1])
        return result

    def warm_up(self, path: str) -> None:
        """A few sessions over ``path``: start-up work is not charged to a measurement,
        and a path that does not work stops the run before anything is measured."""
        args, timeout = self.loadgen_argv(path, "warmup")
        before = self.metrics()
        result = self.run_loadgen(args, timeout)
        after = self.metrics()
        counts = {k: after[k] - before[k] for k in after}
        wrong = check_path(path, counts, result["completed"])
        if result["errors"] or result["completed"] != self.sizes.warmup_sessions or wrong:
            raise RuntimeError(
                f"{path} warm-up: {result['completed']} sessions, {result['errors']} errors"
                f"{'; ' + wrong if wrong else ''}; gateway log:\n{self.gateway_log()}"
            )
        say(
            f"  warm-up {PATH_LABEL[path]:11} {result['completed']} sessions, "
            f"{result['rate']:,.0f}/s, counters {counts}"
        )

    def measure(self, path: str, workload: str) -> Result:
        """One workload over one path, with the gateway's CPU and counters around it."""
        args, timeout = self.loadgen_argv(path, workload)
        pid = self.gateway_pid
        assert self.server is not None
        counters_before = self.metrics()
        gw_before, server_before = process_cpu(pid), tree_cpu_seconds(self.server.pid)
        busy_before, softirq_before = system_cpu_seconds()
        started = time.monotonic()
        result = self.run_loadgen(args, timeout)
        wall = max(time.monotonic() - started, 1e-6)
        gw_after, server_after = process_cpu(pid), tree_cpu_seconds(self.server.pid)
        busy_after, softirq_after = system_cpu_seconds()
        counters_after = self.metrics()
        user = gw_after[0] - gw_before[0]
        system = gw_after[1] - gw_before[1]
        gateway = user + system
        server = server_after - server_before
        gen = float(result.get("cpu_seconds", 0.0))
        busy, softirq = busy_after - busy_before, softirq_after - softirq_before
        result.update(
            path=path,
            workload=workload,
            pool_address=self.pool_address,
            wall=wall,
            gateway_cpu={"user": user, "system": system},
            counters={k: counters_after[k] - counters_before[k] for k in counters_after},
            cpu={  # % of one core over the loadgen's wall time
                "gen": 100 * gen / wall,
                "gateway": 100 * gateway / wall,
                "server": 100 * server / wall,
                "softirq": 100 * softirq / wall,
                "machine": 100 * busy / wall,  # every core, every process and the kernel
            },
        )
        if workload == "sessions":
            flows = result["completed"] + result["errors"]
            result["flows"] = flows
            if result["completed"]:
                result["gateway_us_per_flow"] = 1e6 * gateway / result["completed"]
                result["gateway_user_us_per_flow"] = 1e6 * user / result["completed"]
        else:
            flows = result["streams"]
            result["flows"] = flows
            moved = result["bytes"] if result.get("complete") else result["sent"]
            if moved:
                result["gateway_s_per_gb"] = gateway / (moved / 1e9)
        result["check"] = check_path(path, result["counters"], flows)
        return result


def check_path(path: str, counts: dict[str, float], flows: int) -> str:
    """'' if the counters show the flows took ``path`` (and only it), else what is wrong."""
    intercepted, connects = counts["intercepted"], counts["socks_connects"]
    if path == "transparent" and (intercepted < flows or connects):
        return f"expected {flows} intercepted flows: {intercepted:.0f}, SOCKS {connects:.0f}"
    if path == "socks" and (connects < flows or intercepted):
        return f"expected {flows} SOCKS CONNECTs: {connects:.0f}, intercepted {intercepted:.0f}"
    return ""


def summary(result: Result) -> str:
    if "error" in result:
        return "ERROR " + str(result["error"])[:200]
    cpu = result["cpu"]
    shares = f"gw {cpu['gateway']:.0f}% gen {cpu['gen']:.0f}%"
    if result["mode"] == "sessions":
        per = result.get("gateway_us_per_flow", 0.0)
        return (
            f"{result['rate']:,.0f}/s p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms"
            f" errors {result['errors']}; gateway {per:.0f} us/flow; {shares}"
        )
    per_gb = result.get("gateway_s_per_gb", 0.0)
    return f"{result['mb_per_s']:,.0f} MB/s; gateway {per_gb:.3f} s/GB; {shares}"


def measure_all(bench: Bench, args: argparse.Namespace, deadline: float, runs: Runs) -> list[str]:
    """Every workload over both paths, ``args.runs`` times, paths alternating."""
    skipped: list[str] = []
    for run in range(args.runs):
        order = PATHS if run % 2 == 0 else PATHS[::-1]
        say(f"run {run + 1}/{args.runs}")
        bench.resolve()
        for workload in WORKLOADS:
            for path in order:
                if time.monotonic() > deadline:
                    skipped.append(f"stopped after {args.max_minutes:g} minutes (--max-minutes)")
                    return skipped
                try:
                    result = bench.measure(path, workload)
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                    result = {"mode": workload, "path": path, "error": str(exc)}
                runs[path][workload].append(result)
                say(f"  {PATH_LABEL[path]:11} {workload:8} {summary(result)}")
    return skipped
