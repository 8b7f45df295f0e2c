"""The state file of a running lab: what was built, so any process can find it and remove it.

Layout: ``/run/socks64-lab/RUNID/state.json`` plus the lab's generated configs and service
logs in the same directory. The file is rewritten (atomically) after every build step, so
a lab interrupted half-way can still be torn down completely.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netnslab import interrupt
from netnslab.procs import TrackedProcess, process_starttime

STATE_ROOT = Path(os.environ.get("SOCKS64_LAB_STATE", "/run/socks64-lab"))
NAMESPACE_PREFIX = "s64"


def new_run_id() -> str:
    """A short random id; namespaces are ``s64RUNID-NODE`` so two runs never collide."""
    return secrets.token_hex(3)


def namespace_name(run_id: str, node: str) -> str:
    """The namespace name of ``node`` in run ``run_id``."""
    return f"{NAMESPACE_PREFIX}{run_id}-{node}"


@dataclass
class LabState:
    """Everything needed to inspect or tear down one lab from any process.

    ``ephemeral`` labs (built by the test suite or a one-off ``lab run``) belong to the
    process that built them and are removed when it exits.
    """

    run_id: str
    directory: Path
    topology_name: str
    topology_source: str | None
    topology_document: Any
    uid: int = field(default_factory=os.getuid)
    owner_pid: int = field(default_factory=os.getpid)
    owner_starttime: int = field(default_factory=lambda: process_starttime(os.getpid()) or -1)
    ephemeral: bool = False
    phase: str = "building"
    namespaces: dict[str, str] = field(default_factory=dict)
    inodes: dict[str, int] = field(default_factory=dict)
    processes: list[TrackedProcess] = field(default_factory=list)
    service_failures: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.directory / "state.json"

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "directory": str(self.directory),
            "topology": {
                "name": self.topology_name,
                "source": self.topology_source,
                "document": self.topology_document,
            },
            "uid": self.uid,
            "owner_pid": self.owner_pid,
            "owner_starttime": self.owner_starttime,
            "ephemeral": self.ephemeral,
            "phase": self.phase,
            "namespaces": self.namespaces,
            "inodes": self.inodes,
            "processes": [p.to_json() for p in self.processes],
            "service_failures": self.service_failures,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabState:
        topology = data.get("topology") or {}
        return cls(
            run_id=str(data["run_id"]),
            directory=Path(str(data["directory"])),
            topology_name=str(topology.get("name", "?")),
            topology_source=topology.get("source"),
            topology_document=topology.get("document"),
            uid=int(data.get("uid", -1)),
            owner_pid=int(data.get("owner_pid", -1)),
            owner_starttime=int(data.get("owner_starttime", -1)),
            ephemeral=bool(data.get("ephemeral", False)),
            phase=str(data.get("phase", "?")),
            namespaces={str(k): str(v) for k, v in (data.get("namespaces") or {}).items()},
            inodes={str(k): int(v) for k, v in (data.get("inodes") or {}).items()},
            processes=[TrackedProcess.from_json(p) for p in data.get("processes") or []],
            service_failures=dict(data.get("service_failures") or {}),
        )

    def owner_alive(self) -> bool:
        """Whether the process that built the lab is still running."""
        return process_starttime(self.owner_pid) == self.owner_starttime

    def save(self) -> None:
        """Write the state file atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(json.dumps(self.to_json(), indent=2), encoding="utf-8")
        os.replace(scratch, self.path)
        if self.phase != "tearing-down":
            interrupt.checkpoint()  # every build step saves: a safe place to stop


def load_state(path: Path) -> LabState:
    """Read one state file."""
    return LabState.from_json(json.loads(path.read_text(encoding="utf-8")))


def iter_states(root: Path | None = None, uid: int | None = None) -> Iterator[LabState]:
    """Every readable lab state under ``root``, oldest first, optionally of one user only."""
    base = root or STATE_ROOT
    if not base.is_dir():
        return
    paths = sorted(base.glob("*/state.json"), key=lambda p: p.stat().st_mtime)
    for path in paths:
        try:
            state = load_state(path)
        except (OSError, ValueError, KeyError):
            continue
        if uid is None or state.uid == uid:
            yield state
