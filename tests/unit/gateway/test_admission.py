"""Admission: the gateway-wide bound and each client address's fair share, counted without
a socket."""

from __future__ import annotations

from translator.config import Limits
from translator.gateway.admission import (
    MAX_CLIENTS,
    PER_CLIENT,
    PER_CLIENT_HANDSHAKE,
    Admission,
)

A = "192.0.2.1"
B = "192.0.2.2"
C = "2001:db8::1"


def limits(max_clients: int = 100, per_client: int = 10, per_client_handshake: int = 3) -> Limits:
    return Limits(
        max_clients=max_clients, per_client=per_client, per_client_handshake=per_client_handshake
    )


def fill(admission: Admission, client: str, n: int, *, done: bool = False) -> None:
    """Admit ``n`` connections from ``client`` (past their first request when ``done``)."""
    for _ in range(n):
        assert admission.admit(client) is None
        if done:
            admission.handshake_done(client)


def test_per_client_handshake_bound() -> None:
    admission = Admission(limits(per_client_handshake=3))
    fill(admission, A, 3)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    # a refusal takes nothing
    assert admission.open_from(A) == 3 and admission.total == 3


def test_per_client_bound() -> None:
    admission = Admission(limits(per_client=5, per_client_handshake=3))
    fill(admission, A, 5, done=True)
    assert admission.admit(A) == PER_CLIENT
    assert admission.open_from(A) == 5 and admission.total == 5


def test_per_client_bound_counts_handshaking_connections_too() -> None:
    admission = Admission(limits(per_client=5, per_client_handshake=3))
    fill(admission, A, 3, done=True)
    fill(admission, A, 2)  # 5 open, 2 of them handshaking
    assert admission.admit(A) == PER_CLIENT


def test_max_clients_bound_across_addresses() -> None:
    admission = Admission(limits(max_clients=4, per_client=10, per_client_handshake=10))
    fill(admission, A, 2)
    fill(admission, B, 2)
    assert admission.admit(C) == MAX_CLIENTS
    assert admission.admit(A) == MAX_CLIENTS
    assert admission.open_from(C) == 0 and admission.total == 4
    admission.release(B, handshaking=True)
    assert admission.admit(C) is None


def test_max_clients_is_checked_before_the_share() -> None:
    admission = Admission(limits(max_clients=3, per_client=10, per_client_handshake=3))
    fill(admission, A, 3)
    assert admission.admit(A) == MAX_CLIENTS


def test_handshake_done_frees_a_handshake_slot_but_not_the_open_slot() -> None:
    admission = Admission(limits(per_client=4, per_client_handshake=2))
    fill(admission, A, 2)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    admission.handshake_done(A)
    assert admission.open_from(A) == 2 and admission.total == 2
    assert admission.admit(A) is None  # the freed handshake slot
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    admission.handshake_done(A)
    admission.handshake_done(A)
    fill(admission, A, 1)  # 4 open: the per-client bound
    assert admission.admit(A) == PER_CLIENT
    assert admission.open_from(A) == 4


def test_release_while_handshaking_frees_both_slots() -> None:
    admission = Admission(limits(per_client=3, per_client_handshake=2))
    fill(admission, A, 2)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    admission.release(A, handshaking=True)
    assert admission.open_from(A) == 1 and admission.total == 1
    assert admission.admit(A) is None
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE


def test_release_after_the_first_request_keeps_the_handshake_count() -> None:
    admission = Admission(limits(per_client=10, per_client_handshake=2))
    fill(admission, A, 1, done=True)
    fill(admission, A, 2)  # 3 open, 2 of them handshaking
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    admission.release(A, handshaking=False)  # the one past its first request
    assert admission.open_from(A) == 2 and admission.total == 2
    # still 2 handshaking: no handshake slot came free
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    admission.handshake_done(A)
    assert admission.admit(A) is None


def test_both_bounds_reached_reports_the_handshake_one() -> None:
    admission = Admission(limits(per_client=3, per_client_handshake=2))
    fill(admission, A, 1, done=True)
    fill(admission, A, 2)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE


def test_other_addresses_are_unaffected() -> None:
    admission = Admission(limits(per_client=4, per_client_handshake=2))
    fill(admission, A, 2)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    fill(admission, B, 2)
    fill(admission, C, 3, done=True)
    fill(admission, C, 1)
    assert admission.admit(C) == PER_CLIENT
    assert admission.admit(B) == PER_CLIENT_HANDSHAKE
    assert [admission.open_from(x) for x in (A, B, C)] == [2, 2, 4]
    assert admission.total == 8
    for _ in range(2):
        admission.release(A, handshaking=True)
    assert admission.open_from(A) == 0
    assert [admission.open_from(x) for x in (B, C)] == [2, 4]
    assert admission.admit(B) == PER_CLIENT_HANDSHAKE and admission.admit(C) == PER_CLIENT


def test_counts_never_go_negative() -> None:
    admission = Admission(limits(per_client=10, per_client_handshake=2))
    # stray calls for an address holding nothing
    admission.release(A, handshaking=True)
    admission.release(A, handshaking=False)
    admission.handshake_done(A)
    assert admission.total == 0 and admission.open_from(A) == 0
    fill(admission, A, 1)
    admission.handshake_done(A)
    admission.handshake_done(A)  # twice: the count stays at zero, not -1
    fill(admission, A, 2)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE  # 2 handshaking, not 1
    admission.release(A, handshaking=False)
    admission.release(A, handshaking=True)
    admission.release(A, handshaking=True)
    admission.release(A, handshaking=True)  # one too many: ignored
    admission.release(A, handshaking=False)
    assert admission.total == 0 and admission.open_from(A) == 0
    fill(admission, B, 1)
    assert admission.total == 1
    fill(admission, A, 2)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE  # the full bound again, no extra
    assert admission.total == 3


def test_a_release_counted_as_handshaking_when_none_is_does_not_go_negative() -> None:
    admission = Admission(limits(per_client=10, per_client_handshake=2))
    fill(admission, A, 2, done=True)
    admission.release(A, handshaking=True)  # none is handshaking: the count stays at zero
    assert admission.open_from(A) == 1
    fill(admission, A, 2)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE


def test_a_released_address_starts_from_nothing() -> None:
    admission = Admission(limits(per_client=2, per_client_handshake=2))
    fill(admission, A, 2, done=True)
    admission.release(A, handshaking=False)
    admission.release(A, handshaking=False)
    assert admission._shares == {}  # no memory kept for addresses that left
    fill(admission, A, 2)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE


def test_reloaded_limits_apply_to_the_next_admit() -> None:
    admission = Admission(limits(max_clients=100, per_client=10, per_client_handshake=5))
    fill(admission, A, 4)
    fill(admission, B, 3, done=True)
    # tighter: the connections held stay, the next ones are refused
    admission.limits = limits(max_clients=100, per_client=10, per_client_handshake=2)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    assert admission.open_from(A) == 4
    admission.limits = limits(max_clients=100, per_client=3, per_client_handshake=5)
    assert admission.admit(B) == PER_CLIENT
    admission.limits = limits(max_clients=7, per_client=10, per_client_handshake=5)
    assert admission.admit(C) == MAX_CLIENTS
    # looser again: admitted at once, with the counts carried over
    admission.limits = limits(max_clients=100, per_client=10, per_client_handshake=6)
    fill(admission, A, 2)
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    assert admission.open_from(A) == 6 and admission.total == 9


def test_a_limit_of_one() -> None:
    admission = Admission(limits(max_clients=100, per_client=1, per_client_handshake=1))
    assert admission.admit(A) is None
    assert admission.admit(A) == PER_CLIENT_HANDSHAKE
    admission.handshake_done(A)
    assert admission.admit(A) == PER_CLIENT
