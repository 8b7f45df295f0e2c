#!/usr/bin/env python3
"""Transparent front vs the SOCKS path: the same relay, measured side by side in one run.

    sudo python3 bench/transparent.py              # full run: median of 3 runs, about 2 minutes
    sudo python3 bench/transparent.py --quick      # smoke run: small sizes, 1 run, < 1 minute
    sudo python3 bench/transparent.py --runs 5 --profile   # and py-spy the gateway per path

Builds the lab ``bench/configs/transparent-lab.yaml`` with netnslab (network namespaces,
documentation addresses only, torn down at the end, also on Ctrl-C or SIGTERM): c4 an
IPv4-only client, gw socks64 with the transparent front (forwarding off), s6 an IPv6-only
server running ``loadgen serve --bind ::``, dns a dnsmasq where ``sink.lab.test`` has only
an AAAA record. c4 resolves that name through DNS46 to a pool address P, then runs the same
loadgen workloads two ways: **transparent** = straight to P (nftables TPROXY hands the flow
to the gateway) and **SOCKS** = CONNECT P through gw:1080 (the gateway maps P back to the
name). The only difference is interception vs the SOCKS handshake. Paths alternate (ABBA
per run); each cell is the median over the runs and ratios are transparent / SOCKS. The
gateway's CPU time (utime+stime from /proc/PID/stat) per flow and per GB is recorded too.

Prints a Markdown table and writes ``bench/results/transparent-latest.md`` (raw numbers in
``.json``). Needs root. Re-executes itself with the repository's ``.venv`` python when
started with another one (the gateway runs under the same interpreter). See
docs/performance.md, "Transparent front vs the SOCKS path".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relaybench.procs import Supervisor
from relaybench.targets import BENCH_DIR, REPO_DIR, build_loadgen
from transparentbench import report
from transparentbench.config import (
    FULL,
    NAME,
    PATH_LABEL,
    PATHS,
    QUICK,
    TOPOLOGY,
    VENV,
    WORKLOADS,
    Result,
    Runs,
    say,
)
from transparentbench.lab import signals_as_interrupt
from transparentbench.profile import profile_path
from transparentbench.workloads import Bench, load_average, measure_all

if TYPE_CHECKING:  # netnslab needs pyroute2: imported once we run in the venv (main)
    from netnslab.lab import Lab


def reexec_in_venv() -> None:
    """Run under the repository's venv python (pyroute2, uvloop: what the gateway runs with)."""
    python = VENV / "bin" / "python"
    if not python.exists() or os.environ.get("SOCKS64_BENCH_REEXEC"):
        return
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    os.environ["SOCKS64_BENCH_REEXEC"] = "1"
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (< 60 s)")
    parser.add_argument("--runs", type=int, help="runs per path and workload (default 3)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the runs, py-spy the gateway during one more sessions workload per path",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=15.0,
        help="start no new measurement after this long (default 15)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "socks64-bench",
        help="where the compiled loadgen is kept",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=BENCH_DIR / "results" / "transparent-latest.md",
        help="Markdown output (the raw numbers go beside it as .json)",
    )
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be 1-20")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("bench/transparent.py needs root (network namespaces, nftables)")
        return 2
    if importlib.util.find_spec("netnslab") is None:  # not pip-installed: the source tree
        sys.path.insert(0, str(REPO_DIR / "netns-lab"))
    from netnslab.lab import Lab
    from netnslab.topology import load_topology

    sizes = QUICK if args.quick else FULL
    meta_notes: list[str] = []
    if os.environ.pop("SOCKS64_NO_FASTPATH", None) is not None:
        meta_notes.append("SOCKS64_NO_FASTPATH was set: removed, the fast paths are measured")
    started = datetime.now(UTC)
    deadline = time.monotonic() + 60 * args.max_minutes
    load_start = load_average()
    workdir = Path(tempfile.mkdtemp(prefix="socks64-transparent-bench-"))
    supervisor = Supervisor(workdir)
    runs: Runs = {path: {w: [] for w in WORKLOADS} for path in PATHS}
    ok = False
    lab: Lab | None = None
    with signals_as_interrupt():
        try:
            loadgen = build_loadgen(args.cache_dir)
            version, commit = report.describe_version()
            say(f"loadgen {loadgen}; building the lab {TOPOLOGY.name} (logs in {workdir})")
            lab = Lab.up(load_topology(TOPOLOGY), start_services=False, teardown_at_exit=True)
            bench = Bench(lab, loadgen, sizes, supervisor)
            bench.start()
            say(
                f"lab {lab.run_id} up: {NAME} = {bench.pool_address} in c4; "
                f"gateway pid {bench.gateway_pid}"
            )
            for path in PATHS:
                bench.warm_up(path)
            meta_notes += measure_all(bench, args, deadline, runs)
            profiles: list[Result] = []
            if args.profile:
                for path in PATHS:
                    out = args.output.with_name(f"{args.output.stem}-profile-{path}.txt")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        profiles.append(profile_path(bench, path, out))
                        say(f"  profiled {PATH_LABEL[path]}: raw stacks in {out}")
                    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                        meta_notes.append(f"profile of {PATH_LABEL[path]} failed: {exc}")
            meta = {
                "started": f"{started:%Y-%m-%d %H:%M}",
                "command": "sudo python3 bench/transparent.py " + " ".join(sys.argv[1:]),
                "load_start": load_start,
                "load_end": load_average(),
                "version": version,
                "commit": commit,
                "pool_address": bench.pool_address,
                "sizes": asdict(sizes),
                "runs": args.runs,
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
                "notes": meta_notes,
            }
            meta["command"] = meta["command"].strip()
            text, figures = report.render(args, runs, sizes, meta, profiles)
            print(text)
            raw = {"meta": meta, "figures": figures, "runs": runs, "profiles": profiles}
            written = report.write(args.output, text, raw)
            say(f"wrote {args.output} and {written.name}")
            ok = True
        except KeyboardInterrupt:
            say("interrupted; tearing the lab down")
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            say(f"failed: {exc}")
        finally:
            supervisor.stop_all()
            if lab is not None:
                if not ok:  # keep the gateway's log: the lab directory goes with the lab
                    for log in lab.directory.glob("*.log"):
                        with contextlib.suppress(OSError):
                            shutil.copy(log, workdir / log.name)
                lab.teardown()
                left = lab.leftovers()
                if left:
                    say(f"lab {lab.run_id} left behind: {', '.join(left)}")
                    ok = False
                else:
                    say(f"lab {lab.run_id} removed (nothing left behind)")
            if ok:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                say(f"logs kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    reexec_in_venv()
    sys.exit(main())
