"""Happy Eyeballs: staggering logic with injected attempts, real sockets on loopback."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest

from translator.net.happy_eyeballs import IPAddress, connect_happy, connect_socket, order_addresses

V6_A, V6_B = IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2")
V4_A, V4_B, V4_C = IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), IPv4Address("192.0.2.3")


GUARD = 3.0  # no test may hang: a stuck race fails the test instead


# Loop times are floats (uvloop's tick is 1 ms): a timer due after 0.1 s may measure
# 0.0999999 s. Lower bounds allow this much below, far less than any delay under test.
CLOCK_SLACK = 0.002


async def happy(addresses: Sequence[IPAddress], port: int, **options: Any) -> socket.socket:
    """connect_happy(), bounded so that a broken race fails rather than hangs."""
    return await asyncio.wait_for(connect_happy(addresses, port, **options), GUARD)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")


# -- ordering ----------------------------------------------------------------------------


def test_order_interleaves_starting_with_preferred_family() -> None:
    given: list[IPAddress] = [V4_A, V4_B, V4_C, V6_A, V6_B]
    assert order_addresses(given, socket.AF_INET6) == [V6_A, V4_A, V6_B, V4_B, V4_C]
    assert order_addresses(given, socket.AF_INET) == [V4_A, V6_A, V4_B, V6_B, V4_C]


def test_order_drops_duplicates_and_copes_with_one_family() -> None:
    assert order_addresses([V4_B, V4_A, V4_B], socket.AF_INET6) == [V4_B, V4_A]


def test_order_rejects_other_families() -> None:
    with pytest.raises(ValueError):
        order_addresses([V4_A], socket.AF_UNIX)


# -- staggering, with a scripted attempt function ----------------------------------------


class ScriptedAttempts:
    """Attempt function whose outcome per address is scripted.

    Script values: a float (succeed after that many seconds), an OSError (fail at once),
    or None (hang until cancelled). Successful attempts return one end of a socketpair so
    that closing can be checked.
    """

    def __init__(self, script: dict[IPAddress, float | OSError | None]) -> None:
        self.script = script
        self.started: list[tuple[IPAddress, float]] = []
        self.cancelled: list[IPAddress] = []
        self.returned: dict[IPAddress, socket.socket] = {}
        self._peers: list[socket.socket] = []

    async def __call__(self, address: IPAddress, port: int) -> socket.socket:
        self.started.append((address, asyncio.get_running_loop().time()))
        outcome = self.script[address]
        try:
            if isinstance(outcome, OSError):
                raise outcome
            if outcome is None:
                await asyncio.Event().wait()
            assert isinstance(outcome, float)
            await asyncio.sleep(outcome)
        except asyncio.CancelledError:
            self.cancelled.append(address)
            raise
        mine, peer = socket.socketpair()
        self._peers.append(peer)
        self.returned[address] = mine
        return mine

    def order(self) -> list[IPAddress]:
        return [address for address, _ in self.started]

    def gap(self, first: int, second: int) -> float:
        return self.started[second][1] - self.started[first][1]

    def close(self) -> None:
        for sock in [*self._peers, *self.returned.values()]:
            sock.close()


@pytest.fixture
def scripted() -> Iterator[list[ScriptedAttempts]]:
    made: list[ScriptedAttempts] = []
    yield made
    for attempts in made:
        attempts.close()


async def test_next_attempt_starts_after_delay_when_first_hangs(
    scripted: list[ScriptedAttempts],
) -> None:
    attempts = ScriptedAttempts({V6_A: None, V4_A: 0.0})
    scripted.append(attempts)
    sock = await happy([V4_A, V6_A], 80, delay=0.1, attempt=attempts)
    assert sock is attempts.returned[V4_A]
    assert attempts.order() == [V6_A, V4_A]
    assert 0.1 - CLOCK_SLACK <= attempts.gap(0, 1) < 0.1 + 0.08
    assert attempts.cancelled == [V6_A]  # the loser is not left running


async def test_failure_starts_next_attempt_at_once(scripted: list[ScriptedAttempts]) -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    attempts = ScriptedAttempts({V6_A: refused, V4_A: 0.0})
    scripted.append(attempts)
    sock = await happy([V6_A, V4_A], 80, delay=5.0, attempt=attempts)
    assert sock is attempts.returned[V4_A]
    assert attempts.gap(0, 1) < 0.05


async def test_attempts_keep_staggering_and_earlier_ones_keep_running(
    scripted: list[ScriptedAttempts],
) -> None:
    # V6_A answers after 0.25 s: attempts 2 and 3 start meanwhile, and V6_A still wins.
    attempts = ScriptedAttempts({V6_A: 0.25, V4_A: None, V6_B: None, V4_B: None})
    scripted.append(attempts)
    sock = await happy([V6_A, V6_B, V4_A, V4_B], 80, delay=0.1, attempt=attempts)
    assert sock is attempts.returned[V6_A]
    assert attempts.order() == [V6_A, V4_A, V6_B]
    assert sorted(attempts.cancelled, key=str) == sorted([V4_A, V6_B], key=str)


async def test_simultaneous_winners_leave_no_open_loser(scripted: list[ScriptedAttempts]) -> None:
    attempts = ScriptedAttempts({V6_A: 0.05, V4_A: 0.0})
    scripted.append(attempts)
    sock = await happy([V6_A, V4_A], 80, delay=0.05, attempt=attempts)
    assert sock is attempts.returned[V4_A] or sock is attempts.returned[V6_A]
    losers = [s for s in attempts.returned.values() if s is not sock]
    assert all(loser.fileno() == -1 for loser in losers)
    assert sock.fileno() != -1


@pytest.mark.parametrize(
    ("errnos", "expected"),
    [
        ((errno.ENETUNREACH, errno.ECONNREFUSED, errno.EHOSTUNREACH), errno.ECONNREFUSED),
        ((errno.ENETUNREACH, errno.EACCES, errno.EHOSTUNREACH), errno.EHOSTUNREACH),
        ((errno.EACCES, errno.ENETUNREACH, errno.EADDRNOTAVAIL), errno.ENETUNREACH),
        ((errno.EACCES, errno.EADDRNOTAVAIL, errno.EPERM), errno.EACCES),
    ],
)
async def test_all_failing_raises_the_most_informative_errno(
    errnos: tuple[int, int, int], expected: int
) -> None:
    addresses: list[IPAddress] = [V6_A, V4_A, V6_B]
    attempts = ScriptedAttempts(
        {
            address: OSError(code, os.strerror(code))
            for address, code in zip(addresses, errnos, strict=True)
        }
    )
    with pytest.raises(OSError) as caught:
        await happy(addresses, 80, attempt=attempts)
    assert caught.value.errno == expected
    assert len(attempts.started) == 3
    if expected == errno.ECONNREFUSED:
        assert isinstance(caught.value, ConnectionRefusedError)


async def test_whole_race_is_bounded_by_timeout() -> None:
    attempts = ScriptedAttempts({V6_A: None, V4_A: None})
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError) as caught:
        await happy([V6_A, V4_A], 80, delay=0.05, timeout=0.2, attempt=attempts)
    assert 0.2 - CLOCK_SLACK <= loop.time() - started < 0.2 + 0.1
    assert caught.value.errno == errno.ETIMEDOUT
    assert sorted(attempts.cancelled, key=str) == sorted([V6_A, V4_A], key=str)


async def test_caller_cancelling_cancels_every_attempt() -> None:
    attempts = ScriptedAttempts({V6_A: None, V4_A: None})
    race = asyncio.ensure_future(happy([V6_A, V4_A], 80, delay=0.01, attempt=attempts))
    await asyncio.sleep(0.05)
    race.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(race, GUARD)
    assert sorted(attempts.cancelled, key=str) == sorted([V6_A, V4_A], key=str)


async def test_no_addresses_is_an_error() -> None:
    with pytest.raises(ValueError):
        await happy([], 80)


# -- real sockets on loopback ------------------------------------------------------------


@pytest.fixture
def listener_v4() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener


def closed_port(family: socket.AddressFamily, host: str) -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


@needs_ipv6
async def test_falls_back_to_ipv4_when_ipv6_is_refused(listener_v4: socket.socket) -> None:
    port = listener_v4.getsockname()[1]
    fds_before = open_fds()
    loop = asyncio.get_running_loop()
    started = loop.time()
    sock = await happy([ip_address("::1"), ip_address("127.0.0.1")], port, delay=2.0)
    try:
        assert loop.time() - started < 1.0  # the refusal, not the 2 s delay, moved us on
        assert sock.family == socket.AF_INET
        assert sock.getpeername() == ("127.0.0.1", port)
        assert not sock.getblocking()
        accepted, _ = listener_v4.accept()
        accepted.close()
    finally:
        sock.close()
    assert open_fds() == fds_before


async def test_real_refusal_keeps_errno() -> None:
    fds_before = open_fds()
    addresses: list[IPAddress] = [IPv4Address("127.0.0.1")]
    port = closed_port(socket.AF_INET, "127.0.0.1")
    with pytest.raises(ConnectionRefusedError) as caught:
        await happy(addresses, port)
    assert caught.value.errno == errno.ECONNREFUSED
    assert open_fds() == fds_before


@needs_ipv6
async def test_slow_ipv6_is_overtaken_by_ipv4_after_delay(listener_v4: socket.socket) -> None:
    """::1 is made slow by holding its real connect back; 127.0.0.1 wins after `delay`."""
    port = listener_v4.getsockname()[1]
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener_v6:
        listener_v6.bind(("::1", 0))
        listener_v6.listen(8)
        port6 = listener_v6.getsockname()[1]
        slow_started = asyncio.Event()

        async def attempt(address: IPAddress, _: int) -> socket.socket:
            if address.version == 6:
                slow_started.set()
                await asyncio.sleep(10)
                return await connect_socket(address, port6)
            return await connect_socket(address, port)

        fds_before = open_fds()
        loop = asyncio.get_running_loop()
        started = loop.time()
        sock = await happy(
            [ip_address("127.0.0.1"), ip_address("::1")], port, delay=0.05, attempt=attempt
        )
        assert slow_started.is_set()
        assert 0.05 - CLOCK_SLACK <= loop.time() - started < 1.0
        assert sock.getpeername() == ("127.0.0.1", port)
        sock.close()
        assert open_fds() == fds_before


@needs_ipv6
async def test_parallel_real_successes_close_the_loser(listener_v4: socket.socket) -> None:
    """Both families connect; the one that lost the race must not stay open."""
    port = listener_v4.getsockname()[1]
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener_v6:
        listener_v6.bind(("::1", 0))
        listener_v6.listen(8)
        port6 = listener_v6.getsockname()[1]
        both_connected = asyncio.Barrier(2)

        async def attempt(address: IPAddress, _: int) -> socket.socket:
            sock = await connect_socket(address, port6 if address.version == 6 else port)
            try:
                await both_connected.wait()  # make both attempts finish together
            except BaseException:
                sock.close()
                raise
            return sock

        fds_before = open_fds()
        sock = await happy(
            [ip_address("::1"), ip_address("127.0.0.1")], port, delay=0.01, attempt=attempt
        )
        sock.close()
        assert open_fds() == fds_before
