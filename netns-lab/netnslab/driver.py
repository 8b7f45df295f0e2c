"""Helpers scenarios use to act as a user inside the lab: run probes, curl, ncat, ss.

Every helper runs its program inside a node with ``ip netns exec``; results come back as
text or parsed JSON. A helper that cannot finish in its time limit raises
`ScenarioFailure` with what it saw, never hangs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from netnslab.lab import Lab
from netnslab.services import split_endpoint


class ScenarioFailure(AssertionError):
    """A scenario's expectation did not hold; the message says what the user would see."""


def check(condition: object, message: str) -> None:
    """Fail the scenario with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ScenarioFailure(message)


def gateway_endpoint(lab: Lab, client: str, gateway: str | None = None) -> str:
    """The socks64 listen endpoint ``client`` can reach directly (on one of its networks)."""
    networks = [a.network for a in lab.topology.addresses(client)]
    for node, service in lab.topology.services("socks64"):
        if gateway is not None and node != gateway:
            continue
        for endpoint in service.options.get("listen") or []:
            host, _port = split_endpoint(str(endpoint))
            address = ipaddress.ip_address(host)
            if any(address.version == n.version and address in n for n in networks):
                return str(endpoint)
    raise ScenarioFailure(f"no socks64 gateway listens on a network of {client}")


def gateway_config(lab: Lab, node: str = "gw", name: str = "gateway") -> dict[str, Any]:
    """The ``config`` mapping the topology gives a gateway service."""
    return dict(lab.service(node, name).options.get("config") or {})


def require_services(lab: Lab, *names: str) -> None:
    """Fail at once, with the reason, if a service the scenario needs did not start."""
    for name in names:
        reason = lab.service_failures.get(name)
        check(reason is None, f"service {name} is not running: {reason}")


def probe_argv(action: str, *args: str) -> list[str]:
    """The command line of one `netnslab.probe` action."""
    return [sys.executable, "-m", "netnslab.probe", action, *args]


def _parse_lines(text: str) -> list[dict[str, Any]]:
    parsed: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue
    return parsed


def run_probe(
    lab: Lab, node: str, action: str, *args: str, timeout: float = 20.0
) -> dict[str, Any]:
    """Run a probe to completion inside ``node`` and return its final JSON object."""
    try:
        done = lab.exec(node, probe_argv(action, *args), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ScenarioFailure(f"probe {action} in {node} did not finish in {timeout}s") from None
    lines = _parse_lines(done.stdout)
    final = lines[-1] if lines else None
    if final is None or "ok" not in final:
        raise ScenarioFailure(
            f"probe {action} in {node} printed no result (exit {done.returncode}): "
            f"{done.stderr.strip()[-800:]}"
        )
    return final


def expect_ok(result: dict[str, Any], what: str) -> dict[str, Any]:
    """The probe result, or a failure naming ``what`` and the probe's error."""
    check(result.get("ok"), f"{what}: {result.get('error')} (REP {result.get('rep')})")
    return result


_PENDING: dict[int, bytearray] = {}


def read_json_line(child: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The next JSON line a piped helper prints, within ``timeout`` seconds.

    Reads the pipe with os.read and keeps its own buffer per child, so a second line that
    arrived together with the first is not hidden in a file object's buffer from select().
    """
    assert child.stdout is not None
    fd = child.stdout.fileno()
    buffer = _PENDING.setdefault(child.pid, bytearray())
    deadline = time.monotonic() + timeout
    while True:
        newline = buffer.find(b"\n")
        if newline >= 0:
            line = bytes(buffer[: newline + 1]).decode("utf-8", "replace").strip()
            del buffer[: newline + 1]
            if line.startswith("{"):
                if not buffer:
                    _PENDING.pop(child.pid, None)  # no stale entry left for a reused pid
                parsed: dict[str, Any] = json.loads(line)
                return parsed
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ScenarioFailure(f"no output from {child.args!r} within {timeout}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            _PENDING.pop(child.pid, None)
            err = child.stderr.read().decode("utf-8", "replace") if child.stderr else ""
            raise ScenarioFailure(f"helper ended without output: {err.strip()[-800:]}")
        buffer += chunk


def curl(lab: Lab, node: str, url: str, proxy: str | None = None, timeout: float = 10.0) -> str:
    """Fetch ``url`` with curl inside ``node`` (through ``proxy``, a curl proxy URL)."""
    argv = ["curl", "--silent", "--show-error", "--max-time", str(timeout)]
    if proxy:
        argv += ["--proxy", proxy]
    done = lab.exec(node, [*argv, url], timeout=timeout + 5)
    check(done.returncode == 0, f"curl {url} in {node} failed: {done.stderr.strip()}")
    return done.stdout


def curl_fails(lab: Lab, node: str, url: str, timeout: float = 2.0) -> str:
    """curl ``url`` directly (no proxy) and require it to fail; returns curl's message."""
    argv = ["curl", "--silent", "--show-error", "--connect-timeout", str(timeout), url]
    done = lab.exec(node, argv, timeout=timeout + 5)
    check(done.returncode != 0, f"{node} reached {url} directly: {done.stdout.strip()!r}")
    return done.stderr.strip()


def ncat_http(lab: Lab, node: str, proxy: str, host: str, port: int) -> str:
    """GET / with ncat through a SOCKS5 proxy, the name resolved by the proxy."""
    argv: Sequence[str] = [
        "ncat",
        "--proxy",
        proxy,
        "--proxy-type",
        "socks5",
        "--proxy-dns",
        "remote",
        "--wait",
        "5",
        host,
        str(port),
    ]
    done = lab.exec(node, argv, timeout=15, input_text="GET / HTTP/1.0\r\n\r\n")
    check(done.returncode == 0, f"ncat to {host}:{port} in {node} failed: {done.stderr.strip()}")
    return done.stdout


def established_sockets(lab: Lab, node: str) -> list[tuple[str, str]]:
    """(local, peer) of every ESTABLISHED TCP socket in ``node``, as ``ss`` prints them."""
    done = lab.exec(node, ["ss", "--tcp", "--numeric", "--no-header", "state", "established"])
    check(done.returncode == 0, f"ss in {node} failed: {done.stderr.strip()}")
    pairs: list[tuple[str, str]] = []
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            pairs.append((fields[-2], fields[-1]))
    return pairs
