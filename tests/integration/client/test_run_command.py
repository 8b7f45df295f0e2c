"""``socks64 run``: unmodified programs (curl, Python's urllib) under proxychains4 reach an
IPv6-only server by a name only the gateway can resolve.

Everything is real and on loopback: a dnsmasq whose only record is ``v6only.test AAAA
::1``, an HTTP server on [::1] only, a gateway that resolves through that dnsmasq and may
reach only loopback destinations, and ``socks64 run`` as a child process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.conftest import HTTP_BODY, RunningGateway, gateways_on, need_tool
from tests.dnsserver import DnsServer, ipv6_loopback_available
from tests.integration.service.gateway_process import LOOPBACK, ROOT, allow_loopback, free_port
from translator.auth import hash_password
from translator.client.proxychains import RunError, render_config, resolve_gateway

SOCKS64_RUN = [sys.executable, "-m", "translator.cli", "run"]
NAME = "v6only.test"
#: every run must end well within this (a hang is a failure, not a slow test)
DEADLINE = 15.0

pytestmark = pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")


@pytest.fixture(scope="module")
def v6dns() -> Iterator[DnsServer]:
    need_tool("dnsmasq")
    with DnsServer(aaaa={NAME: "::1"}, ttl=60) as server:
        yield server


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(v6dns: DnsServer) -> AsyncIterator[StartGateway]:
    """``await start_gateway(**config overrides)``: a gateway resolving only through
    ``v6dns``, allowing loopback clients to loopback destinations only."""
    policy = {"default": "deny", "rules": [allow_loopback()]}
    async with gateways_on(v6dns, policy=policy) as start:
        yield start


@pytest.fixture
def tmpdir_for_run(tmp_path: Path) -> Path:
    """TMPDIR of ``socks64 run``: where its config file goes, and must be gone from."""
    path = tmp_path / "tmp"
    path.mkdir()
    return path


def leftovers(tmpdir: Path) -> list[str]:
    """What ``socks64 run`` left in its TMPDIR (nothing, once it has exited)."""
    return sorted(path.name for path in tmpdir.iterdir())


def run_env(tmpdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOCKS64_", "PROXYCHAINS"))}
    env.update(TMPDIR=str(tmpdir), **extra)
    return env


async def socks64_run(
    gateway: str, command: Sequence[str], env: Mapping[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """``socks64 run --gateway GATEWAY -- COMMAND``, off the event loop the gateway runs on."""
    argv = [*SOCKS64_RUN, "--gateway", gateway, "--", *command]
    return await asyncio.to_thread(
        subprocess.run, argv, cwd=ROOT, env=env, capture_output=True, timeout=DEADLINE
    )


async def access_line(caplog: pytest.LogCaptureFixture, pattern: str) -> str:
    """The gateway's access line containing ``pattern`` (written as the session ends)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "socks64.access" and pattern in record.getMessage():
                return record.getMessage()
        await asyncio.sleep(0.05)
    raise AssertionError(f"no access line with {pattern!r}: {caplog.text}")


# -- through the gateway ----------------------------------------------------------------


async def test_ipv4_only_curl_reaches_ipv6_only_server_by_name(
    start_gateway: StartGateway,
    v6dns: DnsServer,
    http_servers: dict[str, int],
    tmpdir_for_run: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    need_tool("curl")
    need_tool("proxychains4")
    caplog.set_level(logging.INFO, logger="socks64.access")
    gateway = await start_gateway()
    port = http_servers["v6"]
    # curl -4: no proxy option, and not even allowed to use IPv6 itself
    done = await socks64_run(
        gateway.url4, ["curl", "-4", "-sS", f"http://{NAME}:{port}/"], run_env(tmpdir_for_run)
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == HTTP_BODY
    # the name went to the gateway, which resolved it (AAAA only) and reached IPv6
    line = await access_line(caplog, f"CONNECT {NAME}:{port}")
    assert f"-> [::1]:{port} ipv4->ipv6" in line, line
    assert ("AAAA", NAME) in v6dns.queries()
    assert leftovers(tmpdir_for_run) == []


@pytest.mark.parametrize("family", ["v4", "v6"])
async def test_python_urllib_through_an_ipv4_or_ipv6_gateway_address(
    family: str,
    start_gateway: StartGateway,
    http_servers: dict[str, int],
    tmpdir_for_run: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    need_tool("proxychains4")
    caplog.set_level(logging.INFO, logger="socks64.access")
    gateway = await start_gateway()
    address = gateway.url4 if family == "v4" else gateway.url6  # [::1]:PORT: IPv6 literal
    url = f"http://{NAME}:{http_servers['v6']}/"
    program = (
        "import sys, urllib.request\n"
        f"sys.stdout.buffer.write(urllib.request.urlopen({url!r}, timeout=10).read())"
    )
    done = await socks64_run(address, [sys.executable, "-c", program], run_env(tmpdir_for_run))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == HTTP_BODY
    await access_line(caplog, f"CONNECT {NAME}:{http_servers['v6']} -> [::1]")


async def test_credentials_come_from_the_environment(
    start_gateway: StartGateway,
    http_servers: dict[str, int],
    tmpdir_for_run: Path,
    tmp_path: Path,
) -> None:
    need_tool("curl")
    need_tool("proxychains4")
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('s3cret', n=2**10)}\n")
    gateway = await start_gateway(auth={"methods": ["username"], "users_file": str(users)})
    curl = ["curl", "-sS", f"http://{NAME}:{http_servers['v6']}/"]
    good = run_env(tmpdir_for_run, SOCKS64_USER="alice", SOCKS64_PASSWORD="s3cret")
    done = await socks64_run(gateway.url4, curl, good)
    assert (done.returncode, done.stdout) == (0, HTTP_BODY), done.stderr.decode()
    bad = run_env(tmpdir_for_run, SOCKS64_USER="alice", SOCKS64_PASSWORD="wrong")
    done = await socks64_run(gateway.url4, curl, bad)
    assert done.returncode != 0 and done.stdout == b""
    assert leftovers(tmpdir_for_run) == []


@pytest.mark.parametrize("gateway_kind", ["policy-deny", "nothing-listening"])
async def test_a_refusing_gateway_fails_the_program_promptly(
    gateway_kind: str,
    start_gateway: StartGateway,
    http_servers: dict[str, int],
    tmpdir_for_run: Path,
) -> None:
    need_tool("curl")
    need_tool("proxychains4")
    if gateway_kind == "policy-deny":
        refuse = {"action": "deny", "clients": LOOPBACK, "comment": "test: refuse everything"}
        address = (await start_gateway(policy={"default": "deny", "rules": [refuse]})).url4
    else:
        address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = await socks64_run(
        address, ["curl", "-sS", f"http://{NAME}:{http_servers['v6']}/"], run_env(tmpdir_for_run)
    )
    assert done.returncode != 0 and done.stdout == b""
    assert time.monotonic() - started < 10
    assert leftovers(tmpdir_for_run) == []


# -- the wrapper itself -----------------------------------------------------------------


def run_sync(command: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [*SOCKS64_RUN, "--gateway", "127.0.0.1:1", "--", *command]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE)


@pytest.mark.parametrize(("script", "status"), [("exit 3", 3), ("kill -TERM $$", 143)])
def test_exit_status_is_passed_through(script: str, status: int, tmpdir_for_run: Path) -> None:
    need_tool("proxychains4")
    assert run_sync(["sh", "-c", script], run_env(tmpdir_for_run)).returncode == status
    assert leftovers(tmpdir_for_run) == []


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_are_forwarded_and_the_config_removed(
    signum: int, status: int, tmpdir_for_run: Path
) -> None:
    need_tool("proxychains4")
    argv = [*SOCKS64_RUN, "--gateway", "127.0.0.1:1", "--", "sh", "-c", "echo up; exec sleep 30"]
    child = subprocess.Popen(
        argv, cwd=ROOT, env=run_env(tmpdir_for_run), stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "up\n"
        assert len(leftovers(tmpdir_for_run)) == 1  # the config, while the command runs
        child.send_signal(signum)
        assert child.wait(5) == status
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert leftovers(tmpdir_for_run) == []


def test_config_is_private_and_the_password_stays_out_of_the_program(
    tmpdir_for_run: Path,
) -> None:
    need_tool("proxychains4")
    env = run_env(tmpdir_for_run, SOCKS64_USER="alice", SOCKS64_PASSWORD="s3cret")
    script = (
        'stat -c %a "$PROXYCHAINS_CONF_FILE"; cat "$PROXYCHAINS_CONF_FILE"; '
        'echo "pw=${SOCKS64_PASSWORD-unset}"'
    )
    done = run_sync(["sh", "-c", script], env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "600"
    assert "socks5 127.0.0.1 1 alice s3cret" in lines
    assert "proxy_dns" in lines and "localnet 127.0.0.0/255.0.0.0" in lines
    assert lines[-1] == "pw=unset"
    assert leftovers(tmpdir_for_run) == []


def test_missing_proxychains4_is_named_with_its_package(tmpdir_for_run: Path) -> None:
    empty = tmpdir_for_run.parent / "bin"
    empty.mkdir()
    done = run_sync(["true"], run_env(tmpdir_for_run, PATH=str(empty)))
    assert done.returncode == 127
    assert "proxychains4 is not installed" in done.stderr
    assert "apt-get install proxychains4" in done.stderr
    assert leftovers(tmpdir_for_run) == []


def test_unknown_command_and_no_command(tmpdir_for_run: Path) -> None:
    need_tool("proxychains4")
    done = run_sync(["no-such-command-socks64"], run_env(tmpdir_for_run))
    assert done.returncode == 127 and "no-such-command-socks64: command not found" in done.stderr
    done = run_sync([], run_env(tmpdir_for_run))
    assert done.returncode == 2 and "no command given" in done.stderr


# -- the config text --------------------------------------------------------------------


def test_render_config() -> None:
    text = render_config(("127.0.0.1", 1080))
    lines = text.splitlines()
    for line in (
        "strict_chain",
        "proxy_dns",
        "remote_dns_subnet 224",
        "tcp_read_time_out 15000",
        "tcp_connect_time_out 8000",
        "localnet 127.0.0.0/255.0.0.0",
        "localnet ::1/128",
        "quiet_mode",
    ):
        assert line in lines
    assert lines[-2:] == ["[ProxyList]", "socks5 127.0.0.1 1080"]
    verbose = render_config(("::1", 9), user="u", password="p", quiet=False)
    assert "quiet_mode" not in verbose
    assert verbose.splitlines()[-1] == "socks5 ::1 9 u p"


def test_gateway_names_are_resolved_to_a_literal() -> None:
    assert resolve_gateway(("localhost", 1080))[0] in ("127.0.0.1", "::1")
    assert resolve_gateway(("0:0::1", 1080)) == ("::1", 1080)
    with pytest.raises(RunError, match="zone"):
        resolve_gateway(("fe80::1%1", 1080))
    with pytest.raises(RunError, match="without spaces"):
        render_config(("127.0.0.1", 1), user="a b", password="c")
    with pytest.raises(RunError, match="go together"):
        render_config(("127.0.0.1", 1), user="a")
