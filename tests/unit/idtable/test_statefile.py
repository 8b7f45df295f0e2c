"""The ADDRESS ID table's state file: atomic private writes, round trips, clear refusals.

A missing file is a first start (None); anything else that cannot be used raises
StateFileError naming the file, so the gateway can say which file it ignored.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from addrmap import AddressTable, Owner, SavedEntry, TableSnapshot
from addrmap.snapshot import restore, snapshot
from tests.unit.fakes import FakeClock
from translator.idtable import statefile
from translator.idtable.statefile import StateFileError

SAVED_AT = 1_733_100_000.25
SNAPSHOT = TableSnapshot(
    (
        SavedEntry(0x12AB34, "192.0.2.10", None, "ipv4", "198.51.100.7", 12.5, False),
        SavedEntry(0x000101, "192.0.2.10", "alice", "ipv6", "2001:db8::7", 0.0, True),
        SavedEntry(0xFFFFFF, "2001:db8::20", "bob", "ipv6", "2001:db8::7%eth0", 599.0625, False),
        SavedEntry(0x7F0000, "2001:db8::20", None, "name", "www.example.test", -0.0001, False),
    ),
    ((0x345678, 3599.5), (1, 0.125)),
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip_through_a_new_directory(tmp_path: Path) -> None:
    path = tmp_path / "lib" / "socks64" / "idtable.state"
    statefile.save(path, SNAPSHOT, saved_at=SAVED_AT)
    assert statefile.load(path) == (SNAPSHOT, SAVED_AT)
    assert statefile.load(str(path)) == (SNAPSHOT, SAVED_AT)
    document = json.loads(path.read_text())
    assert (document["format"], document["version"]) == ("socks64-idtable-state", 1)
    assert len(path.read_text().splitlines()) > len(SNAPSHOT.entries)  # a line each


def test_an_empty_snapshot_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "idtable.state"
    statefile.save(path, TableSnapshot((), ()), saved_at=SAVED_AT)
    assert statefile.load(path) == (TableSnapshot((), ()), SAVED_AT)


def test_a_table_round_trips_through_the_file(tmp_path: Path) -> None:
    clock = FakeClock()
    table = AddressTable(clock=clock, ttl=600.0, secret=b"statefile-test")
    alice = Owner("192.0.2.10", "alice")
    realid = table.associate(alice, "www.example.test")
    path = tmp_path / "idtable.state"
    statefile.save(path, snapshot(table), saved_at=SAVED_AT)
    loaded = statefile.load(path)
    assert loaded is not None
    snap, saved_at = loaded
    fresh = AddressTable(clock=FakeClock(now=5.0), ttl=600.0)
    assert restore(fresh, snap, statefile.elapsed_since(saved_at, SAVED_AT + 30)) == 1
    assert fresh.lookup(alice, realid) == "www.example.test"


def test_the_write_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "idtable.state"
    path.write_text("old contents")
    path.chmod(0o644)
    statefile.save(path, SNAPSHOT, saved_at=SAVED_AT)
    assert [p.name for p in tmp_path.iterdir()] == ["idtable.state"]  # no temp file left
    assert mode_of(path) == 0o600  # a new file replaced the old one, not rewritten it
    assert statefile.load(path) == (SNAPSHOT, SAVED_AT)


def test_a_failed_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "idtable.state"
    statefile.save(path, SNAPSHOT, saved_at=SAVED_AT)
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        statefile.save(path, TableSnapshot((), ()), saved_at=SAVED_AT + 1)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["idtable.state"]


def test_a_missing_file_is_a_first_start(tmp_path: Path) -> None:
    assert statefile.load(tmp_path / "absent") is None
    assert statefile.load(tmp_path / "no" / "such" / "dir" / "idtable.state") is None


def load_error(path: Path) -> StateFileError:
    with pytest.raises(StateFileError) as caught:
        statefile.load(path)
    assert str(path) in str(caught.value)  # the message names the file
    assert caught.value.path == str(path)
    return caught.value


def valid_document() -> dict[str, object]:
    return json.loads(statefile.encode(SNAPSHOT, saved_at=SAVED_AT))  # type: ignore[no-any-return]


def test_corrupt_json_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "idtable.state"
    path.write_text('{"format": "socks64-idtable-state", "vers')
    assert "not a valid state file" in str(load_error(path))
    assert path.exists()  # left for the operator to look at; the next save replaces it


def test_bytes_that_are_not_utf8_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "idtable.state"
    path.write_bytes(b"\xff\xfe{}")
    load_error(path)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_another_version_is_an_error(tmp_path: Path, version: object) -> None:
    path = tmp_path / "idtable.state"
    document = valid_document()
    document["version"] = version
    path.write_text(json.dumps(document))
    assert "version" in str(load_error(path))


def test_another_format_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "idtable.state"
    path.write_text(json.dumps({"format": "socks64-transparent-state", "version": 1}))
    load_error(path)
    path.write_text("[]")
    load_error(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("saved_at", None),
        ("saved_at", "yesterday"),
        ("entries", {}),
        ("entries", [[1, "192.0.2.10", None, "ipv4", "198.51.100.7", 1.0]]),  # 6 fields
        ("entries", [[1, "192.0.2.10", None, "url", "198.51.100.7", 1.0, False]]),
        ("entries", [[1, "192.0.2.10", None, "ipv4", "www.example.test", 1.0, False]]),
        ("entries", [[1, 192, None, "ipv4", "198.51.100.7", 1.0, False]]),
        ("entries", [[1, "192.0.2.10", None, "ipv4", "198.51.100.7", "1", False]]),
        ("entries", [[1, "192.0.2.10", None, "ipv4", "198.51.100.7", 1.0, 1]]),
        ("entries", [[0, "192.0.2.10", None, "ipv4", "198.51.100.7", 1.0, False]]),
        ("entries", [[1.5, "192.0.2.10", None, "ipv4", "198.51.100.7", 1.0, False]]),
        ("quarantine", [[1, 10.0], [1, 20.0]]),  # the same REALID twice
        ("quarantine", [[1 << 24, 10.0]]),
        ("quarantine", [[5, None]]),
        ("quarantine", [[5, 10**400]]),
        ("quarantine", "none"),
    ],
)
def test_malformed_content_is_an_error(tmp_path: Path, key: str, value: object) -> None:
    path = tmp_path / "idtable.state"
    document = valid_document()
    document[key] = value
    path.write_text(json.dumps(document))
    load_error(path)


def test_nan_written_by_hand_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "idtable.state"
    text = statefile.encode(SNAPSHOT, saved_at=SAVED_AT).replace("12.5", "NaN")
    path.write_text(text)
    load_error(path)


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "idtable.state"
    path.mkdir()  # reading a directory fails whoever runs the test, root included
    assert "cannot read" in str(load_error(path))


def test_elapsed_since_never_goes_negative() -> None:
    assert statefile.elapsed_since(100.0, 130.5) == 30.5
    assert statefile.elapsed_since(100.0, 90.0) == 0.0  # the wall clock was set back
    assert statefile.elapsed_since(0.0) > 0
