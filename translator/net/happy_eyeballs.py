"""Outbound TCP connections to a set of addresses, Happy Eyeballs style (RFC 8305).

Theory of operation: the candidate addresses are ordered by interleaving the two families,
preferred family first (RFC 8305 section 4). Attempts start one at a time; the next one
starts when ``delay`` has passed since the last start, or at once when an attempt fails
(section 5). The first attempt to connect wins; every other attempt is cancelled and any
socket it produced is closed, so nothing leaks whatever the outcome, including
cancellation of the caller. The whole race is bounded by ``timeout``.

Failures keep their ``errno``: the gateway turns it into a SOCKS reply code, so when every
attempt fails the most informative errno is raised (refused, then host unreachable, then
network unreachable, then whatever came first); a race that runs out of time raises
``TimeoutError`` with ``errno.ETIMEDOUT``.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .addresses import IPAddress, family_of, ip_text

__all__ = [
    "ConnectAttempt",
    "connect_happy",
    "connect_one",
    "connect_socket",
    "order_addresses",
]

#: One connection attempt: connect to (address, port), return a connected non-blocking
#: socket, close it yourself if cancelled or failing. Injectable for tests.
ConnectAttempt = Callable[[IPAddress, int], Coroutine[Any, Any, socket.socket]]

# Lower rank = tells the client more. Anything unlisted ranks after these, in arrival order.
_ERRNO_RANK = {errno.ECONNREFUSED: 0, errno.EHOSTUNREACH: 1, errno.ENETUNREACH: 2}


def order_addresses(
    addresses: Sequence[IPAddress], prefer: int = socket.AF_INET6
) -> list[IPAddress]:
    """Order ``addresses`` for connection attempts (RFC 8305 section 4).

    Duplicates are dropped, each family keeps its given order, and the families alternate
    starting with ``prefer`` (when present).
    """
    if prefer not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"prefer must be AF_INET or AF_INET6, not {prefer!r}")
    unique = list(dict.fromkeys(addresses))
    preferred = [a for a in unique if family_of(a) == prefer]
    other = [a for a in unique if family_of(a) != prefer]
    ordered: list[IPAddress] = []
    for index in range(max(len(preferred), len(other))):
        ordered.extend(family[index] for family in (preferred, other) if index < len(family))
    return ordered


async def connect_socket(
    address: IPAddress, port: int, *, interface: str | None = None
) -> socket.socket:
    """Connect a new non-blocking TCP socket to ``address``:``port``, pinned to
    ``interface`` (SO_BINDTODEVICE) when one is given.

    The socket is closed if the attempt fails or is cancelled.
    """
    return await _open(address, port, interface, None, 0.0)


async def connect_one(
    address: IPAddress,
    port: int,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a bound on the attempt, as connect_happy's
    interface: str | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> socket.socket:
    """``connect_happy`` for a single address, without its machinery: one socket, no
    race, and the time limit as a timer handle (asyncio.timeout costs a context manager
    and a task lookup per call). Raises what ``connect_happy([address], ...)`` raises.
    ``loop``: the running loop, when the caller knows it (asking costs a syscall)."""
    deadline = (loop or asyncio.get_running_loop()).time() + timeout
    return await _open(address, port, interface, deadline, timeout)


async def _open(
    address: IPAddress, port: int, interface: str | None, deadline: float | None, limit: float
) -> socket.socket:
    v6 = address.version == 6
    # SOCK_NONBLOCK at creation: no separate ioctl to make it non-blocking.
    sock = socket.socket(
        socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
    )
    try:
        if interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        if v6 and address.scope_id:  # type: ignore[union-attr]
            # A zone needs the loop's resolution (interface name -> index): rare, keep it.
            connecting = asyncio.get_running_loop().sock_connect(sock, (str(address), port))
            if deadline is None:
                await connecting
            else:
                async with asyncio.timeout_at(deadline):
                    await connecting
        elif not _connect_now(sock, address, port):
            await _wait_connected(sock, address, port, deadline)
    except TimeoutError:
        sock.close()
        if deadline is None:
            raise
        # As connect_happy: whatever ran out of time, the answer names the whole limit.
        raise TimeoutError(
            errno.ETIMEDOUT, f"connect to port {port} timed out after {limit:g} s"
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_now(sock: socket.socket, address: IPAddress, port: int) -> bool:
    """Start a non-blocking connect; True when it is already complete.

    uvloop's sock_connect runs getaddrinfo on its thread pool even for an IP literal (a
    thread hand-off per connection): the literal needs no resolving, so connect() is
    called directly. On loopback and other fast paths the handshake is done by the time
    connect() has returned EINPROGRESS; a second connect() then says so (0), or gives the
    failure, without waiting for the loop. Errors read as uvloop's sock_connect words them.
    """
    sockaddr = (ip_text(address), port)
    try:
        sock.connect(sockaddr)
        return True
    except (BlockingIOError, InterruptedError):
        pass
    try:
        sock.connect(sockaddr)  # 0 once established; EALREADY while the SYN is out
        return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:  # what SO_ERROR would have said after the wait
        raise OSError(exc.errno, _failed(address, port)) from None


async def _wait_connected(
    sock: socket.socket, address: IPAddress, port: int, deadline: float | None
) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _settle, done)
    timer = None if deadline is None else loop.call_at(deadline, _expire, done)
    try:
        await done
    finally:
        loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, _failed(address, port))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _failed(address: IPAddress, port: int) -> str:
    """uvloop's words for a failed connect: the address as its getaddrinfo returned it."""
    if address.version == 4:
        return f"Connect call failed {(str(address), port)}"
    host = socket.inet_ntop(socket.AF_INET6, address.packed)
    return f"Connect call failed {(host, port, 0, 0)}"


async def connect_happy(
    addresses: Sequence[IPAddress],
    port: int,
    *,
    prefer: int = socket.AF_INET6,
    delay: float = 0.25,
    timeout: float = 10.0,  # noqa: ASYNC109 - a bound on the whole race, part of the API
    attempt: ConnectAttempt = connect_socket,
) -> socket.socket:
    """Connect to the first of ``addresses`` that answers on ``port`` (RFC 8305).

    Returns a connected non-blocking socket; the caller owns it. A single address is
    simply a race with one runner.

    Raises:
        ValueError: ``addresses`` is empty or ``prefer`` is not AF_INET / AF_INET6.
        TimeoutError: nothing connected within ``timeout`` seconds (errno ETIMEDOUT).
        OSError: every attempt failed; errno is the most informative one seen.
    """
    ordered = order_addresses(addresses, prefer)
    if not ordered:
        raise ValueError("no addresses to connect to")
    if len(ordered) == 1:  # nothing to race: skip the tasks (the common literal case)
        try:
            async with asyncio.timeout(timeout):
                return await attempt(ordered[0], port)
        except TimeoutError:
            raise TimeoutError(
                errno.ETIMEDOUT, f"connect to port {port} timed out after {timeout:g} s"
            ) from None
    return await _race(ordered, port, delay, timeout, attempt)


async def _race(
    ordered: list[IPAddress],
    port: int,
    delay: float,
    time_limit: float,
    attempt: ConnectAttempt,
) -> socket.socket:
    loop = asyncio.get_running_loop()
    # The deadline is checked here rather than with asyncio.timeout(): a cancellation
    # landing just after a winner is chosen could otherwise lose the winning socket.
    deadline = loop.time() + time_limit
    started: dict[asyncio.Task[socket.socket], IPAddress] = {}
    errors: list[tuple[IPAddress, OSError]] = []
    winner: asyncio.Task[socket.socket] | None = None
    waiting = iter(ordered)
    next_address = next(waiting, None)
    try:
        while True:
            if loop.time() >= deadline:
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"connect to port {port} timed out after {time_limit:g} s" + _describe(errors),
                )
            if next_address is not None:
                task = loop.create_task(attempt(next_address, port))
                started[task] = next_address
                next_address = next(waiting, None)
            running = [task for task in started if not task.done()]
            if not running:
                break
            time_left = deadline - loop.time()
            wait = time_left if next_address is None else min(delay, time_left)
            done, _ = await asyncio.wait(
                running, timeout=max(wait, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
            for task in (t for t in started if t in done):  # in start order
                if task.cancelled():  # cancelled by someone else: count it as a failure
                    errors.append((started[task], OSError(errno.ECANCELED, "attempt cancelled")))
                    continue
                failure = task.exception()
                if failure is None:
                    winner = task
                    return task.result()
                if not isinstance(failure, OSError):
                    raise failure
                errors.append((started[task], failure))
        raise _most_informative(errors, port)
    finally:
        await _discard_losers(list(started), winner)


async def _discard_losers(
    tasks: list[asyncio.Task[socket.socket]], winner: asyncio.Task[socket.socket] | None
) -> None:
    """Cancel unfinished attempts and close every socket except the winner's."""

    def close_result(task: asyncio.Task[socket.socket]) -> None:
        if not task.cancelled() and task.exception() is None:
            task.result().close()

    losers = [task for task in tasks if task is not winner]
    for task in losers:
        if task.done():
            close_result(task)
        else:
            task.cancel()
            # Runs even if our own caller cancels us while we wait below.
            task.add_done_callback(close_result)
    try:
        # Let cancelled attempts unwind, so their sockets are closed when we return.
        await asyncio.gather(*losers, return_exceptions=True)
    except BaseException:
        if winner is not None:
            winner.result().close()
        raise


def _describe(errors: list[tuple[IPAddress, OSError]]) -> str:
    if not errors:
        return ""
    details = (f"{address}: {error.strerror or error}" for address, error in errors)
    return " (" + "; ".join(details) + ")"


def _most_informative(errors: list[tuple[IPAddress, OSError]], port: int) -> OSError:
    best = min(
        (error for _, error in errors),
        key=lambda error: _ERRNO_RANK.get(error.errno or 0, len(_ERRNO_RANK)),
    )
    if best.errno is None:
        return OSError(f"connect to port {port} failed" + _describe(errors))
    # OSError(errno, ...) builds the matching subclass (ConnectionRefusedError, ...).
    return OSError(best.errno, f"connect to port {port} failed" + _describe(errors))
