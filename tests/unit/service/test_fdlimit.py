"""Descriptor limits: the capacity arithmetic, and raising the soft limit in a child started
with a low one (limits are per process; the test run's own stay untouched)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from translator.service.fdlimit import (
    FDS_PER_CLIENT,
    RESERVED_FDS,
    capacity_warning,
    clients_servable,
    raise_nofile_limit,
)

REPO = Path(__file__).resolve().parents[3]


def test_clients_servable() -> None:
    assert clients_servable(1024) == 480
    assert clients_servable(65536) == 32736
    assert clients_servable(RESERVED_FDS + FDS_PER_CLIENT) == 1
    assert clients_servable(RESERVED_FDS + 1) == 0
    assert clients_servable(10) == 0


def test_capacity_warning_when_limit_too_low() -> None:
    assert capacity_warning(4096, 1024) == (
        "limits.max_clients is 4096 but the descriptor limit (RLIMIT_NOFILE 1024) serves "
        "about 480 clients; raise LimitNOFILE / ulimit -n or lower limits.max_clients"
    )


def test_capacity_warning_boundary() -> None:
    # 480 clients need exactly 480 * 2 + 64 = 1024 descriptors
    assert capacity_warning(480, 1024) is None
    assert capacity_warning(481, 1024) is not None
    assert capacity_warning(4096, 65536) is None


def test_capacity_warning_uses_current_limit() -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fits = clients_servable(soft)
    assert capacity_warning(fits) is None
    warning = capacity_warning(fits + 1)
    assert warning is not None and f"RLIMIT_NOFILE {soft})" in warning


RAISE = """
import json, resource
from translator.service.fdlimit import raise_nofile_limit
before = resource.getrlimit(resource.RLIMIT_NOFILE)
after = raise_nofile_limit()
print(json.dumps({"before": before, "after": after,
                  "actual": resource.getrlimit(resource.RLIMIT_NOFILE)}))
"""


def test_raise_nofile_limit_in_child() -> None:
    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    result = subprocess.run(
        [sys.executable, "-c", RAISE],
        cwd=REPO,
        preexec_fn=lower_limit,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "before": [256, 4096],
        "after": [4096, 4096],
        "actual": [4096, 4096],
    }


def test_unlimited_hard_limit_is_capped_at_nr_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux refuses RLIM_INFINITY for RLIMIT_NOFILE, so this path is simulated."""
    limits = [(1024, resource.RLIM_INFINITY)]
    monkeypatch.setattr(resource, "getrlimit", lambda _which: limits[-1])
    monkeypatch.setattr(resource, "setrlimit", lambda _which, new: limits.append(new))
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    assert raise_nofile_limit() == (nr_open, resource.RLIM_INFINITY)


def test_limit_never_lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (8192, 8192))
    monkeypatch.setattr(resource, "setrlimit", lambda _which, new: calls.append(new))
    assert raise_nofile_limit() == (8192, 8192)
    assert calls == []
