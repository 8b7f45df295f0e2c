"""The pool's state file: bindings (and quarantines) that survive a restart.

Clients keep DNS answers far beyond their TTL (stub caches, browsers, long-running
daemons that resolved once), so after a restart the address a client holds must still
name the same host. The file is JSON, written whole to a temporary file beside it,
fsynced and renamed over the old one: a crash leaves the old file or the new, never half
of one. A file that cannot be read is set aside (``.corrupt``) and the pool starts
empty, which is what a first start looks like too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from addrmap import Binding, PoolSnapshot
from translator.atomicwrite import write_atomically

log = logging.getLogger("socks64.transparent")

FORMAT = "socks64-transparent-state"
VERSION = 1


def encode(snapshot: PoolSnapshot, pool: IPv4Network) -> str:
    document = {
        "format": FORMAT,
        "version": VERSION,
        "pool": str(pool),
        "bindings": [[str(b.address), b.name] for b in snapshot.bindings],
        "quarantine": [[str(a), round(left, 1)] for a, left in snapshot.quarantined],
    }
    return json.dumps(document, indent=1) + "\n"


def decode(text: str) -> PoolSnapshot:
    """The snapshot in ``text``; ValueError when it is not a state file of ours."""
    document: Any = json.loads(text)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError("not a socks64 transparent state file")
    if document.get("version") != VERSION:
        raise ValueError(f"state file version {document.get('version')!r} is not {VERSION}")
    bindings = tuple(
        Binding(IPv4Address(address), str(name).lower())
        for address, name in document.get("bindings", [])
    )
    quarantined = tuple(
        (IPv4Address(address), float(left)) for address, left in document.get("quarantine", [])
    )
    return PoolSnapshot(bindings, quarantined)


def load(path: str) -> PoolSnapshot | None:
    """The saved snapshot, or None when there is none (or it was unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read transparent state %s: %s; starting with no bindings", path, exc)
        return None
    try:
        return decode(text)
    except (ValueError, TypeError) as exc:
        aside = f"{path}.corrupt"
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.warning("transparent state %s is unreadable (%s); moved to %s", path, exc, aside)
        return None


def save(path: str, snapshot: PoolSnapshot, pool: IPv4Network) -> None:
    """Write atomically; OSError when the directory cannot be created or written."""
    write_atomically(path, encode(snapshot, pool), mode=0o600)


def check_writable(path: str) -> None:
    """At start: fail early and clearly when the state file cannot be kept."""
    target = Path(path)
    target.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise PermissionError(f"cannot write {target.parent} (transparent.state_file)")
