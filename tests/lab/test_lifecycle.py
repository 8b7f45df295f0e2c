"""Building and removing labs: nothing of a run survives its teardown, whatever happened."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from netnslab import netlink
from netnslab.lab import Lab, LabError, teardown_state
from netnslab.procs import TrackedProcess, is_running
from netnslab.pytest_plugin import NodeHandle, require_lab
from netnslab.services import child_environment
from netnslab.state import STATE_ROOT, load_state
from netnslab.timing import poll_until
from netnslab.topology import parse_topology
from pyroute2 import netns

pytestmark = pytest.mark.lab

TINY = {
    "name": "tiny",
    "nodes": {
        "a": {"ipv6": False, "routes": [{"to": "default", "via": "192.0.2.1"}]},
        "b": {"services": [{"kind": "testserver", "http": ["192.0.2.1:8080"]}]},
    },
    "links": [{"a": ["192.0.2.10/24"], "b": ["192.0.2.1/24", "2001:db8:b::1/64"]}],
}


def _lab_namespaces() -> set[str]:
    return {name for name in netns.listnetns() if name.startswith("s64")}


def _assert_gone(namespaces: list[str], processes: list[TrackedProcess]) -> None:
    present = _lab_namespaces()
    assert not [ns for ns in namespaces if ns in present], "namespaces left behind"
    assert not [p for p in processes if is_running(p)], "processes left behind"


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netnslab.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_environment(),
        check=False,
    )


def test_teardown_removes_namespaces_veths_and_processes() -> None:
    require_lab()
    host_links_before = {p.name for p in Path("/sys/class/net").iterdir()}
    lab = Lab.up(parse_topology(TINY), teardown_at_exit=True)
    namespaces = list(lab.state.namespaces.values())
    processes = list(lab.state.processes)
    inodes = dict(lab.state.inodes)
    try:
        assert "hello from b" in lab.exec("a", ["curl", "-sS", "http://192.0.2.1:8080/"]).stdout
        kinds = {link.kind for link in netlink.list_links(lab.namespace("a"))}
        assert "veth" in kinds  # the veth end lives in the node, not in the host
        assert all(is_running(p) for p in processes)
    finally:
        report = lab.teardown()
    assert report.leftovers == []
    _assert_gone(namespaces, processes)
    assert not any(netlink.pids_in_namespace(inode) for inode in inodes.values())
    assert {p.name for p in Path("/sys/class/net").iterdir()} <= host_links_before
    assert not lab.directory.exists()


def test_failed_start_removes_what_was_built() -> None:
    require_lab()
    broken = yaml.safe_load(yaml.safe_dump(TINY))
    broken["nodes"]["b"]["services"].append(
        {"kind": "socks64", "listen": ["192.0.2.1:1080"], "command": ["false"]}
    )
    before = _lab_namespaces()
    with pytest.raises(LabError, match="exited during start-up"):
        Lab.up(parse_topology(broken))
    assert _lab_namespaces() <= before


def test_two_runs_do_not_collide() -> None:
    require_lab()
    first = Lab.up(parse_topology(TINY), teardown_at_exit=True)
    try:
        second = Lab.up(parse_topology(TINY), teardown_at_exit=True)
        try:
            assert first.run_id != second.run_id
            assert not set(first.state.namespaces.values()) & set(second.state.namespaces.values())
            for lab in (first, second):
                done = lab.exec("a", ["curl", "-sS", "http://192.0.2.1:8080/"])
                assert "hello from b" in done.stdout
        finally:
            assert second.teardown().leftovers == []
    finally:
        assert first.teardown().leftovers == []


def test_cli_up_status_exec_down(tmp_path: Path) -> None:
    require_lab()
    topology = tmp_path / "tiny.yaml"
    topology.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    up = _cli("up", str(topology))
    assert up.returncode == 0, up.stderr
    run_id = up.stdout.strip().splitlines()[-1].split()[1]
    state = load_state(STATE_ROOT / run_id / "state.json")
    try:
        status = _cli("status", run_id)
        assert status.returncode == 0, status.stderr
        assert "192.0.2.10/24" in status.stdout and "-> b:v-a" in status.stdout
        assert "testserver (testserver) pid" in status.stdout
        shown = _cli("exec", "--lab", run_id, "a", "--", "ip", "-br", "addr")
        assert "192.0.2.10/24" in shown.stdout
    finally:
        down = _cli("down", run_id)
    assert down.returncode == 0, down.stderr
    _assert_gone(list(state.namespaces.values()), state.processes)
    assert not (STATE_ROOT / run_id).exists()


def test_interrupted_up_leaves_nothing() -> None:
    require_lab()
    before = {p.name for p in STATE_ROOT.glob("*")} if STATE_ROOT.exists() else set()
    child = subprocess.Popen(
        [sys.executable, "-m", "netnslab.cli", "up", "default"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_environment(),
    )
    try:

        def building() -> Path | None:
            for path in STATE_ROOT.glob("*/state.json"):
                if path.parent.name not in before:
                    data = json.loads(path.read_text(encoding="utf-8"))
                    if data.get("inodes"):
                        return path
            return None

        assert poll_until(lambda: building() is not None, timeout=20), "lab up never started"
        path = building()
        assert path is not None
        namespaces = list(json.loads(path.read_text(encoding="utf-8"))["namespaces"].values())
        child.send_signal(signal.SIGINT)
        _out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    try:
        assert child.returncode == 130, err
        assert "interrupted" in err
        assert poll_until(lambda: not (_lab_namespaces() & set(namespaces)), timeout=5)
        assert not path.parent.exists()
    finally:
        for leftover in STATE_ROOT.glob("*/state.json"):  # never leak a lab, even on failure
            if leftover.parent.name not in before:
                teardown_state(load_state(leftover))


def test_node_fixtures_reach_each_other_only_through_their_segment(
    c4: NodeHandle, gw: NodeHandle, s4: NodeHandle, dns_node: NodeHandle
) -> None:
    assert "hello from s4" in gw.curl(f"http://{s4.address(4)}:8080/")
    assert "Timeout" in c4.curl_fails(f"http://{s4.address(4)}:8080/", timeout=1.0)
    assert dns_node.address(6) == "2001:db8:53::53"
