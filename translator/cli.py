"""``socks64`` command line: serve, check-config, hash-password, run, lab."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from functools import partial
from typing import Any

from .config import Config, ConfigError, Endpoint, load_config, parse_endpoint, worker_count
from .service.logformat import configure_logging

DEFAULT_PID_FILE = "/run/socks64.pid"
DEFAULT_METRICS_URL = "http://127.0.0.1:9464/metrics"

log = logging.getLogger("socks64")


def _endpoint(text: str) -> Endpoint:
    try:
        return parse_endpoint(text, "--listen")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gateway(text: str) -> tuple[str, int]:
    from .client.proxychains import parse_gateway

    try:
        return parse_gateway(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _logging_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--log-level",
        default="INFO" if default is None else default,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log verbosity (default INFO)",
    )
    parser.add_argument(
        "--log-format",
        default="text" if default is None else default,
        choices=["text", "json"],
        type=str.lower,
        help="text lines, or one JSON object per line (default text)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socks64",
        description="SOCKS5 gateway between IPv4-only and IPv6-only hosts (Kitamura extensions).",
    )
    _logging_options(parser, None)
    # Also after the command (`socks64 serve --log-level DEBUG`, as `./run serve ...` passes
    # it); SUPPRESS keeps the top-level value when it is not given there.
    after = argparse.ArgumentParser(add_help=False)
    _logging_options(after, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway", parents=[after])
    serve.add_argument("--config", help="YAML config file (default: the embedded config)")
    serve.add_argument(
        "--listen",
        action="append",
        type=_endpoint,
        metavar="HOST:PORT",
        help="listen here instead of the config's listeners; repeatable; [::1]:1080 for IPv6",
    )
    serve.add_argument("--pid-file", help="write the process id here (for socks64 reload)")
    worker = commands.add_parser(
        "worker", help="one worker of serve with workers: N (serve starts it)", parents=[after]
    )
    worker.add_argument("--config")
    check = commands.add_parser(
        "check-config", help="validate a config file and exit", parents=[after]
    )
    check.add_argument("file")
    reload = commands.add_parser(
        "reload", help="make a running gateway re-read its config (SIGHUP)", parents=[after]
    )
    reload.add_argument("--pid-file", default=DEFAULT_PID_FILE, help=f"default {DEFAULT_PID_FILE}")
    status = commands.add_parser(
        "status", help="a short view of a running gateway, from its metrics", parents=[after]
    )
    status.add_argument("--metrics", default=DEFAULT_METRICS_URL, metavar="URL")
    hashpw = commands.add_parser(
        "hash-password", help="print a users-file line for a password read from stdin"
    )
    hashpw.add_argument("args", nargs=argparse.REMAINDER)
    run = commands.add_parser(
        "run",
        help="run a program with its TCP connections and name lookups through a gateway",
        description="Run COMMAND under proxychains4: its TCP connections and its name "
        "lookups go to the gateway (SOCKS5, names resolved there). Credentials come from "
        "SOCKS64_USER and SOCKS64_PASSWORD.",
        usage="%(prog)s [--gateway HOST:PORT] [--verbose] -- COMMAND ...",
        parents=[after],
    )
    run.add_argument(
        "--gateway",
        type=_gateway,
        metavar="HOST:PORT",
        help="the socks64 gateway; [IPv6]:PORT; a name is resolved once here "
        "(default: $SOCKS64_GATEWAY, else 127.0.0.1:1080)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="show proxychains4's own lines")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND", help="after --")
    lab = commands.add_parser("lab", help="network-namespace lab (up, down, status, exec, run)")
    lab.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "reload":
        from .service.runner import send_reload

        return send_reload(args.pid_file)
    if args.command == "status":
        from .service.status import main as status_main

        return status_main(["--metrics", args.metrics])
    if args.command == "hash-password":
        from .auth import main_hash_password

        return main_hash_password(args.args)
    if args.command == "run":
        return _run(args.gateway, args.argv, args.verbose)
    if args.command == "lab":
        from netnslab.cli import main as lab_main

        return int(lab_main(args.args))
    if args.command == "worker":
        from .service.worker import worker_main

        return worker_main(args.config, run_event_loop)
    log_options = ["--log-level", args.log_level, "--log-format", args.log_format]
    return _serve(args.config, args.listen, args.pid_file, log_options)


def _check_config(path: str) -> int:
    from .gss.acceptor import acceptor_for

    try:
        config = load_config(path)
        acceptor_for(config)  # the keytab is read as the gateway would read it
    except ConfigError as exc:
        print(f"{path}: error: {exc}", file=sys.stderr)
        return 2
    for warning in config_warnings(config):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    listeners = ", ".join(str(e) for e in config.listen)
    print(f"{path}: OK ({listeners}; {len(config.policy.rules)} policy rules)")
    return 0


def _run(gateway: tuple[str, int] | None, argv: list[str], verbose: bool) -> int:
    from .client.proxychains import RunError, default_gateway, run

    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        return run(gateway or default_gateway(), argv, verbose=verbose)
    except RunError as exc:
        print(f"socks64 run: {exc}", file=sys.stderr)
        return exc.status


def config_warnings(config: Config) -> list[str]:
    """What is valid but almost certainly not what the operator wants."""
    import resource

    from .service.fdlimit import capacity_warning

    warnings = []
    if not config.policy.can_allow_anything():
        warnings.append("policy: no rule allows anything and the default is deny")
    # serve raises the soft descriptor limit to the hard one: judge by that
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    transparent = config.transparent
    if transparent.interfaces and not transparent.dns_listen:
        warnings.append(
            "transparent.interfaces without transparent.dns_listen: nothing hands out pool "
            "addresses, so nothing will be intercepted"
        )
    if transparent.dns_listen and not transparent.interfaces:
        warnings.append(
            "transparent.dns_listen without transparent.interfaces: DNS46 answers pool "
            "addresses that only SOCKS clients can use (nothing is intercepted)"
        )
    if transparent.enabled:
        from .transparent.front import local_ipv4_networks
        from .transparent.settings import pool_conflicts

        with contextlib.suppress(OSError, ImportError):
            conflicts = pool_conflicts(transparent.pool, local_ipv4_networks())
            if conflicts:
                warnings.append(
                    f"transparent.pool {transparent.pool} overlaps local network(s) "
                    f"{', '.join(conflicts)}: the gateway will refuse to start"
                )
    count, cpus = worker_count(config), len(os.sched_getaffinity(0))
    if count > cpus:
        warnings.append(
            f"workers: {count} is more than the {cpus} CPU(s) this process may use: "
            "workers will share cores (auto: one per CPU)"
        )
    if config.addrmap.state_file and config.addrmap.redis_url:
        warnings.append("addrmap.state_file is not used with a Redis backend")
    capacity = capacity_warning(config.limits.max_clients * count, hard)
    if capacity:
        warnings.append(capacity)
    return warnings


def fast_paths_enabled() -> bool:
    """uvloop and splice(2) unless SOCKS64_NO_FASTPATH=1 selects plain asyncio and copying."""
    return os.environ.get("SOCKS64_NO_FASTPATH", "") not in ("1", "true")


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    if fast_paths_enabled():
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed; using the asyncio event loop")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def _serve(
    config_path: str | None,
    listen: list[Endpoint] | None,
    pid_file: str | None,
    log_options: list[str] | None = None,
) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("config %s: %s", config_path or "<default>", exc)
        return 2
    if not config.policy.can_allow_anything():
        log.warning("policy: no rule allows anything and the default is deny")
    from .service.runner import Service

    count = worker_count(config)
    try:
        if count > 1:
            from .service.supervisor import Supervisor

            supervisor = Supervisor(
                config,
                count,
                config_path=config_path,
                listen=listen,
                pid_file=pid_file,
                log_options=log_options,
            )
            run_event_loop(supervisor.run())
        else:
            service = Service(config, partial(load_config, config_path), listen, pid_file)
            run_event_loop(service.run())
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except Exception as exc:  # PrivilegeError, a bad socket from systemd: say why, exit 1
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
