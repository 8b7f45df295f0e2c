"""The py-spy profile (``--profile``): where the gateway's CPU per flow goes, by path.

During one more, unmeasured sessions workload per path, py-spy records the gateway's raw
stacks; each sample of the event loop's thread is charged to the stage of its frame nearest
the leaf (outbound connect, pool lookup, resolver, SOCKS handshake, relay, ...), and the
shares are scaled to the gateway's CPU per flow from /proc. The stage table puts the two
paths side by side; the function tables give self and inclusive time per path.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PATH_LABEL, PATHS, VENV, Result
from .workloads import Bench, process_cpu

PY_SPY_RATE = 200  # samples/s


def frame_name(frame: str) -> str:
    """``'relay (translator/relay/tcp.py)'`` -> ``'relay/tcp.py:relay'``."""
    function, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    return f"{'/'.join(parts[-2:])}:{function}" if where else function


# What a flow's gateway time is spent on: a sample belongs to the stage of the frame nearest
# its leaf that matches one of these (function names as frame_name() writes them).
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("outbound connect (Happy Eyeballs, socket, connect(2))", ("happy_eyeballs.py:",)),
    ("pool address -> name (lookup, pin)", ("FakeIpPool.", "Interceptor._admit", "_pool_name")),
    (
        "name -> addresses (resolver cache), policy",
        ("RequestContext.destination", "Resolver.", "policy.py:", "RequestContext._decide"),
    ),
    ("original destination (getsockname)", ("original_destination",)),
    (
        "SOCKS greeting, request and replies (recv, parse, build, send)",
        (
            "Session._next_event",
            "Session._read",
            "Session._send",
            "Session._reply",
            "Session._negotiate",
            "wire/",
            "relay/channel.py:",
        ),
    ),
    ("relay: 64 B each way, EOF, shutdown, close", ("relay/tcp.py:",)),
    ("access log line, counters, traffic meter", ("accesslog.py:", "metrics.py:", "logging/")),
    (
        "accept, admission, session object",
        ("accepting.py:", "listening.py:", "Gateway._admit", "Session.__init__", "tcp_accepted"),
    ),
    ("transparent flow task (the rest of it)", ("transparent/flows.py:",)),
    ("SOCKS session task (the rest of it)", ("gateway/session.py:", "gateway/connect.py:")),
)
OTHER_STAGE = "event loop, tasks, other"


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for label, patterns in STAGES:
            if any(pattern in frame for pattern in patterns):
                return label
    return OTHER_STAGE


@dataclass
class Stacks:
    """py-spy samples of the main thread (the event loop) by function, and the rest."""

    main: int = 0
    other_threads: int = 0
    leaf: dict[str, int] = field(default_factory=dict)  # self samples
    inclusive: dict[str, int] = field(default_factory=dict)  # samples with it on the stack
    stages: dict[str, int] = field(default_factory=dict)


def summarize_stacks(raw: str) -> Stacks:
    """py-spy's raw (collapsed) stacks, one ``frame;frame;... COUNT`` a line."""
    found = Stacks()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if not stack.startswith("_run_module_as_main"):  # a helper thread (netlink, c-ares)
            found.other_threads += count
            continue
        frames = [frame_name(f) for f in stack.split(";") if f]
        found.main += count
        found.leaf[frames[-1]] = found.leaf.get(frames[-1], 0) + count
        stage = stage_of(frames)
        found.stages[stage] = found.stages.get(stage, 0) + count
        for name in set(frames):
            found.inclusive[name] = found.inclusive.get(name, 0) + count
    return found


def profile_path(bench: Bench, path: str, out: Path) -> Result:
    """py-spy (raw stacks, no line numbers) on the gateway during one sessions workload."""
    py_spy = VENV / "bin" / "py-spy"
    seconds = bench.sizes.session_seconds
    args, timeout = bench.loadgen_argv(path, "sessions")
    argv = [str(py_spy), "record", "--pid", str(bench.gateway_pid), "--format", "raw"]
    argv += ["--nolineno", "--rate", str(PY_SPY_RATE), "--duration", str(int(seconds) + 2)]
    pid = bench.gateway_pid
    spy = subprocess.Popen(
        [*argv, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        time.sleep(1.0)  # attached and sampling before the first session
        before = sum(process_cpu(pid))
        result = bench.run_loadgen(args, timeout)
        cpu = sum(process_cpu(pid)) - before
        _, err = spy.communicate(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait(5)
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
    stacks = summarize_stacks(out.read_text())
    total = max(stacks.main, 1)
    flows = max(int(result["completed"]), 1)
    cpu_us_per_flow = 1e6 * cpu / flows
    # a share of the event loop's samples, as gateway CPU (/proc) per flow
    per_flow = cpu_us_per_flow / total

    def top(counts: dict[str, int], count: int) -> list[dict[str, Any]]:
        # frames on (nearly) every stack (the interpreter's entry, the loop's run) say nothing
        kept = {name: n for name, n in counts.items() if n < 0.9 * total}
        ranked = sorted(kept.items(), key=lambda item: -item[1])[:count]
        return [
            {"function": name, "share": n / total, "us_per_flow": n * per_flow}
            for name, n in ranked
        ]

    return {
        "path": path,
        "rate": result["rate"],
        "flows": result["completed"],
        "samples": stacks.main,
        "other_thread_samples": stacks.other_threads,
        "cpu_us_per_flow": cpu_us_per_flow,
        "sampled_us_per_flow": 1e6 * stacks.main / PY_SPY_RATE / flows,
        "stages_us_per_flow": {k: n * per_flow for k, n in stacks.stages.items()},
        "self": top(stacks.leaf, 15),
        "inclusive": top(stacks.inclusive, 40),
        "raw": str(out),
    }


def stage_table(profiles: list[Result]) -> list[str]:
    """Sampled event-loop time per flow by stage, the two paths side by side."""
    by_path = {found["path"]: found["stages_us_per_flow"] for found in profiles}
    if set(by_path) != set(PATHS):
        return []
    labels = [label for label, _ in STAGES] + [OTHER_STAGE]
    lines = [
        "| stage: gateway CPU per flow, us | transparent | SOCKS | SOCKS - transparent |",
        "|---|---:|---:|---:|",
    ]
    for label in [*labels, "total"]:
        if label == "total":
            t, s = (sum(by_path[p].values()) for p in PATHS)
            label = "**total**"
        else:
            t, s = (by_path[p].get(label, 0.0) for p in PATHS)
        if t or s:
            lines.append(f"| {label} | {t:.0f} | {s:.0f} | {s - t:+.0f} |")
    return lines


def profile_tables(profiles: list[Result]) -> list[str]:
    lines: list[str] = []
    stages = stage_table(profiles)
    if stages:
        lines += ["", *stages]
    for found in profiles:
        label = PATH_LABEL[found["path"]]
        lines += [
            "",
            f"{label}: {found['flows']:,} sessions at {found['rate']:,.0f}/s while sampled, "
            f"gateway CPU {found['cpu_us_per_flow']:.0f} us per flow; {found['samples']:,} "
            f"samples of the event loop's thread ({found['sampled_us_per_flow']:.0f} us per "
            f"flow of wall time; {found['other_thread_samples']:,} more in helper threads, "
            "waiting). Self time, then inclusive, as shares of that CPU:",
            "",
            "| function (self) | share | us per flow |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| `{entry['function']}` | {100 * entry['share']:.1f} % | {entry['us_per_flow']:.0f} |"
            for entry in found["self"]
        ]
        lines += ["", "| function (inclusive) | share | us per flow |", "|---|---:|---:|"]
        lines += [
            f"| `{entry['function']}` | {100 * entry['share']:.1f} % | {entry['us_per_flow']:.0f} |"
            for entry in found["inclusive"][:20]
        ]
    return lines
