"""check-config knows the host: a pool that overlaps a local network is flagged before
the gateway refuses to start on it (run in a namespace of the test's own)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("needs root for a network namespace", pytrace=False)
        pytest.skip("needs root for a network namespace")
    name = f"s64cc-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        subprocess.run(
            ["ip", "-n", name, "addr", "add", "198.18.7.1/24", "dev", "lo"], check=True, timeout=10
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def test_a_pool_overlapping_a_local_network_is_flagged(namespace: str, tmp_path: Path) -> None:
    config = tmp_path / "socks64.yaml"
    config.write_text("transparent: {dns_listen: ['127.0.0.1:5353'], interfaces: [lo]}\n")
    argv = [sys.executable, "-m", "translator.cli", "check-config", str(config)]
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "transparent.pool 198.18.0.0/15 overlaps local network(s) 198.18.7.0/24" in done.stderr
    assert "refuse to start" in done.stderr
