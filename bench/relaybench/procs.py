"""Processes the benchmark starts, and what /proc says about them (memory, CPU)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

NOFILE_LIMIT = 65536
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """Runs in each child before exec: enough descriptors, and die with the driver."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_LIMIT, NOFILE_LIMIT))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Supervisor:
    """Starts processes in their own process groups and guarantees they are all stopped."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv``; stderr (and stdout unless piped) goes to ``log_dir/name.log``."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - child keeps it
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=log if stdout is None else stdout,
                stderr=log,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        finally:
            log.close()
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        """SIGTERM the leader (Dante's reaps its children), SIGKILL the group after ``grace``."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        # Forked children (Dante's) may outlive their leader: the group goes regardless.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc, grace=1.0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], timeout: float, clock: Callable[[], float]
) -> None:
    """Wait until something accepts on 127.0.0.1:``port``; fail if ``proc`` exits first."""
    deadline = clock() + timeout
    while clock() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} after {timeout:.0f} s")


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass(frozen=True)
class Memory:
    """Memory of a process tree in KiB: PSS shares pages among forked children fairly."""

    pss_kib: int
    rss_kib: int
    processes: int


def tree_memory(root: int) -> Memory:
    pss = rss = count = 0
    for pid in process_tree(root):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        count += 1
        for line in rollup.splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                pss += int(value.split()[0])
            elif key == "Rss":
                rss += int(value.split()[0])
    return Memory(pss, rss, count)


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU of a tree, including children it has reaped."""
    ticks = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def system_cpu_seconds() -> tuple[float, float]:
    """(busy, softirq) CPU-seconds of all cores since boot, from /proc/stat.

    Busy is user+nice+system+irq+softirq.  Softirq is mostly the loopback network stack, which
    the kernel charges to no process; steal (the hypervisor's) is not busy time of ours.
    """
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, softirq / CLOCK_TICKS
