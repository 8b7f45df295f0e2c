"""``socks64 status``: a short human view of a running gateway, read from its /metrics.

The gateway's metrics endpoint is the only interface used, so the command works against
any gateway the operator can scrape and needs no control socket or privileges.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from typing import Final, TextIO

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_URL: Final = "http://127.0.0.1:9464/metrics"

REP_NAMES: Final = {
    "1": "general failure",
    "2": "not allowed by ruleset",
    "3": "network unreachable",
    "4": "host unreachable",
    "5": "connection refused",
    "6": "TTL expired",
    "7": "command not supported",
    "8": "address type not supported",
    "9": "invalid address",
}

_Samples = dict[str, list[tuple[dict[str, str], float]]]


def fetch(url: str = DEFAULT_URL, timeout: float = 3.0) -> str:
    """The exposition text at ``url``; raises OSError/HTTPException when unreachable."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: bytes = response.read()
    return data.decode("utf-8", errors="replace")


def _index(text: str) -> _Samples:
    """Samples by sample name (``..._total`` for counters), so lookups ignore families."""
    samples: _Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return samples


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.2f}"


def human_bytes(value: float) -> str:
    """1536 -> '1.5 KiB': binary units, one decimal above bytes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _total(samples: _Samples, name: str) -> float | None:
    rows = samples.get(name)
    return None if not rows else sum(value for _, value in rows)


def _by(samples: _Samples, name: str, label: str) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for labels, value in samples.get(name, []):
        sums[labels.get(label, "")] += value
    return dict(sums)


def _transparent_line(s: _Samples, size: float) -> str:
    """The transparent front: the pool, DNS46's answers, intercepted flows."""
    bound = _total(s, "socks64_transparent_pool_bound") or 0
    answers = _by(s, "socks64_transparent_dns_answers_total", "answer")
    flows = _by(s, "socks64_transparent_flows_total", "protocol")
    active = _by(s, "socks64_transparent_flows_active", "protocol")
    parts = [
        f"{_num(bound)} of {_num(size)} pool addresses bound",
        f"DNS46 {_num(answers.get('synthesized', 0))} synthesized, "
        f"{_num(answers.get('forwarded', 0))} forwarded",
        "flows "
        + ", ".join(
            f"{p} {_num(flows.get(p, 0))} ({_num(active.get(p, 0))} open)" for p in ("tcp", "udp")
        ),
    ]
    return "transparent: " + "; ".join(parts)


def summarize(text: str) -> str:
    """A few lines for a person; a metric the gateway does not export leaves its line out."""
    s = _index(text)
    out: list[str] = []

    if "socks64_listener_info" in s:
        endpoints = sorted(lb["endpoint"] for lb, v in s["socks64_listener_info"] if v)
        out.append("listeners: " + (", ".join(endpoints) if endpoints else "none"))

    workers = _total(s, "socks64_workers")
    if workers is not None:
        restarts = _total(s, "socks64_worker_restarts_total") or 0
        out.append(f"workers: {_num(workers)} running, {_num(restarts)} restarted")

    if "socks64_sessions_active" in s:
        by_command = _by(s, "socks64_sessions_active", "command")
        active = {c: n for c, n in sorted(by_command.items()) if n}
        detail = ", ".join(f"{c} {_num(n)}" for c, n in active.items())
        line = f"sessions: {_num(sum(active.values()))} active"
        out.append(f"{line} ({detail})" if detail else line)

    udp = _total(s, "socks64_udp_associations_active")
    if udp is not None:
        out.append(f"UDP associations: {_num(udp)} active")

    live = _total(s, "socks64_address_ids")
    if live is not None:
        parts = [f"{_num(live)} live"]
        for name, what in (
            ("socks64_address_ids_issued_total", "issued"),
            ("socks64_address_ids_quarantined", "quarantined"),
        ):
            value = _total(s, name)
            if value is not None:
                parts.append(f"{_num(value)} {what}")
        out.append("ADDRESS IDs: " + ", ".join(parts))

    size = _total(s, "socks64_transparent_pool_size")
    if size is not None:
        out.append(_transparent_line(s, size))

    accepted = _total(s, "socks64_connections_accepted_total")
    rejected = _total(s, "socks64_connections_rejected_total")
    if accepted is not None or rejected is not None:
        out.append(f"connections: {_num(accepted or 0)} accepted, {_num(rejected or 0)} rejected")

    refusals: dict[str, float] = {}
    for rep, count in _by(s, "socks64_requests_total", "rep").items():
        if rep != "0" and count:
            refusals[f"REP {rep} ({REP_NAMES.get(rep, 'unknown')})"] = count
    for reason, count in _by(s, "socks64_connections_rejected_total", "reason").items():
        if count:
            refusals[f"rejected at accept: {reason}"] = count
    for reason, count in _by(s, "socks64_transparent_refusals_total", "reason").items():
        if count:
            refusals[f"transparent: {reason}"] = count
    if refusals:
        out.append("top refusals:")
        top = sorted(refusals.items(), key=lambda item: (-item[1], item[0]))[:5]
        out.extend(f"  {_num(count):>8}  {what}" for what, count in top)

    if "socks64_relayed_bytes_total" in s:
        flows: dict[str, dict[str, float]] = defaultdict(lambda: {"up": 0.0, "down": 0.0})
        for labels, value in s["socks64_relayed_bytes_total"]:
            direction = labels.get("direction", "")
            if direction in ("up", "down"):
                flows[labels.get("family", "?")][direction] += value
        if flows:
            out.append("bytes relayed (by destination family):")
            for family, f in sorted(flows.items()):
                out.append(f"  {family}: up {human_bytes(f['up'])}, down {human_bytes(f['down'])}")

    if "socks64_config_reloads_total" in s:
        reloads = _by(s, "socks64_config_reloads_total", "result")
        out.append(
            f"config reloads: {_num(reloads.get('ok', 0))} ok, "
            f"{_num(reloads.get('error', 0))} error"
        )

    process: list[str] = []
    rss = _total(s, "process_resident_memory_bytes")
    if rss is not None:
        process.append(f"RSS {human_bytes(rss)}")
    cpu = _total(s, "process_cpu_seconds_total")
    if cpu is not None:
        process.append(f"CPU {cpu:.1f} s")
    fds = _total(s, "process_open_fds")
    if fds is not None:
        process.append(f"{_num(fds)} open fds")
    if process:
        out.append("process: " + ", ".join(process))

    return "\n".join(out)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``socks64 status [--metrics URL]``; returns the exit status."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = argparse.ArgumentParser(
        prog="socks64 status", description="Show a running gateway's state from its metrics."
    )
    parser.add_argument(
        "--metrics",
        default=DEFAULT_URL,
        metavar="URL",
        help=f"the gateway's metrics endpoint (default {DEFAULT_URL})",
    )
    args = parser.parse_args(argv)
    url: str = args.metrics
    try:
        text = fetch(url)
    except urllib.error.HTTPError as exc:
        print(f"socks64 status: {url} answered HTTP {exc.code} {exc.reason}", file=stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"socks64 status: cannot reach {url}: {exc.reason}", file=stderr)
        return 1
    except (OSError, http.client.HTTPException, ValueError) as exc:
        print(f"socks64 status: cannot reach {url}: {exc or type(exc).__name__}", file=stderr)
        return 1
    try:
        view = summarize(text)
    except (ValueError, KeyError, IndexError) as exc:
        print(f"socks64 status: {url} is not a metrics exposition: {exc}", file=stderr)
        return 1
    print(view, file=stdout)
    return 0
