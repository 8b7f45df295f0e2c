"""Listeners on real loopback sockets: the reload diff keeps kept sockets (and their
backlog), a failing bind changes nothing, and accepting rests instead of spinning when
descriptors run out."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from translator.config import Endpoint, parse_endpoint
from translator.gateway import listening
from translator.gateway.listening import Listeners

E1 = Endpoint("127.0.0.1", 0)
E2 = Endpoint("127.0.0.2", 0)
E3 = Endpoint("127.0.0.3", 0)


class Accepted:
    """The on_accept callback: keeps (and later closes) every accepted connection."""

    def __init__(self) -> None:
        self.got: list[tuple[socket.socket, tuple[object, ...], Endpoint]] = []
        self._event = asyncio.Event()

    def __call__(self, sock: socket.socket, peer: tuple[object, ...], endpoint: str) -> None:
        self.got.append((sock, peer, parse_endpoint(endpoint)))  # the label is HOST:PORT
        self._event.set()

    async def wait_for(self, peer: tuple[object, ...], within: float = 2.0) -> Endpoint:
        """The listener endpoint the connection from ``peer`` was accepted on."""
        async with asyncio.timeout(within):
            while True:
                for _, got_peer, endpoint in self.got:
                    if got_peer[:2] == peer[:2]:
                        return endpoint
                self._event.clear()
                await self._event.wait()

    def close(self) -> None:
        for sock, _, _ in self.got:
            sock.close()


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    """Client sockets a test opens; closed whatever happens."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


@pytest.fixture
async def accepted() -> AsyncIterator[Accepted]:
    acc = Accepted()
    yield acc
    acc.close()


@pytest.fixture
async def make_listeners(accepted: Accepted) -> AsyncIterator[list[Listeners]]:
    made: list[Listeners] = []
    yield made
    for listeners in made:
        listeners.close()


def new_listeners(
    made: list[Listeners], accepted: Accepted, on_pause: Callable[[str], None] | None = None
) -> Listeners:
    listeners = Listeners(accepted) if on_pause is None else Listeners(accepted, on_pause)
    made.append(listeners)
    return listeners


def connect(clients: list[socket.socket], endpoint: Endpoint) -> tuple[object, ...]:
    """Connect (the kernel completes it into the backlog; nobody accepts yet)."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=2)
    clients.append(sock)
    return tuple(sock.getsockname())


def bound(listeners: Listeners) -> dict[str, Endpoint]:
    return {e.host: e for e in listeners.endpoints}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- the reload diff ----------------------------------------------------------------------


async def test_open_adds_and_removes_by_diff_and_keeps_kept_sockets(
    make_listeners: list[Listeners], accepted: Accepted, clients: list[socket.socket]
) -> None:
    listeners = new_listeners(make_listeners, accepted)
    added, removed = listeners.open([E1, E2])
    assert (added, removed) == ([E1, E2], [])
    before = bound(listeners)
    assert set(before) == {"127.0.0.1", "127.0.0.2"} and all(e.port for e in before.values())
    kept = listeners._by_request[E2]
    fileno = kept.fileno()
    # A client connects to the kept listener and the one about to go; the loop has not run
    # since, so both wait in their listener's backlog across the diff.
    queued = connect(clients, before["127.0.0.2"])
    connect(clients, before["127.0.0.1"])

    added, removed = listeners.open([E2, E3, E2])
    assert (added, removed) == ([E3], [E1])
    assert listeners._by_request[E2] is kept and kept.fileno() == fileno
    after = bound(listeners)
    assert set(after) == {"127.0.0.2", "127.0.0.3"}
    assert after["127.0.0.2"] == before["127.0.0.2"]  # same port: the same socket

    assert await accepted.wait_for(queued) == after["127.0.0.2"]
    # the removed listener is closed: its port refuses
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", before["127.0.0.1"].port), timeout=2).close()
    # the added one accepts
    assert await accepted.wait_for(connect(clients, after["127.0.0.3"])) == after["127.0.0.3"]

    # the same list again changes nothing
    assert listeners.open([E3, E2]) == ([], [])
    assert listeners._by_request[E2] is kept
    assert await accepted.wait_for(connect(clients, after["127.0.0.2"])) == after["127.0.0.2"]


async def test_open_nothing_closes_everything(
    make_listeners: list[Listeners], accepted: Accepted
) -> None:
    listeners = new_listeners(make_listeners, accepted)
    listeners.open([E1, E2])
    ports = bound(listeners)
    assert listeners.open([]) == ([], [E1, E2])
    assert listeners.endpoints == []
    for endpoint in ports.values():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((endpoint.host, endpoint.port), timeout=2).close()


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 held by someone else's listening socket."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    yield blocker.getsockname()[1]
    blocker.close()


async def test_a_failing_bind_changes_nothing(
    make_listeners: list[Listeners],
    accepted: Accepted,
    clients: list[socket.socket],
    taken_port: int,
) -> None:
    listeners = new_listeners(make_listeners, accepted)
    listeners.open([E1, E2])
    before = listeners.endpoints
    sockets = dict(listeners._by_request)
    fds = open_fds()
    taken = Endpoint("127.0.0.1", taken_port)
    # adds E3 (binds fine), removes E1, and one more that cannot bind: all or nothing
    with pytest.raises(OSError) as caught:
        listeners.open([E2, E3, taken])
    assert caught.value.errno == errno.EADDRINUSE
    assert listeners.endpoints == before
    assert listeners._by_request == sockets
    assert all(s.fileno() != -1 for s in sockets.values())
    assert open_fds() == fds  # the socket bound for E3 was closed again
    # both old listeners still accept (E1 was not removed)
    for endpoint in before:
        assert await accepted.wait_for(connect(clients, endpoint)) == endpoint
    # and a later good open works from the unchanged state
    assert listeners.open([E2, E3]) == ([E3], [E1])


# -- running out of descriptors -----------------------------------------------------------


class FlakyListener(socket.socket):
    """A listening socket whose ``accept`` fails with ``error`` the first ``failures``
    times (as a process out of descriptors sees it); every call is timed."""

    failures = 0
    error = errno.EMFILE
    calls: list[float]

    def accept(self) -> tuple[socket.socket, object]:
        self.calls.append(time.monotonic())
        if self.failures > 0:
            self.failures -= 1
            raise OSError(self.error, os.strerror(self.error))
        return super().accept()


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> list[FlakyListener]:
    """Listeners opened from now on are FlakyListeners (the same kernel socket)."""
    made: list[FlakyListener] = []
    real = listening.listening_socket

    def listening_socket(endpoint: Endpoint) -> socket.socket:
        sock = real(endpoint)
        wrapped = FlakyListener(sock.family, sock.type, fileno=sock.detach())
        wrapped.calls = []
        made.append(wrapped)
        return wrapped

    monkeypatch.setattr(listening, "listening_socket", listening_socket)
    return made


async def test_accept_pauses_on_emfile_and_resumes_by_itself(
    make_listeners: list[Listeners],
    accepted: Accepted,
    clients: list[socket.socket],
    flaky: list[FlakyListener],
) -> None:
    pauses: list[tuple[str, float]] = []
    listeners = new_listeners(
        make_listeners, accepted, lambda reason: pauses.append((reason, time.monotonic()))
    )
    listeners.open([E1, E2])
    ports = bound(listeners)
    one, other = (listeners._by_request[E] for E in (E1, E2))
    assert isinstance(one, FlakyListener) and isinstance(other, FlakyListener)
    one.failures = 1

    pending = connect(clients, ports["127.0.0.1"])
    started = time.monotonic()
    async with asyncio.timeout(2):
        while not pauses:
            await asyncio.sleep(0.005)
    assert [reason for reason, _ in pauses] == ["EMFILE"]
    failed_at = one.calls[0]
    assert listeners._paused is not None
    # Paused on every listener: a connection to the other one waits as well.
    waiting = connect(clients, ports["127.0.0.2"])
    await asyncio.sleep(0.05)
    assert accepted.got == []
    assert len(one.calls) == 1 and other.calls == []  # no reader left: no spinning
    # ... and it resumes by itself: both pending connections are accepted.
    assert await accepted.wait_for(pending, within=1.0) == ports["127.0.0.1"]
    assert await accepted.wait_for(waiting, within=1.0) == ports["127.0.0.2"]
    resumed_after = one.calls[1] - failed_at
    assert listening.PAUSE * 0.9 <= resumed_after <= 0.25, resumed_after
    assert time.monotonic() - started < 1.0
    assert listeners._paused is None
    assert [reason for reason, _ in pauses] == ["EMFILE"]


async def test_exhaustion_that_lasts_wakes_about_ten_times_a_second(
    make_listeners: list[Listeners],
    accepted: Accepted,
    clients: list[socket.socket],
    flaky: list[FlakyListener],
) -> None:
    reasons: list[str] = []
    listeners = new_listeners(make_listeners, accepted, reasons.append)
    listeners.open([E1])
    (sock,) = flaky
    sock.failures = 4
    pending = connect(clients, bound(listeners)["127.0.0.1"])
    assert await accepted.wait_for(pending, within=2.0) == bound(listeners)["127.0.0.1"]
    # 4 failures, then the accept (and the EAGAIN that ends the batch): one try per
    # pause, never a busy loop
    assert reasons == ["EMFILE"] * 4
    assert len(sock.calls) == 6
    tries = sock.calls[:5]
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert all(listening.PAUSE * 0.9 <= gap <= 0.25 for gap in gaps), gaps


@pytest.mark.parametrize("error", [errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
async def test_other_exhaustion_errors_pause_with_their_name(
    make_listeners: list[Listeners],
    accepted: Accepted,
    clients: list[socket.socket],
    flaky: list[FlakyListener],
    error: int,
) -> None:
    reasons: list[str] = []
    listeners = new_listeners(make_listeners, accepted, reasons.append)
    listeners.open([E1])
    flaky[0].failures = 1
    flaky[0].error = error
    pending = connect(clients, bound(listeners)["127.0.0.1"])
    await accepted.wait_for(pending, within=2.0)
    assert reasons == [errno.errorcode[error]]
    assert flaky[0].calls[1] - flaky[0].calls[0] >= listening.PAUSE * 0.9


async def test_a_lost_connection_is_skipped_without_pausing(
    make_listeners: list[Listeners],
    accepted: Accepted,
    clients: list[socket.socket],
    flaky: list[FlakyListener],
) -> None:
    reasons: list[str] = []
    listeners = new_listeners(make_listeners, accepted, reasons.append)
    listeners.open([E1])
    flaky[0].failures = 1
    flaky[0].error = errno.ECONNABORTED
    pending = connect(clients, bound(listeners)["127.0.0.1"])
    await accepted.wait_for(pending, within=2.0)
    assert reasons == []
    assert flaky[0].calls[1] - flaky[0].calls[0] < listening.PAUSE


async def test_listeners_changed_while_paused(
    make_listeners: list[Listeners],
    accepted: Accepted,
    clients: list[socket.socket],
    flaky: list[FlakyListener],
) -> None:
    reasons: list[str] = []
    listeners = new_listeners(make_listeners, accepted, reasons.append)
    listeners.open([E1, E2])
    flaky[0].failures = 1
    connect(clients, bound(listeners)["127.0.0.1"])
    async with asyncio.timeout(2):
        while not reasons:
            await asyncio.sleep(0.005)
    # a reload while paused: E2 goes, E3 comes (and waits for the resume like the rest)
    assert listeners.open([E1, E3]) == ([E3], [E2])
    new = bound(listeners)["127.0.0.3"]
    waiting = connect(clients, new)
    await asyncio.sleep(0.02)
    assert accepted.got == []
    assert await accepted.wait_for(waiting, within=1.0) == new
    assert reasons == ["EMFILE"]


async def test_close_while_paused_cancels_the_resume(
    make_listeners: list[Listeners],
    accepted: Accepted,
    clients: list[socket.socket],
    flaky: list[FlakyListener],
) -> None:
    reasons: list[str] = []
    listeners = new_listeners(make_listeners, accepted, reasons.append)
    listeners.open([E1])
    flaky[0].failures = 1
    connect(clients, bound(listeners)["127.0.0.1"])
    async with asyncio.timeout(2):
        while not reasons:
            await asyncio.sleep(0.005)
    listeners.close()
    assert listeners.endpoints == [] and listeners._paused is None
    await asyncio.sleep(listening.PAUSE * 2)  # a stray resume would watch a closed socket
    assert accepted.got == [] and len(flaky[0].calls) == 1
