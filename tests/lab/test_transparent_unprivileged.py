"""The transparent front with the gateway started as root and ``user: nobody``.

After the drop the gateway still opens reply sockets on pool addresses (IP_TRANSPARENT,
CAP_NET_ADMIN kept), writes its state file (its ``socks64`` directory handed to nobody),
and at stop ``nft`` (CAP_NET_ADMIN passed on as an ambient capability) removes the table.
"""

from __future__ import annotations

import copy
import os
import pwd
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from netnslab.lab import Lab
from netnslab.pytest_plugin import _terminate_as_interrupt, require_lab, wait_for_interception
from netnslab.timing import poll_until
from netnslab.topology import load_topology, parse_topology

pytestmark = pytest.mark.lab

BROKEN = re.compile(r"Traceback|ImportError|ModuleNotFoundError|PermissionError|cannot save")
UDP_CLIENT = """
import socket
address = socket.getaddrinfo("v6only.lab.test", 7007, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(5)
sock.sendto(b"as nobody", (address, 7007))
data, source = sock.recvfrom(4096)
print(source[0] == address, data.endswith(b"as nobody"))
"""


@pytest.fixture(scope="module")
def nobody_transparent() -> Iterator[tuple[Lab, Path]]:
    require_lab()
    if shutil.which("nft") is None and not os.path.exists("/usr/sbin/nft"):
        pytest.fail("the transparent lab needs nft", pytrace=False)
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.fail("there is no user nobody on this machine", pytrace=False)
    _terminate_as_interrupt()
    base = Path(tempfile.mkdtemp(prefix="socks64-transparent-"))
    base.chmod(0o755)  # nobody must reach base/socks64
    state_file = base / "socks64" / "transparent.state"
    document = copy.deepcopy(load_topology("transparent").document)
    for service in document["nodes"]["gw"]["services"]:
        if service["kind"] == "socks64":
            config = service.setdefault("config", {})
            config["user"] = "nobody"
            config["transparent"]["state_file"] = str(state_file)
    lab = Lab.up(parse_topology(document, default_name="transparent"), teardown_at_exit=True)
    try:
        wait_for_interception(lab)
        yield lab, state_file
    finally:
        report = lab.teardown()
        shutil.rmtree(base, ignore_errors=True)
        assert not report.leftovers, f"lab teardown left {report.leftovers}"


def test_the_transparent_path_works_as_nobody(nobody_transparent: tuple[Lab, Path]) -> None:
    lab, state_file = nobody_transparent
    # The drop comes after the interception the fixture waited for: its line may lag.
    assert poll_until(
        lambda: "running as nobody" in lab.log_tail("gw", "gateway", 200), timeout=10, interval=0.1
    )
    log = lab.log_tail("gw", "gateway", 200)
    assert "running as nobody" in log and "passing CAP_NET_ADMIN to nft" in log, log
    done = lab.exec("c4", ["curl", "-sS", "--max-time", "10", "http://v6only.lab.test:8080/"])
    assert done.returncode == 0 and "hello from s6" in done.stdout, done.stderr
    done = lab.exec("c4", [sys.executable, "-c", UDP_CLIENT])
    assert done.stdout.split() == ["True", "True"], (done.stdout, done.stderr)
    nobody = pwd.getpwnam("nobody").pw_uid
    for _ in range(30):  # written within a second or two of the binding
        if state_file.exists() and "v6only.lab.test" in state_file.read_text():
            break
        lab.exec("gw", ["sleep", "0.1"])
    assert state_file.stat().st_uid == nobody


def test_nobody_removes_the_interception_at_stop(nobody_transparent: tuple[Lab, Path]) -> None:
    lab, _ = nobody_transparent
    lab.stop_service("gw", "gateway")
    assert lab.exec("gw", ["nft", "list", "table", "inet", "socks64"]).returncode != 0
    rules = lab.exec("gw", ["ip", "rule"]).stdout
    assert "fwmark 0x5364" not in rules and "198.18.0.0/15" not in rules
    assert lab.exec("gw", ["ip", "route", "show", "table", "164"]).stdout.strip() == ""
    log = lab.log_tail("gw", "gateway", 100_000)
    assert not BROKEN.search(log), log
