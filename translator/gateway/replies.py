"""The one place where failures become SOCKS reply codes.

Socket errors are sorted by errno, never by message text (style.md). Every other failure
the gateway raises on purpose is a GatewayError that carries its code. ``REFUSALS`` are
the exception classes a request may end with; anything else is a bug.
"""

from __future__ import annotations

import errno

from addrmap import AddrMapError
from translator.net.interfaces import NoInterface
from translator.net.resolver import ResolveError
from translator.wire import RemoteProtocolError, Rep

_BY_ERRNO: dict[int, Rep] = {
    errno.ECONNREFUSED: Rep.CONNECTION_REFUSED,
    errno.ENETUNREACH: Rep.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Rep.NETWORK_UNREACHABLE,
    errno.EADDRNOTAVAIL: Rep.NETWORK_UNREACHABLE,  # no source address of that family here
    errno.EAFNOSUPPORT: Rep.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Rep.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Rep.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Rep.TTL_EXPIRED,
    errno.EADDRINUSE: Rep.GENERAL_FAILURE,  # BIND PORT on a busy port (profile 8)
}


class GatewayError(Exception):
    """A request the gateway refuses on purpose, with the reply code that says why."""

    def __init__(self, rep: Rep, reason: str) -> None:
        super().__init__(reason)
        self.rep = rep
        self.reason = reason


#: What serving a request may fail with; each has its reply code below.
REFUSALS: tuple[type[Exception], ...] = (
    GatewayError,
    OSError,  # TimeoutError included
    ResolveError,
    AddrMapError,
    NoInterface,
)


def rep_for(exc: BaseException) -> Rep:
    """The reply code for any failure while serving a request."""
    if isinstance(exc, GatewayError):
        return exc.rep
    if isinstance(exc, RemoteProtocolError):
        return exc.rep if exc.rep is not None else Rep.GENERAL_FAILURE
    if isinstance(exc, ResolveError):
        return Rep.HOST_UNREACHABLE
    if isinstance(exc, NoInterface):  # multicast with nowhere to join
        return Rep.NETWORK_UNREACHABLE
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return Rep.TTL_EXPIRED
    if isinstance(exc, OSError) and exc.errno is not None:
        return _BY_ERRNO.get(exc.errno, Rep.GENERAL_FAILURE)
    return Rep.GENERAL_FAILURE  # AddrMapError (quota, capacity) and anything unforeseen


def describe(exc: BaseException) -> str:
    """A one-line reason for the log."""
    if isinstance(exc, GatewayError):
        return exc.reason
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
