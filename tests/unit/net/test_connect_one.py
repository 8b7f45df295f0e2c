"""connect_one, the single-address connect: what connect_happy([address]) answers, and
errors worded as the loop's own sock_connect words them (they reach the access log)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from translator.net.happy_eyeballs import connect_happy, connect_one, connect_socket

LOCAL4 = IPv4Address("127.0.0.1")


def _free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


async def _loop_says(address: str, port: int) -> OSError:
    """The error the running loop's sock_connect raises for this address and port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        with pytest.raises(OSError) as caught:
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    return caught.value


async def test_connects_and_hands_over_a_non_blocking_socket(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    sock = await connect_one(LOCAL4, port, timeout=5)
    try:
        accepted, _ = listener.accept()
        with accepted:
            assert sock.getpeername() == ("127.0.0.1", port)
            assert sock.gettimeout() == 0.0
            sock.send(b"x")
            assert accepted.recv(1) == b"x"
    finally:
        sock.close()


@pytest.mark.parametrize("connect", ["one", "socket"])
async def test_refused_reads_as_the_loop_words_it(connect: str) -> None:
    port = _free_port()
    expected = await _loop_says("127.0.0.1", port)
    with pytest.raises(OSError) as caught:
        if connect == "one":
            await connect_one(LOCAL4, port, timeout=5)
        else:
            await connect_socket(LOCAL4, port)
    assert caught.value.errno == errno.ECONNREFUSED == expected.errno
    assert type(caught.value) is type(expected)
    assert caught.value.strerror == expected.strerror
    assert str(caught.value) == str(expected)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_refused_over_ipv6_reads_as_the_loop_words_it() -> None:
    port = _free_port(socket.AF_INET6, "::1")
    expected = await _loop_says("::1", port)
    with pytest.raises(OSError) as caught:
        await connect_one(IPv6Address("::1"), port, timeout=5)
    assert caught.value.errno == expected.errno
    assert str(caught.value) == str(expected)


async def test_refused_answers_as_connect_happy_does() -> None:
    port = _free_port()
    with pytest.raises(OSError) as one:
        await connect_one(LOCAL4, port, timeout=5)
    with pytest.raises(OSError) as happy:
        await connect_happy([LOCAL4], port, timeout=5)
    assert (one.value.errno, str(one.value)) == (happy.value.errno, str(happy.value))


@contextlib.asynccontextmanager
async def stalled_port() -> AsyncIterator[int]:
    """A loopback port whose listener's accept queue is full: it drops SYNs, so a connect
    to it hangs."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    waiting = [socket.socket() for _ in range(3)]
    try:
        for sock in waiting:
            sock.setblocking(False)
            sock.connect_ex(full.getsockname())
        await asyncio.sleep(0.05)
        yield full.getsockname()[1]
    finally:
        for sock in waiting:
            sock.close()
        full.close()


async def test_times_out_as_connect_happy_does() -> None:
    async with stalled_port() as port:
        with pytest.raises(TimeoutError) as one:
            await connect_one(LOCAL4, port, timeout=0.2)
        with pytest.raises(TimeoutError) as happy:
            await connect_happy([LOCAL4], port, timeout=0.2)
    assert one.value.errno == happy.value.errno == errno.ETIMEDOUT
    assert (
        str(one.value)
        == str(happy.value)
        == (f"[Errno {errno.ETIMEDOUT}] connect to port {port} timed out after 0.2 s")
    )


async def test_cancelled_connect_closes_its_socket() -> None:
    async with stalled_port() as port:
        attempt = asyncio.ensure_future(connect_one(LOCAL4, port, timeout=5))
        await asyncio.sleep(0.05)
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt


def test_literal_text_is_the_address_text() -> None:
    from translator.net.addresses import ip_text

    for text in ("127.0.0.1", "0.0.0.0", "255.255.255.255", "203.0.113.3", "::1", "2001:db8::5"):
        address = ip_address(text)
        assert ip_text(address) == str(address)
