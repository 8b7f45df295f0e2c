"""``socks64 lab``: bring a lab up, look at it, run commands and scenarios in it, tear it down.

    socks64 lab up [TOPOLOGY] [--no-services]
    socks64 lab status [RUN_ID] [-v]
    socks64 lab exec [--lab RUN_ID] NODE -- CMD [ARG...]
    socks64 lab run [--lab RUN_ID] [--topology T] [SCENARIO...] [--list]
    socks64 lab down [RUN_ID]

``up`` leaves the lab running (state in /run/socks64-lab/); ``down`` without a run id
removes every lab this user started. ``run`` uses the newest running lab, or builds one of
``--topology`` for the duration of the run when none is running.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from netnslab import interrupt
from netnslab.lab import Lab, LabError, TeardownReport, teardown_all, teardown_state
from netnslab.scenarios import SCENARIOS, Outcome, run_all, scenarios_for
from netnslab.state import iter_states
from netnslab.status import render_status
from netnslab.topology import TopologyError


def _interrupt_on_terminate() -> None:
    # SIGTERM / SIGHUP take the same path as Ctrl-C, so the builder's cleanup runs. Only in
    # this process: pyroute2 forks helpers that inherit the handler and are stopped by TERM.
    owner = os.getpid()

    def handler(signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def _print_report(report: TeardownReport) -> None:
    note = f"lab {report.run_id}: stopped {report.stopped} processes"
    if report.stragglers_killed:
        note += f", killed {report.stragglers_killed} stragglers"
    note += f", removed {report.namespaces_removed} namespaces"
    print(note)
    for item in report.leftovers:
        print(f"  still present: {item}", file=sys.stderr)


def cmd_up(args: argparse.Namespace) -> int:
    interrupt.install()  # signals stop the build at its next step, never mid-call
    lab = Lab.up(args.topology, start_services=not args.no_services)
    try:
        interrupt.checkpoint()
    except KeyboardInterrupt:
        lab.teardown()
        raise
    print(render_status(lab))
    print(f"\nlab {lab.run_id} is up; 'socks64 lab down {lab.run_id}' removes it")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if args.run_id:
        states = [s for s in iter_states() if s.run_id == args.run_id]
        if not states:
            print(f"no lab {args.run_id}", file=sys.stderr)
            return 1
        reports = [teardown_state(s) for s in states]
    else:
        reports = teardown_all()
        if not reports:
            print("no lab running")
    for report in reports:
        _print_report(report)
    return 1 if any(r.leftovers for r in reports) else 0


def cmd_status(args: argparse.Namespace) -> int:
    states = [s for s in iter_states() if args.run_id in (None, s.run_id)]
    if not states:
        print("no lab running")
        return 1 if args.run_id else 0
    for index, state in enumerate(states):
        if index:
            print()
        print(render_status(Lab.attach(state.run_id), verbose=args.verbose))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("lab exec: give a command after NODE --", file=sys.stderr)
        return 2
    lab = Lab.attach(args.lab)
    return subprocess.call(lab.command(args.node, command))


def format_table(outcomes: Sequence[Outcome]) -> str:
    """The pass/fail table ``lab run`` prints."""
    width = max([len(o.name) for o in outcomes] + [8])
    rows = [
        f"{'scenario':<{width}}  result  time    detail",
        f"{'-' * width}  ------  ------  ------",
    ]
    for outcome in outcomes:
        verdict = "PASS" if outcome.passed else "FAIL"
        detail = outcome.detail.replace("\n", " ")
        rows.append(f"{outcome.name:<{width}}  {verdict:<6}  {outcome.seconds:5.1f}s  {detail}")
    passed = sum(o.passed for o in outcomes)
    rows.append(f"{passed} passed, {len(outcomes) - passed} failed")
    return "\n".join(rows)


def cmd_run(args: argparse.Namespace) -> int:
    if args.list:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:<28} [{scenario.topology}] {scenario.summary}")
        return 0
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios: {', '.join(unknown)} (see 'lab run --list')", file=sys.stderr)
        return 2
    temporary = False
    try:
        lab = Lab.attach(args.lab)
    except LabError:
        if args.lab:
            raise
        print(f"no lab running: building a temporary '{args.topology}' lab", file=sys.stderr)
        lab = Lab.up(args.topology, teardown_at_exit=True)
        temporary = True
    try:
        names = args.scenarios or [s.name for s in scenarios_for(lab.topology)]
        print(f"lab {lab.run_id} ({lab.topology.name}): {len(names)} scenarios", flush=True)
        outcomes = run_all(lab, names)
    finally:
        if temporary:
            _print_report(lab.teardown())
    print(format_table(outcomes))
    return 0 if outcomes and all(o.passed for o in outcomes) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="socks64 lab", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="action", required=True)
    up = commands.add_parser("up", help="build a lab and leave it running")
    up.add_argument("topology", nargs="?", default="default", help="name or YAML path")
    up.add_argument("--no-services", action="store_true", help="network only")
    down = commands.add_parser("down", help="tear down one lab, or all of this user's")
    down.add_argument("run_id", nargs="?")
    status = commands.add_parser("status", help="namespaces, links, addresses, services")
    status.add_argument("run_id", nargs="?")
    status.add_argument("-v", "--verbose", action="store_true", help="link-local, connected")
    exe = commands.add_parser("exec", help="run a command inside a node")
    exe.add_argument("--lab", help="run id (default: the newest lab)")
    exe.add_argument("node")
    exe.add_argument("command", nargs=argparse.REMAINDER)
    run = commands.add_parser("run", help="run scenarios and print a pass/fail table")
    run.add_argument("scenarios", nargs="*")
    run.add_argument("--lab", help="run id (default: the newest lab)")
    run.add_argument("--topology", default="default", help="when no lab is running")
    run.add_argument("--list", action="store_true", help="list the scenarios")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``socks64 lab ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("socks64 lab needs root (network namespaces)", file=sys.stderr)
        return 1
    _interrupt_on_terminate()
    handlers = {
        "up": cmd_up,
        "down": cmd_down,
        "status": cmd_status,
        "exec": cmd_exec,
        "run": cmd_run,
    }
    try:
        return handlers[args.action](args)
    except (LabError, TopologyError) as exc:
        print(f"lab {args.action}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lab {args.action}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
