"""The workloads: each runs the compiled loadgen once against one target and returns its numbers.

Every result carries the CPU each party used during it, in percent of one core: the
generator (its own getrusage), the proxy's process tree and the echo/sink server (/proc),
the kernel's softirq time (loopback networking, charged to no process) and ``other`` (the
rest of the machine: whatever else was running).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import Supervisor, system_cpu_seconds, tree_cpu_seconds, tree_memory

Result = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """Workload parameters; FULL follows the issue, QUICK is the smoke run."""

    session_seconds: float
    session_max: int
    concurrency: int
    payload: int
    bulk_bytes: int
    bulk_seconds: float
    udp_count: int
    udp_size: int
    udp_window: int
    udp_seconds: float
    idle_conns: int
    idle_seconds: float


# The UDP window (datagrams in flight) stays under what a default 208 KiB socket buffer holds
# (about 130 datagrams of 512 bytes on loopback): loss then means the relay dropped datagrams,
# not that one burst overflowed its buffer.
FULL = Sizes(5.0, 1_000_000, 64, 64, 2 << 30, 60.0, 200_000, 512, 64, 30.0, 2000, 60.0)
QUICK = Sizes(1.0, 200_000, 64, 64, 64 << 20, 10.0, 20_000, 512, 64, 10.0, 200, 20.0)

WORKLOADS = ("idle", "sessions", "bulk1", "bulk8", "udp")


class Bench:
    """Runs loadgen workloads against the echo/sink server, directly or through a proxy."""

    def __init__(
        self,
        loadgen: Path,
        supervisor: Supervisor,
        sizes: Sizes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loadgen = loadgen
        self.supervisor = supervisor
        self.sizes = sizes
        self.clock = clock
        self.server: subprocess.Popen[bytes] | None = None
        self.echo = self.sink = self.session = ""

    def start_server(self) -> None:
        """Start the echo/sink/session server (one epoll thread, C) and learn its ports."""
        argv = [str(self.loadgen), "serve", "-s", str(self.sizes.payload), "--lifetime", "3600"]
        proc = self.supervisor.spawn("server", argv, stdout=subprocess.PIPE)
        ports = dict(
            line.split() for line in _read_lines(proc, "serve", 3, self.clock() + 10, self.clock)
        )
        self.server = proc
        self.echo, self.sink, self.session = (
            f"127.0.0.1:{ports[name]}" for name in ("echo", "sink", "session")
        )

    def run(self, workload: str, proxy: str | None, proxy_pid: int | None) -> Result:
        """Run one workload; ``proxy`` is "127.0.0.1:PORT" or None for direct."""
        s = self.sizes
        via = ["--proxy", proxy] if proxy else []
        if workload == "idle":
            assert proxy_pid is not None
            return self._idle(via, proxy_pid)
        if workload == "sessions":
            args = ["sessions", *via, "--target", self.session, "-c", str(s.concurrency)]
            args += ["-t", str(s.session_seconds), "-n", str(s.session_max), "-s", str(s.payload)]
            limit = s.session_seconds + 15
        elif workload in ("bulk1", "bulk8"):
            streams = 1 if workload == "bulk1" else 8
            args = ["bulk", *via, "--target", self.sink, "--streams", str(streams)]
            args += ["--bytes", str(s.bulk_bytes), "-t", str(s.bulk_seconds)]
            limit = s.bulk_seconds + 15
        elif workload == "udp":
            args = ["udp", *via, "--count", str(s.udp_count), "--size", str(s.udp_size)]
            args += ["--window", str(s.udp_window), "-t", str(s.udp_seconds)]
            limit = s.udp_seconds + 15
        else:
            raise ValueError(workload)
        return self._measured(args, limit, proxy_pid)

    def warm_up(self, proxy: str) -> None:
        """A few sessions so that lazy start-up work is not charged to the first workload."""
        args = ["sessions", "--proxy", proxy, "--target", self.session, "-c", "8", "-n", "200"]
        self._loadgen([*args, "-s", str(self.sizes.payload), "-t", "5"], timeout=20)

    def _loadgen(self, args: list[str], timeout: float) -> Result:
        done = subprocess.run(
            [str(self.loadgen), *args], capture_output=True, text=True, timeout=timeout
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"loadgen {args[0]} failed: {done.stderr.strip()[-500:]}")
        result: Result = json.loads(lines[-1])
        return result

    def _measured(self, args: list[str], timeout: float, proxy_pid: int | None) -> Result:
        assert self.server is not None
        before = self._cpu(proxy_pid)
        started = self.clock()
        result = self._loadgen(args, timeout)
        wall = max(self.clock() - started, 1e-6)
        after = self._cpu(proxy_pid)
        if wall < 0.2:  # nothing ran (e.g. UDP refused): 10 ms ticks would only add noise
            return result
        gen = result.get("cpu_seconds", 0.0)
        proxy_cpu, server_cpu, busy, softirq = (b - a for a, b in zip(before, after, strict=True))
        result["cpu"] = {
            "gen": 100 * gen / max(result.get("elapsed", wall), 1e-6),
            "proxy": 100 * proxy_cpu / wall,
            "server": 100 * server_cpu / wall,
            "softirq": 100 * softirq / wall,
            "other": max(0.0, 100 * (busy - softirq - gen - proxy_cpu - server_cpu) / wall),
        }
        return result

    def _cpu(self, proxy_pid: int | None) -> tuple[float, float, float, float]:
        assert self.server is not None
        proxy = tree_cpu_seconds(proxy_pid) if proxy_pid else 0.0
        return proxy, tree_cpu_seconds(self.server.pid), *system_cpu_seconds()

    def _idle(self, via: list[str], proxy_pid: int) -> Result:
        """Proxy memory (PSS of its process tree) with ``idle_conns`` relayed connections."""
        s = self.sizes
        time.sleep(0.5)
        baseline = tree_memory(proxy_pid)
        args = ["idle", *via, "--target", self.echo, "--conns", str(s.idle_conns)]
        proc = self.supervisor.spawn(
            "idle",
            [str(self.loadgen), *args, "-t", str(s.idle_seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            deadline = self.clock() + s.idle_seconds + 10
            ready = _read_lines(proc, "idle", 1, deadline, self.clock)[0].split()
            opened = int(ready[1])
            time.sleep(1.0)  # let the proxy finish whatever the last connections started
            held = tree_memory(proxy_pid)
            assert proc.stdin is not None
            proc.stdin.write(b"done\n")
            proc.stdin.flush()
            final = json.loads(_read_lines(proc, "idle", 1, self.clock() + 30, self.clock)[0])
        finally:
            self.supervisor.stop(proc)
        grown = held.pss_kib - baseline.pss_kib
        return {
            "mode": "idle",
            "opened": opened,
            "errors": final["errors"],
            "open_elapsed": final["open_elapsed"],
            "baseline_pss_kib": baseline.pss_kib,
            "held_pss_kib": held.pss_kib,
            "held_rss_kib": held.rss_kib,
            "processes": held.processes,
            "kib_per_conn": grown / opened if opened else None,
        }


def _read_lines(
    proc: subprocess.Popen[bytes],
    what: str,
    count: int,
    deadline: float,
    clock: Callable[[], float],
) -> list[str]:
    """``count`` non-empty lines from the child's stdout, or an error at ``deadline``.

    Reads the raw descriptor: a buffered readline could swallow the next line unseen by select.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pending = b""
    lines: list[str] = []
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while len(lines) < count:
            left = deadline - clock()
            if left <= 0 or not selector.select(left):
                raise RuntimeError(f"no output from loadgen {what} in time")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"loadgen {what} exited (status {proc.poll()})")
            pending += chunk
            *complete, pending = pending.split(b"\n")
            lines.extend(line.decode().strip() for line in complete if line.strip())
    return lines[:count]
