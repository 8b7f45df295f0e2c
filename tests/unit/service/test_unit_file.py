"""The shipped systemd unit: the settings the gateway depends on, and systemd's own parser
(systemd-analyze verify) accepting every line of it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
UNIT = REPO / "config" / "socks64.service"
EXEC_START = "/usr/local/bin/socks64 serve --config /etc/socks64/socks64.yaml"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, in order (systemd keys may repeat, so no configparser)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number} is not KEY=VALUE in a section"
        assert not value.endswith("\\"), f"line {number}: continuation lines are not expected"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    assert key in service, f"{key}= missing"
    assert len(service[key]) == 1, f"{key}= set more than once"
    return service[key][0]


def test_sections() -> None:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_notify_and_reload(service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "ExecStart") == EXEC_START
    assert one(service, "ExecReload").split() == ["/bin/kill", "-HUP", "$MAINPID"]
    assert one(service, "Restart") == "on-failure"


def test_no_user_line(service: dict[str, list[str]]) -> None:
    """The gateway drops to the config's user: itself; User= would start it unprivileged."""
    assert "User" not in service and "Group" not in service


def test_address_families(service: dict[str, list[str]]) -> None:
    families = one(service, "RestrictAddressFamilies").split()
    assert len(families) == len(set(families))
    assert set(families) == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


def test_hardening(service: dict[str, list[str]]) -> None:
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
    ):
        assert one(service, key) == "yes", key
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "SystemCallArchitectures") == "native"
    assert "MemoryDenyWriteExecute" not in service


def test_capabilities(service: dict[str, list[str]]) -> None:
    assert set(one(service, "CapabilityBoundingSet").split()) == {
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SETUID",
        "CAP_SETGID",
    }


def test_limits(service: dict[str, list[str]]) -> None:
    assert int(one(service, "LimitNOFILE")) >= 65536
    stop = one(service, "TimeoutStopSec")
    assert stop.isdigit() and int(stop) > 5, "must exceed the default shutdown_grace (5 s)"


def test_systemd_analyze_verify() -> None:
    """systemd's parser reports unknown keys and bad values on stderr but still exits 0,
    so both the exit code and the absence of any complaint about the unit are checked.
    ExecStart must name an existing executable for verify: the interpreter stands in."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text()
    assert EXEC_START in text
    stand_in = f"{sys.executable} -m translator.cli serve --config /etc/socks64/socks64.yaml"
    with tempfile.TemporaryDirectory() as directory:
        copy = Path(directory) / "socks64.service"
        copy.write_text(text.replace(EXEC_START, stand_in))
        result = subprocess.run(
            [analyze, "verify", "--man=no", "--generators=no", str(copy)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    complaints = [line for line in result.stderr.splitlines() if "socks64" in line]
    assert result.returncode == 0, result.stderr
    assert complaints == [], result.stderr
