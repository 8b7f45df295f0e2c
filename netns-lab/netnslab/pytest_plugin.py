"""pytest fixtures for the lab: a session-wide default lab, the chain lab, and node handles.

Use from a conftest with ``from netnslab.pytest_plugin import *``. A test that needs a lab
and cannot have one (not root, no ``ip netns``, no dnsmasq...) *fails* under ``CI=true``,
saying why, and is skipped elsewhere with the same message.

    def test_curl(c4, proxy_url):
        assert "hello from s6" in c4.curl("http://v6.lab.test:8080/", proxy=proxy_url(c4))
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pytest

from netnslab import driver
from netnslab.lab import Lab
from netnslab.scenarios import run_scenario
from netnslab.timing import poll_until

REQUIRED_PROGRAMS = ("ip", "dnsmasq", "curl", "ncat", "ss")

__all__ = [
    "NodeHandle",
    "c4",
    "c6",
    "chain_lab",
    "dns_node",
    "gw",
    "lab",
    "lab_problem",
    "proxy_url",
    "require_lab",
    "run_lab_scenario",
    "s4",
    "s6",
    "transparent_lab",
    "wait_for_interception",
]

INTERCEPTING = "intercepting TCP and UDP to"


def wait_for_interception(lab: Lab, node: str = "gw", seen: int = 0) -> None:
    """Wait until the gateway in ``node`` has logged its interception more than ``seen``
    times. The lab's readiness probe is a TCP connect, which the kernel accepts as soon as
    the SOCKS listener exists, before the transparent front has installed its rules."""

    def count() -> int:
        proc = lab.service_process(node, "gateway")
        if proc is None or not os.path.exists(proc.log):
            return 0
        with open(proc.log, encoding="utf-8", errors="replace") as handle:
            return handle.read().count(INTERCEPTING)

    if not poll_until(lambda: count() > seen, timeout=10, interval=0.1):
        pytest.fail(f"{node}/gateway never intercepted:\n{lab.log_tail(node, 'gateway')}")


def lab_problem() -> str | None:
    """Why a lab cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, veths, sysctls)"
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"the lab needs {', '.join(missing)} on PATH (apt-get install dnsmasq-base ncat)"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "the lab needs pyroute2"
    return None


def require_lab() -> None:
    """Fail (under CI=true) or skip (elsewhere) the current test if no lab can be built."""
    problem = lab_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"lab test cannot run under CI: {problem}", pytrace=False)
    pytest.skip(problem)


@dataclass(frozen=True)
class NodeHandle:
    """One node of a running lab, with the things tests do in it."""

    lab: Lab
    name: str

    def address(self, version: int) -> str:
        """The node's first address of IP ``version``."""
        return self.lab.address(self.name, version)

    def exec(self, *argv: str, timeout: float = 30.0) -> Any:
        """Run a command in the node; returns the CompletedProcess (text output)."""
        return self.lab.exec(self.name, list(argv), timeout=timeout)

    def curl(self, url: str, proxy: str | None = None, timeout: float = 10.0) -> str:
        """curl ``url`` (optionally through a proxy URL); fails the test if curl fails."""
        return driver.curl(self.lab, self.name, url, proxy=proxy, timeout=timeout)

    def curl_fails(self, url: str, timeout: float = 2.0) -> str:
        """curl ``url`` directly and require failure; returns curl's message."""
        return driver.curl_fails(self.lab, self.name, url, timeout=timeout)

    def probe(self, action: str, *args: str, timeout: float = 20.0) -> dict[str, Any]:
        """Run a `netnslab.probe` action in the node; returns its final JSON object."""
        return driver.run_probe(self.lab, self.name, action, *args, timeout=timeout)


def _terminate_as_interrupt() -> None:
    # A SIGTERM'd test run must still remove its labs: make TERM behave like Ctrl-C, which
    # pytest answers by running fixture teardown. Forked pyroute2 helpers inherit the
    # handler, so it only raises in this process.
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    owner = os.getpid()

    def handler(signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The default topology, built once per session and removed at its end."""
    require_lab()
    _terminate_as_interrupt()
    built = Lab.up("default", tolerate_service_failures=True, teardown_at_exit=True)
    try:
        yield built
    finally:
        report = built.teardown()
        assert not report.leftovers, f"lab teardown left {report.leftovers}"


@pytest.fixture(scope="session")
def chain_lab() -> Iterator[Lab]:
    """The chain topology (two gateways), built once per session on first use."""
    require_lab()
    _terminate_as_interrupt()
    built = Lab.up("chain", tolerate_service_failures=True, teardown_at_exit=True)
    try:
        yield built
    finally:
        report = built.teardown()
        assert not report.leftovers, f"lab teardown left {report.leftovers}"


@pytest.fixture(scope="session")
def transparent_lab() -> Iterator[Lab]:
    """The transparent topology (DNS46 and TPROXY on the gateway), built on first use."""
    require_lab()
    if shutil.which("nft") is None and not os.path.exists("/usr/sbin/nft"):
        message = "the transparent lab needs nft (apt-get install nftables)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"lab test cannot run under CI: {message}", pytrace=False)
        pytest.skip(message)
    _terminate_as_interrupt()
    built = Lab.up("transparent", teardown_at_exit=True)
    try:
        wait_for_interception(built)
        yield built
    finally:
        report = built.teardown()
        assert not report.leftovers, f"lab teardown left {report.leftovers}"


def _node(name: str) -> Callable[[Lab], NodeHandle]:
    def fixture(lab: Lab) -> NodeHandle:
        return NodeHandle(lab, name)

    fixture.__name__ = name
    fixture.__doc__ = f"Node {name} of the default lab."
    return fixture


c4 = pytest.fixture(_node("c4"))
c6 = pytest.fixture(_node("c6"))
gw = pytest.fixture(_node("gw"))
s4 = pytest.fixture(_node("s4"))
s6 = pytest.fixture(_node("s6"))
# Not "dns": tests/conftest.py already has a fixture of that name (a loopback dnsmasq).
dns_node = pytest.fixture(_node("dns"), name="dns_node")


@pytest.fixture
def proxy_url() -> Callable[[NodeHandle], str]:
    """``proxy_url(node)``: the socks5h:// URL of the gateway that node reaches directly."""

    def url(node: NodeHandle) -> str:
        endpoint = driver.gateway_endpoint(node.lab, node.name)
        return f"socks5h://{endpoint}"

    return url


def run_lab_scenario(lab: Lab, name: str) -> str:
    """Run a registered scenario; fail the test with its detail if it does not pass."""
    outcome = run_scenario(lab, name)
    if not outcome.passed:
        pytest.fail(f"scenario {name}: {outcome.detail}", pytrace=False)
    return outcome.detail
