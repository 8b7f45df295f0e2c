"""Privilege drop, for real: each drop runs in a child process (it cannot be undone), which
then reports what it can and cannot do."""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from translator.service.privileges import (
    CAP_NET_ADMIN,
    CAP_NET_BIND_SERVICE,
    CAP_SETUID,
    PrivilegeError,
    drop_privileges,
)

REPO = Path(__file__).resolve().parents[3]
TIMEOUT = 30
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        message = "dropping privileges needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


# Drops privileges as argv asks, then reports ids, capabilities (read straight from /proc)
# and what the kernel allows: regaining root, IP_TRANSPARENT, binding a port < 1024.
CHILD = """
import errno, json, os, socket, sys
from translator.service.privileges import PrivilegeError, drop_privileges

args = json.loads(sys.argv[1])

def attempt(action):
    try:
        action()
    except PermissionError:
        return "EPERM"
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"

def transparent():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)

def bind_low():
    with socket.socket() as s:
        s.bind(("127.0.0.1", args["low_port"]))

if os.geteuid() == 0:  # supplementary groups, root's among them, that the drop must clear
    os.setgroups([0, 1])
if "start_as" in args:  # as if started by that user (setuid, not exec: the interpreter
    uid, gid = args["start_as"]  # may live where only root can read)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
try:
    description = drop_privileges(args["user"], args.get("group"), args.get("keep", ()))
except PrivilegeError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(0)
with open("/proc/self/status") as f:
    caps = dict(l.split(":\\t") for l in f if l.startswith("Cap"))
print(json.dumps({
    "description": description,
    "uids": os.getresuid(),
    "gids": os.getresgid(),
    "groups": os.getgroups(),
    "caps": {k: int(v, 16) for k, v in caps.items()},
    "setuid0": attempt(lambda: os.setuid(0)),
    "transparent": attempt(transparent),
    "bind_low": attempt(bind_low),
}))
"""


def run_child(**args: Any) -> dict[str, Any]:
    """CHILD with these arguments; its JSON report."""
    args.setdefault("low_port", free_low_port())
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    return report


def free_low_port() -> int:
    """A port below ip_unprivileged_port_start that is free (checked with our root)."""
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 1:
        pytest.skip("every port is unprivileged here (ip_unprivileged_port_start)")
    for port in range(start - 1, 0, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free privileged port on 127.0.0.1")


def test_drop_keeping_net_admin(root: None) -> None:
    report = run_child(user="nobody", keep=[CAP_NET_ADMIN])
    ids = NOBODY.pw_uid, NOBODY.pw_gid
    assert report["description"] == (
        f"running as nobody (uid {ids[0]}, gid {ids[1]}), keeping CAP_NET_ADMIN"
    )
    assert report["uids"] == [ids[0]] * 3
    assert report["gids"] == [ids[1]] * 3
    assert report["groups"] == []
    caps = report["caps"]
    assert caps["CapEff"] == caps["CapPrm"] == 1 << CAP_NET_ADMIN
    assert caps["CapInh"] == caps["CapAmb"] == 0
    assert report["setuid0"] == "EPERM"
    assert report["transparent"] == "ok"
    assert report["bind_low"] == "EPERM"


def test_drop_keeping_net_bind_service(root: None) -> None:
    report = run_child(user="nobody", keep=[CAP_NET_BIND_SERVICE])
    assert report["caps"]["CapEff"] == 1 << CAP_NET_BIND_SERVICE
    assert report["bind_low"] == "ok"
    assert report["transparent"] == "EPERM"
    assert report["setuid0"] == "EPERM"


def test_drop_everything(root: None) -> None:
    report = run_child(user=str(NOBODY.pw_uid))
    assert report["description"].endswith("no capabilities")
    assert report["uids"] == [NOBODY.pw_uid] * 3
    caps = report["caps"]
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapInh"] == caps["CapAmb"] == 0
    assert report["setuid0"] == "EPERM"
    assert report["transparent"] == "EPERM"
    assert report["groups"] == []


def test_drop_to_explicit_group(root: None) -> None:
    group = grp.getgrgid(1)  # daemon on Debian: any group other than nobody's own
    report = run_child(user="nobody", group=group.gr_name)
    assert report["gids"] == [group.gr_gid] * 3
    assert report["uids"] == [NOBODY.pw_uid] * 3
    report = run_child(user="nobody", group=str(group.gr_gid))
    assert report["gids"] == [group.gr_gid] * 3


def test_not_root(root: None) -> None:
    """Started as nobody: already the target is fine, switching elsewhere is an error."""
    start_as = [NOBODY.pw_uid, NOBODY.pw_gid]
    report = run_child(start_as=start_as, user="nobody")
    assert report["description"].startswith(f"running as nobody (uid {NOBODY.pw_uid}")
    assert report["uids"] == [NOBODY.pw_uid] * 3
    other = pwd.getpwuid(1).pw_name
    report = run_child(start_as=start_as, user=other)
    assert report == {"error": f"cannot switch to user {other}: not running as root"}


def test_refuses_root_target(root: None) -> None:
    report = run_child(user="root")
    assert "root" in report["error"]


def test_unknown_user_and_group() -> None:
    """Resolved before anything changes, so safe to call in-process (also without root)."""
    with pytest.raises(PrivilegeError, match="unknown user 'no-such-user-socks64'"):
        drop_privileges("no-such-user-socks64")
    with pytest.raises(PrivilegeError, match="unknown group 'no-such-group-socks64'"):
        drop_privileges("nobody", "no-such-group-socks64")
    with pytest.raises(PrivilegeError, match="CAP_SETUID"):
        drop_privileges("nobody", keep={CAP_SETUID})
