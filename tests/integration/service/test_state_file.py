"""addrmap.state_file: a restart keeps every live ADDRESS ID (one process, and workers)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer
from translator.wire import AddressId, Rep

from .gateway_process import (
    GatewayProcess,
    Spawn,
    echo_handler,
    echo_round_trip,
    free_port,
    gateway_config,
    serve,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    write_config,
)
from .test_unprivileged import _need_root_and_nobody as need_root_and_nobody
from .test_workers import LOOPBACK, associate, connected_by_id, serve_workers


def _start(spawn: Spawn, config: Path, workers: int) -> GatewayProcess:
    return serve_workers(spawn, config, workers) if workers > 1 else serve(spawn, config)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_id_survives_a_restart(
    tmp_path: Path, dns: DnsServer, spawn: Spawn, workers: int
) -> None:
    port = free_port()
    state = tmp_path / "state" / "addrmap.state"
    config = write_config(
        tmp_path / "socks64.yaml",
        gateway_config(
            dns.address,
            [f"127.0.0.1:{port}"],
            workers=workers,
            addrmap={"state_file": str(state)},
        ),
    )
    gateway = ("127.0.0.1", port)
    with tcp_server(echo_handler) as echo:
        first = _start(spawn, config, workers)
        reply = associate(gateway, LOOPBACK)
        assert reply.rep == Rep.SUCCEEDED and isinstance(reply.address, AddressId)
        realid = reply.address.realid
        assert first.stop() == 0
        saved = json.loads(state.read_text())
        assert [e[0] for e in saved["entries"]] == [realid]
        assert state.stat().st_mode & 0o777 == 0o600

        second = _start(spawn, config, workers)
        second.wait_for(r"ID table: 1 live IDs and 0 quarantined restored from ")
        with connected_by_id(gateway, realid, echo.port) as relayed:
            echo_round_trip(relayed, b"after a restart")
        assert associate(gateway, LOOPBACK).address == AddressId(realid)  # the same ID
        assert second.stop() == 0
    first.assert_clean()
    second.assert_clean()


def test_a_corrupt_state_file_is_logged_and_the_gateway_starts_empty(
    tmp_path: Path, dns: DnsServer, spawn: Spawn
) -> None:
    port = free_port()
    state = tmp_path / "addrmap.state"
    state.write_text("{not json")
    config = write_config(
        tmp_path / "socks64.yaml",
        gateway_config(dns.address, [f"127.0.0.1:{port}"], addrmap={"state_file": str(state)}),
    )
    child = serve(spawn, config)
    child.wait_for(rf"ERROR socks64\.idtable: .*{state.name}.*starting with an empty ID table")
    assert associate(("127.0.0.1", port), LOOPBACK).rep == Rep.SUCCEEDED
    assert child.stop() == 0
    assert json.loads(state.read_text())["entries"]  # replaced by a good one at stop


def test_a_gateway_that_drops_to_a_user_keeps_its_state_file(
    tmp_path: Path, dns: DnsServer, spawn: Spawn, request: pytest.FixtureRequest
) -> None:
    nobody = need_root_and_nobody()
    # Where nobody can reach it (pytest's own directories are root's, mode 0700).
    base = Path(tempfile.mkdtemp(prefix="socks64-state-"))
    base.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    state = base / "socks64" / "addrmap.state"  # a directory named socks64, not there yet
    port = free_port()
    config = write_config(
        tmp_path / "socks64.yaml",
        gateway_config(
            dns.address,
            [f"127.0.0.1:{port}"],
            user="nobody",
            addrmap={"state_file": str(state)},
        ),
    )
    config.chmod(0o644)
    child = serve(spawn, config)
    child.wait_for(rf"state directory {state.parent} handed to uid {nobody.pw_uid}")
    assert associate(("127.0.0.1", port), LOOPBACK).rep == Rep.SUCCEEDED
    assert child.stop() == 0
    assert state.stat().st_uid == nobody.pw_uid  # written by the gateway as nobody
    assert len(json.loads(state.read_text())["entries"]) == 1
    child.assert_clean()
