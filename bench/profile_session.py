#!/usr/bin/env python3
"""Gateway CPU per CONNECT session: a fixed number of benchmark sessions, on loopback.

    .venv/bin/python bench/profile_session.py                      # 20,000 sessions, 3 rounds
    .venv/bin/python bench/profile_session.py -n 50000 --rounds 5
    .venv/bin/python bench/profile_session.py --profile /tmp/gw.prof   # plus a cProfile dump
    .venv/bin/python -m pstats /tmp/gw.prof      # then: sort tottime / stats 30

Each session is what bench/run.py's ``sessions`` workload does (the compiled loadgen,
64 concurrent clients): greeting (NO AUTH), CONNECT to 127.0.0.1 (an IP literal), the
loadgen's session server echoes 64 bytes and closes, the client closes. The gateway is
``socks64 serve --config bench/configs/socks64.yaml`` (its policy allows 127.0.0.0/8
only), run by this script as ``python -m translator.cli``, its log going to a file as in
the benchmark (the access log line per session is part of the cost).

Per round the gateway's CPU (utime+stime of its process, all threads, from
/proc/PID/stat) is read before and after the loadgen run, and divided by the sessions
the loadgen completed: ``µs/session`` is the gateway's own CPU per session, much less
sensitive to other load on the machine than sessions/s. The median round is the result.

``--profile FILE``: the gateway runs under cProfile, switched on (SIGUSR1) only for the
measured rounds and dumped (SIGUSR2) after them, so start-up and warm-up are not in it.
Profiling slows the gateway severalfold: its µs/session are then not comparable.

Bounded: at most ``-n`` sessions per round and ``--time-limit`` seconds per loadgen run;
every process it starts is stopped when it exits.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from relaybench.procs import CLOCK_TICKS, Supervisor, free_port, wait_for_port  # noqa: E402
from relaybench.targets import CONFIG_DIR, REPO_DIR, build_loadgen  # noqa: E402
from relaybench.workloads import Bench, Sizes  # noqa: E402

PYTHON = REPO_DIR / ".venv" / "bin" / "python"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--sessions", type=int, default=20_000, help="sessions per round")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (median shown)")
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("-s", "--payload", type=int, default=64, help="echoed bytes")
    parser.add_argument(
        "--time-limit", type=float, default=60.0, help="cap on one loadgen run, seconds"
    )
    parser.add_argument("--profile", type=Path, help="write a cProfile dump of the rounds here")
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "socks64.yaml")
    parser.add_argument("--python", default=str(PYTHON), help="interpreter running the gateway")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "socks64-bench",
        help="where the compiled loadgen is kept",
    )
    parser.add_argument("--keep-log", action="store_true", help="print the gateway log's path")
    parser.add_argument("--serve-child", type=Path, help=argparse.SUPPRESS)  # internal
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def serve_child(profile: Path, cli_args: list[str]) -> int:
    """The gateway in this process, with a profiler the parent switches by signal."""
    sys.path.insert(0, str(REPO_DIR))
    from translator.cli import main

    profiler = cProfile.Profile()

    def start(signum: int, frame: object) -> None:
        profiler.enable()

    def dump(signum: int, frame: object) -> None:
        profiler.disable()
        profiler.dump_stats(str(profile))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, dump)
    return main(cli_args)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_child is not None:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return serve_child(args.serve_child, rest)
    loadgen = build_loadgen(args.cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix="socks64-profile-"))
    supervisor = Supervisor(workdir)
    sizes = Sizes(args.time_limit, args.sessions, args.concurrency, args.payload,
                  0, 0.0, 0, 0, 0, 0.0, 0, 0.0)  # fmt: skip
    bench = Bench(loadgen, supervisor, sizes)
    try:
        bench.start_server()
        port = free_port()
        serve = ["serve", "--config", str(args.config), "--listen", f"127.0.0.1:{port}"]
        if args.profile:
            argv_ = [args.python, __file__, "--serve-child", str(args.profile.resolve()), "--"]
        else:
            argv_ = [args.python, "-m", "translator.cli"]
        env_cwd = str(REPO_DIR)
        os.chdir(env_cwd)
        gateway = supervisor.spawn("gateway", [*argv_, *serve])
        wait_for_port(port, gateway, 30.0, time.monotonic)
        print(f"gateway pid {gateway.pid} on 127.0.0.1:{port}", flush=True)
        proxy = f"127.0.0.1:{port}"
        bench.warm_up(proxy)
        if args.profile:
            os.kill(gateway.pid, signal.SIGUSR1)
            time.sleep(0.2)
        per_session: list[float] = []
        for round_ in range(1, args.rounds + 1):
            before = cpu_seconds(gateway.pid)
            result = bench._loadgen(
                ["sessions", "--proxy", proxy, "--target", bench.session,
                 "-c", str(args.concurrency), "-n", str(args.sessions),
                 "-t", str(args.time_limit), "-s", str(args.payload)],
                timeout=args.time_limit + 20,
            )  # fmt: skip
            time.sleep(0.3)  # the last sessions' access lines and closes
            after = cpu_seconds(gateway.pid)
            user, system = after[0] - before[0], after[1] - before[1]
            used = user + system
            done = max(int(result["completed"]), 1)
            micros = 1e6 * used / done
            per_session.append(micros)
            print(
                f"round {round_}: {done} sessions ({result['errors']} errors) in "
                f"{result['elapsed']:.2f} s = {result['rate']:,.0f}/s; gateway CPU "
                f"{used:.2f} s = {micros:.1f} µs/session (user {1e6 * user / done:.0f} + "
                f"system {1e6 * system / done:.0f}; "
                f"{100 * used / max(result['elapsed'], 1e-6):.0f}% of a core)",
                flush=True,
            )
        if args.profile:
            os.kill(gateway.pid, signal.SIGUSR2)
            time.sleep(1.0)
            print(f"profile written to {args.profile}")
        print(
            f"median: {statistics.median(per_session):.1f} µs/session (min {min(per_session):.1f})"
        )
        if args.keep_log:
            print(f"gateway log: {workdir / 'gateway.log'}")
        supervisor.stop(gateway)
        if gateway.returncode not in (0, -signal.SIGTERM):
            print(f"gateway exited with status {gateway.returncode}", file=sys.stderr)
    finally:
        supervisor.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
