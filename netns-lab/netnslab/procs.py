"""Processes started inside lab namespaces, tracked so that every one of them is stopped.

A pid alone is not an identity (pids are reused), so each tracked process also records its
start time from ``/proc/PID/stat``; a process is only signalled while both still match.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from netnslab.timing import Clock, poll_until

# Popen objects of the children this process started, so they can be reaped (no zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class TrackedProcess:
    """A process the lab started: enough to find it again from another process."""

    pid: int
    starttime: int
    node: str
    name: str
    argv: tuple[str, ...]
    log: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["argv"] = list(self.argv)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrackedProcess:
        return cls(
            pid=int(data["pid"]),
            starttime=int(data["starttime"]),
            node=str(data["node"]),
            name=str(data["name"]),
            argv=tuple(str(a) for a in data["argv"]),
            log=str(data["log"]),
        )


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def process_starttime(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if there is no such process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_running(proc: TrackedProcess) -> bool:
    """Whether the tracked process still exists (zombies count as gone)."""
    _reap(proc.pid)
    fields = _stat_fields(proc.pid)
    if fields is None or int(fields[19]) != proc.starttime:
        return False
    return fields[0] not in ("Z", "X")


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]


def netns_command(namespace: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside ``namespace`` (``ip netns exec`` execs in place)."""
    return ["ip", "netns", "exec", namespace, *argv]


def spawn(
    namespace: str,
    node: str,
    name: str,
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> tuple[TrackedProcess, subprocess.Popen[bytes]]:
    """Start a long-running process in a namespace, output to ``log_path``.

    The process gets its own session so a Ctrl-C on the terminal reaches the lab (which
    then stops it in order) rather than killing services behind the lab's back.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        child = subprocess.Popen(
            netns_command(namespace, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            close_fds=True,
        )
    _CHILDREN[child.pid] = child
    starttime = process_starttime(child.pid)
    tracked = TrackedProcess(
        pid=child.pid,
        starttime=starttime if starttime is not None else -1,
        node=node,
        name=name,
        argv=tuple(argv),
        log=str(log_path),
    )
    return tracked, child


def send_signal(proc: TrackedProcess, signum: int) -> bool:
    """Signal a tracked process if it is still the same process. Returns whether it was sent."""
    if not is_running(proc):
        return False
    try:
        os.kill(proc.pid, signum)
    except ProcessLookupError:
        return False
    return True


def stop_processes(
    procs: Iterable[TrackedProcess],
    *,
    grace: float = 3.0,
    clock: Clock | None = None,
    sleep: Callable[[float], None] | None = None,
) -> list[TrackedProcess]:
    """SIGTERM (and SIGCONT, in case one was stopped), wait ``grace`` s, then SIGKILL.

    Returns the processes that were still running after SIGKILL (should be none).
    """
    targets = [p for p in procs if is_running(p)]
    for proc in targets:
        send_signal(proc, signal.SIGTERM)
        send_signal(proc, signal.SIGCONT)
    poll_until(
        lambda: not any(is_running(p) for p in targets), timeout=grace, clock=clock, sleep=sleep
    )
    for proc in targets:
        send_signal(proc, signal.SIGKILL)
    poll_until(
        lambda: not any(is_running(p) for p in targets), timeout=grace, clock=clock, sleep=sleep
    )
    return [p for p in targets if is_running(p)]


def kill_pids(
    pids: Iterable[int],
    *,
    timeout: float = 3.0,
    clock: Clock | None = None,
    sleep: Callable[[float], None] | None = None,
) -> list[int]:
    """SIGKILL raw pids (stragglers found inside a namespace). Returns those still alive."""
    pid_list = [p for p in pids if p != os.getpid()]
    for pid in pid_list:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def alive(pid: int) -> bool:
        _reap(pid)
        fields = _stat_fields(pid)
        return fields is not None and fields[0] not in ("Z", "X")

    poll_until(
        lambda: not any(alive(p) for p in pid_list), timeout=timeout, clock=clock, sleep=sleep
    )
    return [p for p in pid_list if alive(p)]
