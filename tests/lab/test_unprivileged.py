"""The lab's UDP and multicast scenarios with the gateway started as root and ``user: nobody``.

A lab of its own: the default topology, unchanged but for ``user: nobody`` in the gateway's
config. The gateway must run as nobody (with CAP_NET_ADMIN and CAP_NET_BIND_SERVICE only)
and still relay datagrams across families and join multicast groups for its clients.
"""

from __future__ import annotations

import copy
import os
import pwd
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netnslab.lab import Lab
from netnslab.pytest_plugin import _terminate_as_interrupt, require_lab, run_lab_scenario
from netnslab.scenarios import SCENARIOS
from netnslab.topology import load_topology, parse_topology

from translator.service.privileges import CAP_NET_ADMIN, CAP_NET_BIND_SERVICE

pytestmark = pytest.mark.lab

KEPT = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_BIND_SERVICE)
# UDP both ways across families (by name and by ADDRESS ID) and multicast both ways.
UDP_AND_MULTICAST = [
    "udp-v4-to-v6-name",
    "udp-v6-to-v4",
    "mcast-v6-group-to-v4-client",
    "mcast-v4-group-to-v6-client",
]
BROKEN = re.compile(r"Traceback|ImportError|ModuleNotFoundError|PermissionError")


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("there is no user nobody on this machine", pytrace=False)
        pytest.skip("there is no user nobody on this machine")


def _lab_namespaces(run_id: str) -> list[str]:
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    )
    return [line.split()[0] for line in listed.stdout.splitlines() if run_id in line]


@pytest.fixture(scope="module")
def nobody_lab() -> Iterator[Lab]:
    """The default topology with ``user: nobody`` in the gateway's config."""
    require_lab()
    _nobody()
    _terminate_as_interrupt()
    document = copy.deepcopy(load_topology("default").document)
    for service in document["nodes"]["gw"]["services"]:
        if service["kind"] == "socks64":
            service.setdefault("config", {})["user"] = "nobody"
    built = Lab.up(
        parse_topology(document, default_name="default"),
        tolerate_service_failures=True,
        teardown_at_exit=True,
    )
    try:
        yield built
    finally:
        report = built.teardown()
        assert not report.leftovers, f"lab teardown left {report.leftovers}"
        assert _lab_namespaces(built.run_id) == []


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _check_gateway_is_nobody(lab: Lab) -> None:
    assert "gw/gateway" not in lab.service_failures, lab.service_failures
    tracked = lab.service_process("gw", "gateway")
    assert tracked is not None
    nobody = _nobody()
    # `ip netns exec` execs the gateway in place: the tracked pid is the gateway's.
    status = _status(tracked.pid)
    assert "translator.cli" in Path(f"/proc/{tracked.pid}/cmdline").read_text()
    assert status["Uid"].split() == [str(nobody.pw_uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(nobody.pw_gid)] * 4, status["Gid"]
    assert status["Groups"] == ""
    assert int(status["CapEff"], 16) == KEPT, status["CapEff"]


def test_gateway_runs_as_nobody(nobody_lab: Lab) -> None:
    _check_gateway_is_nobody(nobody_lab)
    assert "running as nobody" in nobody_lab.log_tail("gw", "gateway", 200)


@pytest.mark.parametrize("name", UDP_AND_MULTICAST)
def test_udp_and_multicast_as_nobody(nobody_lab: Lab, name: str) -> None:
    assert SCENARIOS[name].topology == "default"
    run_lab_scenario(nobody_lab, name)


def test_gateway_log_shows_nothing_broken(nobody_lab: Lab) -> None:
    """Last: still nobody after the scenarios, and no failed import or traceback."""
    _check_gateway_is_nobody(nobody_lab)
    log = nobody_lab.log_tail("gw", "gateway", 100_000)
    assert not BROKEN.search(log), log
