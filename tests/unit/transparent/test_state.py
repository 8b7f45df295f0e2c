"""The pool's state file: atomic writes, round trips, unreadable files set aside."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from addrmap import Binding, PoolSnapshot
from translator.transparent import state

POOL = IPv4Network("198.18.0.0/15")
SNAPSHOT = PoolSnapshot(
    (Binding(IPv4Address("198.18.0.1"), "v6only.example"),),
    ((IPv4Address("198.18.0.2"), 120.0),),
)


def test_round_trip_through_a_new_directory(tmp_path: Path) -> None:
    path = tmp_path / "lib" / "socks64" / "transparent.state"
    state.save(str(path), SNAPSHOT, POOL)
    assert state.load(str(path)) == SNAPSHOT
    document = json.loads(path.read_text())
    assert document["pool"] == "198.18.0.0/15"
    assert [p.name for p in path.parent.iterdir()] == ["transparent.state"]  # no temp left


def test_a_missing_file_is_a_first_start(tmp_path: Path) -> None:
    assert state.load(str(tmp_path / "absent")) is None


def test_an_unreadable_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "transparent.state"
    path.write_text("{half a document")
    assert state.load(str(path)) is None
    assert not path.exists()
    assert (tmp_path / "transparent.state.corrupt").read_text() == "{half a document"


def test_a_file_of_another_format_or_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "transparent.state"
    path.write_text(json.dumps({"format": "socks64-transparent-state", "version": 99}))
    assert state.load(str(path)) is None
    path.write_text(json.dumps({"bindings": []}))
    assert state.load(str(path)) is None


def test_saving_replaces_the_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "transparent.state"
    state.save(str(path), SNAPSHOT, POOL)
    empty = PoolSnapshot((), ())
    state.save(str(path), empty, POOL)
    assert state.load(str(path)) == empty
