"""The command line as a user runs it: serve on free ports, stop on SIGTERM, check-config,
hash-password."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HTTP_BODY, need_tool

SOCKS64 = [sys.executable, "-m", "translator.cli"]


def test_serve_logs_each_endpoint_relays_and_stops_on_sigterm(
    tmp_path: Path, http_servers: dict[str, int], dns_config: Path
) -> None:
    need_tool("curl")
    process = subprocess.Popen(
        [
            *SOCKS64,
            "serve",
            "--config",
            str(dns_config),
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        endpoints: list[str] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(endpoints) < 2:
            line = process.stderr.readline()
            found = re.search(r"listening on (\S+)", line)
            if found:
                endpoints.append(found.group(1))
        assert len(endpoints) == 2, endpoints
        assert endpoints[0].startswith("127.0.0.1:") and endpoints[1].startswith("[::1]:")
        assert not endpoints[0].endswith(":0")  # the port actually chosen is logged
        url = f"http://web6.test:{http_servers['v6']}/"
        done = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--noproxy",
                "",
                "-x",
                f"socks5h://{endpoints[0]}",
                url,
            ],
            capture_output=True,
            timeout=20,
        )
        assert done.stdout == HTTP_BODY, done.stderr
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=10)
        assert process.returncode == 0
        assert "stopping" in rest and "Traceback" not in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_log_level_after_the_command_as_the_readme_prints_it(dns_config: Path) -> None:
    # README: `./run serve --listen 127.0.0.1:0 --log-level DEBUG`
    command = [*SOCKS64, "serve", "--config", str(dns_config), "--listen", "127.0.0.1:0"]
    process = subprocess.Popen(
        [*command, "--log-level", "DEBUG"], stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        endpoint = None
        deadline = time.monotonic() + 15
        while endpoint is None and time.monotonic() < deadline:
            found = re.search(r"listening on (\S+)", process.stderr.readline())
            endpoint = found.group(1) if found else None
        assert endpoint is not None
        host, _, port = endpoint.rpartition(":")
        socket.create_connection((host, int(port)), timeout=5).close()  # leaves at once
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=10)
        assert process.returncode == 0
        assert re.search(r" DEBUG socks64\.session: .*closed by client during handshake", rest)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture
def dns_config(tmp_path: Path, dns: object) -> Path:
    path = tmp_path / "socks64.yaml"
    path.write_text(
        f"resolver: {{nameservers: ['{dns.address}'], hosts_file: null}}\n"  # type: ignore[attr-defined]
        "policy: {rules: [{action: allow, clients: [127.0.0.0/8, '::1/128']}]}\n"
    )
    return path


def test_check_config_points_at_the_key(tmp_path: Path) -> None:
    good = subprocess.run(
        [*SOCKS64, "check-config", "config/socks64.yaml"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert good.returncode == 0 and "OK" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("timeouts:\n  connect: fast\n")
    done = subprocess.run(
        [*SOCKS64, "check-config", str(bad)], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2
    assert "timeouts.connect" in done.stderr and "Traceback" not in done.stderr


def test_check_config_warns_about_a_policy_that_allows_nothing(tmp_path: Path) -> None:
    shut = tmp_path / "shut.yaml"
    shut.write_text("policy: {default: deny, rules: []}\n")
    done = subprocess.run(
        [*SOCKS64, "check-config", str(shut)], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0  # valid, and said to be useless
    assert "warning: policy: no rule allows anything" in done.stderr
    clean = subprocess.run(
        [*SOCKS64, "check-config", "config/socks64.yaml"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert "warning: policy" not in clean.stderr


def test_check_config_warns_about_half_a_transparent_front(tmp_path: Path) -> None:
    half = tmp_path / "half.yaml"
    half.write_text("transparent: {interfaces: [lan0]}\n")
    done = subprocess.run(
        [*SOCKS64, "check-config", str(half)], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0
    assert "warning: transparent.interfaces without transparent.dns_listen" in done.stderr


def test_hash_password_line_is_accepted_by_the_gateway(tmp_path: Path) -> None:
    done = subprocess.run(
        [*SOCKS64, "hash-password", "alice"],
        input="s3cret\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith("alice:scrypt$") and "s3cret" not in line
    users = tmp_path / "users"
    users.write_text(line + "\n")
    from translator.auth import Credentials

    assert Credentials.load(users).verify("alice", "s3cret")
    assert not Credentials.load(users).verify("alice", "wrong")


def test_check_config_warns_about_more_workers_than_cpus(tmp_path: Path) -> None:
    import os

    cpus = len(os.sched_getaffinity(0))
    config = tmp_path / "workers.yaml"
    config.write_text(f"workers: {cpus + 1}\n", encoding="utf-8")
    done = subprocess.run(
        [*SOCKS64, "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert f"workers: {cpus + 1} is more than the {cpus} CPU(s)" in done.stdout + done.stderr
