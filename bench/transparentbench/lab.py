"""The lab: bringing it up, the gateway in it, and what its metrics say about a flow's path.

``GatewayLab`` starts the services of ``bench/configs/transparent-lab.yaml`` that the lab
itself does not (dnsmasq with a TTL, the gateway, ``loadgen serve`` in s6), resolves the
name to its pool address as c4 sees it, finds the gateway's pid and log, and scrapes its
Prometheus page into the counters that tell which path a measurement really took
(intercepted flows, SOCKS CONNECTs, DNS queries, refusals). ``signals_as_interrupt`` makes
SIGTERM and SIGHUP unwind like Ctrl-C, so the lab is torn down on every way out. netnslab
(pyroute2) is imported only inside the methods: this module loads under any python.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from relaybench.procs import Supervisor

from .config import (
    DNS_TTL,
    ECHO_PORT,
    METRICS_URL,
    NAME,
    POOL,
    SERVER,
    SESSION_PORT,
    SINK_PORT,
    Sizes,
    say,
)

if TYPE_CHECKING:  # netnslab needs pyroute2: imported once we run in the venv (main)
    from netnslab.lab import Lab


def parse_metrics(text: str) -> dict[str, float]:
    """``'name{labels}' -> value`` of a Prometheus text page (comments skipped)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[key] = float(value)
    return samples


def metric_sum(samples: dict[str, float], name: str, *labels: str) -> float:
    """Sum of the samples of ``name`` whose labels contain every ``labels`` text."""
    return sum(
        value
        for key, value in samples.items()
        if (key == name or key.startswith(name + "{")) and all(label in key for label in labels)
    )


COUNTERS: dict[str, Callable[[dict[str, float]], float]] = {
    "intercepted": lambda m: metric_sum(
        m, "socks64_transparent_flows_total", 'protocol="tcp"', 'family="ipv6"'
    ),
    "socks_connects": lambda m: metric_sum(m, "socks64_requests_total", 'command="CONNECT"'),
    "dns_queries": lambda m: metric_sum(m, "socks64_dns_duration_seconds_count"),
    "refused": lambda m: metric_sum(m, "socks64_transparent_refusals_total"),
}


class GatewayLab:
    """The running lab, the loadgen server in s6, the gateway's pid, log and counters."""

    def __init__(self, lab: Lab, loadgen: Path, sizes: Sizes, supervisor: Supervisor) -> None:
        self.lab = lab
        self.loadgen = loadgen
        self.sizes = sizes
        self.supervisor = supervisor
        self.server: subprocess.Popen[bytes] | None = None
        self.pool_address = ""

    def start(self) -> None:
        from netnslab import procs, services
        from netnslab.timing import poll_until

        lab = self.lab
        # dnsmasq as the topology declares it, plus a TTL: the lab's own start gives TTL 0,
        # which would send every flow of both paths to the DNS server
        service = lab.service("dns", "dnsmasq")
        namespace = lab.namespace("dns")
        argv = [*services.dnsmasq_argv(service, lab.directory), f"--local-ttl={DNS_TTL}"]
        log = lab.directory / "dns-dnsmasq.log"
        tracked, _ = procs.spawn(
            namespace, "dns", service.name, argv, log, services.child_environment()
        )
        lab.state.processes.append(tracked)
        lab.state.save()
        if not poll_until(lambda: services.service_ready(namespace, service), timeout=20.0):
            raise RuntimeError(f"dnsmasq did not answer; log {log}")
        lab.start_service("gw", "gateway")
        argv = [str(self.loadgen), "serve", "--bind", "::", "-s", str(self.sizes.payload)]
        argv += ["--echo-port", str(ECHO_PORT), "--sink-port", str(SINK_PORT)]
        argv += ["--session-port", str(SESSION_PORT), "--lifetime", "3600"]
        self.server = self.supervisor.spawn("server", lab.command("s6", argv))
        ready = poll_until(
            lambda: services.tcp_answers(lab.namespace("s6"), f"[{SERVER}]:{ECHO_PORT}"),
            timeout=10.0,
        )
        if not ready or self.server.poll() is not None:
            raise RuntimeError("loadgen serve did not listen in s6")
        self.resolve()

    def resolve(self) -> str:
        """The pool address c4 gets for NAME from DNS46 (what an unmodified program sees)."""
        done = self.lab.exec("c4", ["getent", "ahostsv4", NAME], timeout=15)
        fields = done.stdout.split()
        if done.returncode != 0 or not fields:
            raise RuntimeError(f"getent ahostsv4 {NAME} in c4 failed: {done.stderr.strip()}")
        address = str(fields[0])
        if ipaddress.ip_address(address) not in POOL:
            raise RuntimeError(f"{NAME} resolved to {address}, not a pool address")
        if self.pool_address and address != self.pool_address:
            say(f"  note: {NAME} moved from {self.pool_address} to {address}")
        self.pool_address = address
        return address

    @property
    def gateway_pid(self) -> int:
        from netnslab import procs

        proc = self.lab.service_process("gw", "gateway")
        if proc is None or not procs.is_running(proc):
            raise RuntimeError("the gateway is not running; see its log: " + self.gateway_log())
        return int(proc.pid)

    def gateway_log(self) -> str:
        return str(self.lab.log_tail("gw", "gateway", 15))

    def metrics(self) -> dict[str, float]:
        done = self.lab.exec("gw", ["curl", "-sS", "--max-time", "5", METRICS_URL], timeout=15)
        if done.returncode != 0:
            raise RuntimeError(f"metrics scrape failed: {done.stderr.strip()}")
        samples = parse_metrics(done.stdout)
        return {name: read(samples) for name, read in COUNTERS.items()}


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, through every finally that cleans up.

    Only in this process: a child forked by pyroute2 (a socket in a namespace) that gets
    the signal just exits, never running this process's clean-up as its own.
    """
    owner = os.getpid()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
