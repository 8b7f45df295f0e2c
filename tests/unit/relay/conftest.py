"""Fixtures shared by the relay unit tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected socketpair: ours for the code under test, theirs (blocking, 5 s) for the
    test to play the peer."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    yield ours, theirs
    for sock in (ours, theirs):
        sock.close()
