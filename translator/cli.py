"""``socks64`` command line: serve, check-config, hash-password, lab."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from .config import Config, ConfigError, Endpoint, load_config, parse_endpoint

log = logging.getLogger("socks64")


def _endpoint(text: str) -> Endpoint:
    try:
        return parse_endpoint(text, "--listen")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _log_level_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log verbosity (default INFO)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socks64",
        description="SOCKS5 gateway between IPv4-only and IPv6-only hosts (Kitamura extensions).",
    )
    _log_level_option(parser, "INFO")
    # Also after the command (`socks64 serve --log-level DEBUG`, as `./run serve ...` passes
    # it); SUPPRESS keeps the top-level value when it is not given there.
    after = argparse.ArgumentParser(add_help=False)
    _log_level_option(after, argparse.SUPPRESS)
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
    check = commands.add_parser(
        "check-config", help="validate a config file and exit", parents=[after]
    )
    check.add_argument("file")
    hashpw = commands.add_parser(
        "hash-password", help="print a users-file line for a password read from stdin"
    )
    hashpw.add_argument("args", nargs=argparse.REMAINDER)
    lab = commands.add_parser("lab", help="network-namespace lab (up, down, status, exec, run)")
    lab.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "hash-password":
        from .auth import main_hash_password

        return main_hash_password(args.args)
    if args.command == "lab":
        from netnslab.cli import main as lab_main

        return int(lab_main(args.args))
    return _serve(args.config, args.listen)


def _check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: error: {exc}", file=sys.stderr)
        return 2
    listeners = ", ".join(str(e) for e in config.listen)
    print(f"{path}: OK ({listeners}; {len(config.policy.rules)} policy rules)")
    return 0


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


def _serve(config_path: str | None, listen: list[Endpoint] | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("config %s: %s", config_path or "<default>", exc)
        return 2
    try:
        run_event_loop(_run(config, listen))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


async def _run(config: Config, listen: list[Endpoint] | None) -> None:
    from translator.gateway.server import Gateway

    gateway = Gateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    endpoints = await gateway.start(listen)
    for endpoint in endpoints:
        log.info("listening on %s", endpoint)
    log.info("config %s; ready", config.source)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await gateway.close()


if __name__ == "__main__":
    sys.exit(main())
