"""translator.net.accepting: batches of accepts on the loop, a rest when descriptors run
out, and watching again by itself."""

from __future__ import annotations

import asyncio
import errno
import socket
import time

from translator.net import accepting
from translator.net.accepting import Acceptor


class _Exhausted(socket.socket):
    """A listener whose first ``fail`` accepts fail with EMFILE, as at the fd limit."""

    fail = 1

    def accept(self) -> tuple[socket.socket, tuple[object, ...]]:
        if self.fail:
            self.fail -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def _listener() -> _Exhausted:
    sock = _Exhausted(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


async def test_exhaustion_rests_then_accepts_what_waited() -> None:
    listener = _listener()
    got: list[tuple[socket.socket, float]] = []
    pauses: list[tuple[int | None, float]] = []
    arrived = asyncio.Event()

    def accepted(sock: socket.socket, peer: tuple[object, ...], source: socket.socket) -> None:
        assert source is listener
        got.append((sock, time.monotonic()))
        arrived.set()

    acceptor = Acceptor(accepted, lambda exc: pauses.append((exc.errno, time.monotonic())))
    client = socket.create_connection(listener.getsockname()[:2], timeout=2)
    try:
        acceptor.watch(listener)
        async with asyncio.timeout(2):
            await arrived.wait()
        assert [code for code, _ in pauses] == [errno.EMFILE]
        assert acceptor.paused is None  # resumed by itself
        rested = got[0][1] - pauses[0][1]
        assert accepting.PAUSE * 0.9 <= rested <= 0.5, rested
    finally:
        acceptor.close()
        for sock, _ in got:
            sock.close()
        client.close()
        listener.close()


async def test_close_while_resting_cancels_the_resume() -> None:
    listener = _listener()
    listener.fail = 1000
    pauses: list[OSError] = []
    acceptor = Acceptor(lambda *args: None, pauses.append)
    client = socket.create_connection(listener.getsockname()[:2], timeout=2)
    try:
        acceptor.watch(listener)
        async with asyncio.timeout(2):
            while not pauses:
                await asyncio.sleep(0.01)
        acceptor.close()
        assert acceptor.paused is None
        await asyncio.sleep(accepting.PAUSE * 2)
        assert len(pauses) == 1  # nothing watched it again
    finally:
        client.close()
        listener.close()
