"""What the GSS-API tests share: the auth section, and waiting for access lines."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.krb5realm import KerberosLab

ALL_LEVELS = ["none", "integrity", "confidentiality"]


def gss_auth(lab: KerberosLab, keytab: Path | None = None, **gssapi: Any) -> dict[str, Any]:
    """``auth:`` offering gssapi alone with the lab's keytab and every level allowed."""
    return {
        "methods": ["gssapi"],
        "gssapi": {"keytab": str(keytab or lab.keytab), "protection": ALL_LEVELS, **gssapi},
    }


async def access_lines(caplog: pytest.LogCaptureFixture, count: int = 1) -> list[str]:
    """The access lines so far, once there are at least ``count`` (the log is written
    when a session ends, which may be just after the client saw it end)."""
    lines: list[str] = []
    for _ in range(250):
        lines = [r.getMessage() for r in caplog.records if r.name == "socks64.access"]
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} access lines: {lines}")
