"""rep_for and describe over every exception class a request can end with."""

from __future__ import annotations

import errno

import pytest

from addrmap import CapacityExceeded, InvalidTarget, Owner, QuotaExceeded
from translator.gateway.replies import REFUSALS, GatewayError, describe, rep_for
from translator.net.interfaces import NoInterface
from translator.net.resolver import ResolveError, ResolveReason
from translator.wire import RemoteProtocolError, Rep

OWNER = Owner("192.0.2.7")


@pytest.mark.parametrize("rep", list(Rep))
def test_gateway_error_carries_its_own_code(rep: Rep) -> None:
    assert rep_for(GatewayError(rep, "why")) == rep


@pytest.mark.parametrize(
    ("code", "rep"),
    [
        (errno.ECONNREFUSED, Rep.CONNECTION_REFUSED),
        (errno.ENETUNREACH, Rep.NETWORK_UNREACHABLE),
        (errno.ENETDOWN, Rep.NETWORK_UNREACHABLE),
        (errno.EADDRNOTAVAIL, Rep.NETWORK_UNREACHABLE),
        (errno.EAFNOSUPPORT, Rep.NETWORK_UNREACHABLE),
        (errno.EHOSTUNREACH, Rep.HOST_UNREACHABLE),
        (errno.EHOSTDOWN, Rep.HOST_UNREACHABLE),
        (errno.ETIMEDOUT, Rep.TTL_EXPIRED),
        (errno.EADDRINUSE, Rep.GENERAL_FAILURE),
        (errno.EACCES, Rep.GENERAL_FAILURE),  # anything unlisted
    ],
)
def test_socket_errors_are_sorted_by_errno(code: int, rep: Rep) -> None:
    assert rep_for(OSError(code, "text the mapping must not read")) == rep


@pytest.mark.parametrize(
    ("exc", "rep"),
    [  # the subclasses asyncio and socket calls really raise, sorted by errno all the same
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Rep.CONNECTION_REFUSED),
        (ConnectionResetError(errno.ECONNRESET, "reset"), Rep.GENERAL_FAILURE),
        (PermissionError(errno.EACCES, "denied"), Rep.GENERAL_FAILURE),
        (BlockingIOError(errno.EHOSTUNREACH, "odd but possible"), Rep.HOST_UNREACHABLE),
    ],
)
def test_named_socket_error_classes_are_sorted_by_errno_too(exc: OSError, rep: Rep) -> None:
    assert rep_for(exc) == rep


def test_a_message_that_looks_like_another_error_is_not_read() -> None:
    assert rep_for(OSError(errno.EACCES, "Connection refused")) == Rep.GENERAL_FAILURE


@pytest.mark.parametrize(
    ("exc", "rep"),
    [
        (TimeoutError(), Rep.TTL_EXPIRED),  # asyncio.timeout raises the builtin
        (TimeoutError(errno.ETIMEDOUT, "connect timed out"), Rep.TTL_EXPIRED),
        (OSError("no errno"), Rep.GENERAL_FAILURE),
        (NoInterface("no default route"), Rep.NETWORK_UNREACHABLE),
        (QuotaExceeded(4096, OWNER), Rep.GENERAL_FAILURE),
        (CapacityExceeded(10, OWNER), Rep.GENERAL_FAILURE),
        (InvalidTarget("bad"), Rep.GENERAL_FAILURE),
        (
            RemoteProtocolError("bad ATYP", Rep.ADDRESS_TYPE_NOT_SUPPORTED),
            Rep.ADDRESS_TYPE_NOT_SUPPORTED,
        ),
        (RemoteProtocolError("no code"), Rep.GENERAL_FAILURE),
        (ValueError("a bug"), Rep.GENERAL_FAILURE),
    ],
)
def test_every_other_failure_class(exc: BaseException, rep: Rep) -> None:
    assert rep_for(exc) == rep


@pytest.mark.parametrize("reason", list(ResolveReason))
def test_every_resolver_failure_is_host_unreachable(reason: ResolveReason) -> None:
    assert rep_for(ResolveError("v6.example.test", reason)) == Rep.HOST_UNREACHABLE


@pytest.mark.parametrize(
    "exc",
    [
        GatewayError(Rep.NOT_ALLOWED, "denied"),
        OSError(errno.ECONNREFUSED, "refused"),
        TimeoutError(),
        ResolveError("x.test", ResolveReason.NXDOMAIN),
        QuotaExceeded(1, OWNER),
        NoInterface("none"),
    ],
)
def test_refusals_cover_every_failure_a_request_may_end_with(exc: Exception) -> None:
    assert isinstance(exc, REFUSALS)


def test_a_bug_is_not_a_refusal() -> None:
    assert not isinstance(KeyError("x"), REFUSALS)  # a LookupError, unlike NoInterface
    assert not isinstance(AssertionError(), REFUSALS)


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (GatewayError(Rep.NOT_ALLOWED, "denied by policy (rule 0)"), "denied by policy (rule 0)"),
        (OSError(errno.ECONNREFUSED, "Connection refused"), "ECONNREFUSED: Connection refused"),
        (TimeoutError(), "timed out"),
        (ValueError(), "ValueError"),
        (ValueError("odd"), "ValueError: odd"),
    ],
)
def test_describe_is_one_line_for_the_log(exc: BaseException, text: str) -> None:
    assert describe(exc) == text
