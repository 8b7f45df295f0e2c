"""The ADDRESS ID table's state file (memory backend, ``addrmap.state_file``).

Clients keep ADDRESS IDs across a gateway restart: an ID they were given must still
name the same target afterwards, and a quarantined REALID must not go to another target
(wire profile section 4). The gateway saves a :class:`~addrmap.TableSnapshot` on the
way down (and now and then, against a crash) and loads it on start.

The file is JSON, written whole to a temporary file beside it, fsynced and renamed over
the old one, then the directory is fsynced: a crash leaves the old file or the new,
never half of one. It is mode 0600: REALIDs are meant to be unguessable, and the file
lists every client's IDs and targets. One entry per line keeps a large table readable
and quick to write. Times inside are relative to ``saved_at`` (wall clock, seconds since
the epoch), since the table's own clock is monotonic and starts again with the process.

Unlike the transparent front's state file, a bad file is not moved aside here: :func:`load`
raises :class:`StateFileError` and the gateway decides (it logs and starts empty; the
next save replaces the file).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from addrmap import SavedEntry, TableSnapshot
from addrmap.snapshot import check
from translator.atomicwrite import write_atomically

FORMAT = "socks64-idtable-state"
VERSION = 1

StrPath = str | os.PathLike[str]

# One encoder for every line: json.dumps() with options builds a new one per call, which
# is most of the cost of writing a million entries.
_line = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


class StateFileError(Exception):
    """The state file exists but cannot be read or is not a valid state file."""

    def __init__(self, path: StrPath, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"ADDRESS ID state file {self.path}: {reason}")


def encode(snap: TableSnapshot, *, saved_at: float) -> str:
    """The file's text: a JSON document with one entry per line (an entry is an array in
    :class:`~addrmap.SavedEntry` order)."""

    def rows(values: list[str]) -> str:
        return "[\n" + ",\n".join(values) + "\n]" if values else "[]"

    entries = rows([_line(entry) for entry in snap.entries])
    quarantine = rows([_line(pair) for pair in snap.quarantined])
    head = _line({"format": FORMAT, "version": VERSION, "saved_at": saved_at})[:-1]
    return f'{head},\n"entries":{entries},\n"quarantine":{quarantine}}}\n'


def decode(text: str) -> tuple[TableSnapshot, float]:
    """The snapshot in ``text`` and when it was saved; ValueError when it is not valid.

    Shapes and the owner's and pinned flag's types are checked here, the rest (REALIDs,
    targets, times) by :func:`addrmap.snapshot.check`, as :func:`restore` will.
    """
    document: Any = json.loads(text)
    if type(document) is not dict or document.get("format") != FORMAT:
        raise ValueError("not a socks64 ADDRESS ID state file")
    if document.get("version") != VERSION:
        raise ValueError(f"version {document.get('version')!r} is not {VERSION}")
    saved_at: Any = document.get("saved_at")
    if not (type(saved_at) is float or type(saved_at) is int) or not math.isfinite(saved_at):
        raise ValueError(f"saved_at {saved_at!r} is not a time")
    entries = []
    for row in _rows(document, "entries", 7):
        if (
            type(row[1]) is not str
            or (row[2] is not None and type(row[2]) is not str)
            or type(row[6]) is not bool
        ):
            raise ValueError(f"entry {row!r}: the owner is not text or pinned not a boolean")
        if type(row[5]) is int:
            row[5] = float(row[5])
        entries.append(SavedEntry._make(row))
    quarantined = []
    for row in _rows(document, "quarantine", 2):
        quarantined.append((row[0], float(row[1]) if type(row[1]) is int else row[1]))
    snap = TableSnapshot(tuple(entries), tuple(quarantined))
    check(snap)  # REALIDs in range and unique, targets valid: restore() would refuse
    return snap, float(saved_at)


def load(path: StrPath) -> tuple[TableSnapshot, float] | None:
    """The saved snapshot and its ``saved_at``; None when there is no file (first start).

    Raises :class:`StateFileError`, naming the file, when it cannot be read or is not a
    valid state file of this version.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(path, f"cannot read it: {exc.strerror or exc}") from exc
    try:
        return decode(data.decode("utf-8"))
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # JSON, Unicode too
        raise StateFileError(path, f"not a valid state file: {exc}") from exc


def save(path: StrPath, snap: TableSnapshot, *, saved_at: float) -> None:
    """Replace the file at ``path`` with ``snap`` atomically, mode 0600.

    ``saved_at`` is the wall-clock time of the snapshot (:func:`time.time`). Missing
    directories are created (0750). Raises OSError when the file cannot be written; the
    old file, if any, is then left as it was and no temporary file remains.
    """
    write_atomically(path, encode(snap, saved_at=saved_at), mode=0o600)


def elapsed_since(saved_at: float, now: float | None = None) -> float:
    """Seconds from ``saved_at`` to ``now`` (default: the wall clock), never negative.

    What :func:`addrmap.snapshot.restore` takes as ``elapsed``; a wall clock stepped
    back meanwhile counts as no downtime rather than an error.
    """
    current = time.time() if now is None else now
    return max(0.0, current - saved_at)


def _rows(document: dict[str, Any], key: str, width: int) -> list[list[Any]]:
    rows = document.get(key)
    if type(rows) is not list:
        raise ValueError(f"{key!r} is not a list")
    for row in rows:
        if type(row) is not list or len(row) != width:
            raise ValueError(f"{key} row {row!r} is not a list of {width}")
    return rows
