"""RFC 1928 fragment reassembly: ordering, destinations, timer and memory bounds."""

from __future__ import annotations

import os
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from translator.relay.fragments import Reassembler

DEST = ("192.0.2.1", 53)
OTHER = ("2001:db8::1", 53)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def split_for_tests(payload: bytes, sizes: list[int]) -> list[tuple[int, bytes]]:
    """Cut payload into fragments of the given sizes (the rest goes last) with RFC FRAGs."""
    pieces: list[bytes] = []
    offset = 0
    for size in sizes:
        pieces.append(payload[offset : offset + size])
        offset += size
    pieces.append(payload[offset:])
    return [
        (position | (0x80 if position == len(pieces) else 0), piece)
        for position, piece in enumerate(pieces, start=1)
    ]


def make(clock: FakeClock | None = None, **kwargs: Any) -> Reassembler:
    return Reassembler(clock=clock or FakeClock(), **kwargs)


def feed_all(
    reassembler: Reassembler, frags: list[tuple[int, bytes]], dest: Hashable = DEST
) -> list[bytes | None]:
    return [reassembler.feed(frag, dest, data) for frag, data in frags]


def test_standalone_passes_through() -> None:
    r = make()
    assert r.feed(0, DEST, b"hello") == b"hello"
    assert r.stats.standalone == 1
    assert not r.pending


def test_in_order_sequence_is_delivered_once_at_the_end() -> None:
    r = make()
    frags = split_for_tests(b"abcdefghij", [3, 3, 3])
    assert [f for f, _ in frags] == [1, 2, 3, 0x84]
    results = feed_all(r, frags)
    assert results == [None, None, None, b"abcdefghij"]
    assert r.stats.completed == 1
    assert not r.pending and r.buffered_bytes == 0 and r.next_deadline() is None


def test_single_fragment_sequence() -> None:
    r = make()
    assert r.feed(0x81, DEST, b"whole") == b"whole"
    assert r.stats.completed == 1


def test_two_sequences_back_to_back() -> None:
    r = make()
    assert feed_all(r, [(1, b"a"), (0x82, b"b"), (1, b"c"), (0x82, b"d")]) == [
        None,
        b"ab",
        None,
        b"cd",
    ]
    assert r.stats.completed == 2


def test_lower_position_abandons_and_restarts_at_one() -> None:
    r = make()
    # 1, 2, then 1 again: the first sequence is dropped, the new one completes.
    assert feed_all(r, [(1, b"x"), (2, b"y"), (1, b"A"), (0x82, b"B")]) == [None, None, None, b"AB"]
    assert r.stats.dropped_out_of_order == 1
    assert r.stats.discarded_fragments == 2
    assert r.stats.completed == 1


def test_out_of_order_drops_the_sequence_and_its_tail() -> None:
    r = make()
    # 1, 3, 2, 4|end: swapping 2 and 3 must never yield a payload.
    results = feed_all(r, [(1, b"a"), (3, b"c"), (2, b"b"), (0x84, b"d")])
    assert results == [None, None, None, None]
    assert r.stats.completed == 0
    assert r.stats.dropped_out_of_order == 3  # the sequence, then two orphans
    assert r.stats.discarded_fragments == 4
    assert not r.pending


def test_duplicate_position_abandons() -> None:
    r = make()
    assert feed_all(r, [(1, b"a"), (2, b"b"), (2, b"b"), (0x83, b"c")]) == [None] * 4
    assert r.stats.completed == 0


def test_gap_drops_the_sequence() -> None:
    r = make()
    assert feed_all(r, [(1, b"a"), (2, b"b"), (0x84, b"d")]) == [None, None, None]
    assert r.stats.dropped_out_of_order == 1
    assert r.stats.discarded_fragments == 3
    assert not r.pending


def test_sequence_without_its_start_is_never_delivered() -> None:
    r = make()
    assert feed_all(r, [(2, b"b"), (0x83, b"c")]) == [None, None]
    assert r.stats.dropped_out_of_order == 2
    assert not r.pending


def test_frag_0x80_is_invalid_and_abandons() -> None:
    r = make()
    assert feed_all(r, [(1, b"a"), (0x80, b"?"), (0x82, b"b")]) == [None, None, None]
    assert r.stats.completed == 0
    assert r.feed(0x80, DEST, b"?") is None


def test_standalone_interleaved_abandons_pending_but_is_delivered() -> None:
    r = make()
    assert feed_all(r, [(1, b"a"), (0, b"solo"), (0x82, b"b")]) == [None, b"solo", None]
    assert r.stats.dropped_interrupted == 1
    assert r.stats.standalone == 1
    assert r.stats.completed == 0


def test_destination_change_abandons() -> None:
    r = make()
    assert r.feed(1, DEST, b"a") is None
    assert r.feed(0x82, OTHER, b"b") is None  # continuation, but to another destination
    assert r.stats.dropped_interrupted == 1
    assert r.stats.dropped_out_of_order == 0  # one reason per datagram
    assert r.stats.completed == 0
    # A new sequence to the other destination starting at 1 is fine.
    assert r.feed(1, DEST, b"a") is None
    assert r.feed(1, OTHER, b"x") is None
    assert r.feed(0x82, OTHER, b"y") == b"xy"
    assert r.stats.dropped_interrupted == 2


def test_timeout_with_fake_clock() -> None:
    clock = FakeClock()
    r = make(clock, timeout=5.0)
    assert r.next_deadline() is None
    r.feed(1, DEST, b"a")
    assert r.next_deadline() == clock.now + 5.0
    clock.now += 4.9
    r.feed(2, DEST, b"b")
    r.expire()
    assert r.pending
    # Later fragments do not extend the timer.
    assert r.next_deadline() == clock.now - 4.9 + 5.0
    clock.now += 0.1
    r.expire()
    assert not r.pending
    assert r.stats.dropped_timeout == 1
    assert r.stats.discarded_fragments == 2
    assert r.next_deadline() is None


def test_timeout_is_checked_lazily_in_feed() -> None:
    clock = FakeClock()
    r = make(clock)
    r.feed(1, DEST, b"a")
    clock.now += 6
    # The tail arrives too late: the expired sequence is gone, the tail is an orphan.
    assert r.feed(0x82, DEST, b"b") is None
    assert r.stats.dropped_timeout == 1
    assert r.stats.completed == 0


def test_timer_below_five_seconds_is_refused() -> None:
    with pytest.raises(ValueError, match="5 s"):
        make(timeout=4.99)


def test_byte_overflow_drops_the_sequence() -> None:
    r = make(max_bytes=10)
    assert feed_all(r, [(1, b"12345"), (2, b"12345")]) == [None, None]
    assert r.buffered_bytes == 10
    assert r.feed(0x83, DEST, b"x") is None  # 11 bytes would exceed the bound
    assert r.stats.dropped_overflow == 1
    assert r.stats.discarded_fragments == 3
    assert r.buffered_bytes == 0 and not r.pending
    # Exactly max_bytes is allowed.
    assert feed_all(r, [(1, b"12345"), (0x82, b"12345")]) == [None, b"1234512345"]


def test_single_oversized_fragment_is_dropped() -> None:
    r = make(max_bytes=4)
    assert r.feed(0x81, DEST, b"12345") is None
    assert r.feed(1, DEST, b"12345") is None
    assert r.stats.dropped_overflow == 2
    assert not r.pending
    # Standalone datagrams are not reassembled, so not bounded here.
    assert r.feed(0, DEST, b"12345") == b"12345"


def test_fragment_count_overflow() -> None:
    r = make(max_fragments=3)
    assert feed_all(r, [(1, b"a"), (2, b"b"), (0x83, b"c")])[-1] == b"abc"
    assert feed_all(r, [(1, b"a"), (2, b"b"), (3, b"c"), (0x84, b"d")]) == [None] * 4
    assert r.stats.dropped_overflow == 1
    assert r.stats.completed == 1


def test_full_127_fragment_sequence() -> None:
    r = make()
    frags = split_for_tests(bytes(range(127)), [1] * 126)
    assert frags[-1][0] == 0xFF
    assert feed_all(r, frags)[-1] == bytes(range(127))


def test_flood_of_tiny_fragments_stays_bounded() -> None:
    r = make(max_bytes=1000)
    for round_ in range(200):
        for position in range(1, 128):
            r.feed(position, DEST, b"x" * (round_ % 3))
            assert r.buffered_bytes <= 1000
    # 200 rounds of 1..127 without an end bit: each restart at 1 abandons the previous.
    assert r.stats.completed == 0
    assert r.stats.dropped_out_of_order == 199


def test_flood_of_orphans_buffers_nothing() -> None:
    r = make()
    for _ in range(10_000):
        assert r.feed(5, DEST, b"junk") is None
    assert r.buffered_bytes == 0
    assert r.stats.discarded_fragments == 10_000


def test_frag_outside_an_octet_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        make().feed(256, DEST, b"")


# Biased towards short, nearly valid sequences so that completions, splices and restarts
# actually occur; any octet can still show up.
frag_values = st.one_of(st.sampled_from([0, 1, 2, 3, 0x81, 0x82, 0x83, 0x84]), st.integers(0, 255))
feeds = st.lists(
    st.tuples(
        frag_values,
        st.sampled_from([DEST, OTHER]),
        st.binary(max_size=40),
        st.sampled_from([0.0, 0.0, 0.5, 2.0, 5.0]),
    ),
    max_size=200,
)


def completes(
    history: list[tuple[int, Hashable, bytes, float]], max_bytes: int, limit: int
) -> bool:
    """The model: the last datagram ends a sequence iff the last k datagrams are positions
    1..k (only the k-th with the end bit), to one destination, within 5 s of the first,
    within both bounds. Whatever came before is irrelevant: position 1 always starts afresh."""
    frag = history[-1][0]
    count = frag & 0x7F
    if not frag & 0x80 or count == 0 or count > len(history) or count > limit:
        return False
    tail = history[-count:]
    return (
        [f for f, _, _, _ in tail] == [*range(1, count), frag]
        and len({d for _, d, _, _ in tail}) == 1
        and tail[-1][3] - tail[0][3] < 5.0
        and sum(len(d) for _, _, d, _ in tail) <= max_bytes
    )


@settings(
    max_examples=5000 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(feeds, st.integers(1, 120), st.integers(1, 127))
def test_any_feed_sequence_matches_the_model_and_stays_bounded(
    ops: list[tuple[int, tuple[str, int], bytes, float]], max_bytes: int, max_fragments: int
) -> None:
    clock = FakeClock()
    r = Reassembler(clock=clock, max_bytes=max_bytes, max_fragments=max_fragments)
    history: list[tuple[int, Hashable, bytes, float]] = []
    for frag, dest, data, delay in ops:
        clock.now += delay
        history.append((frag, dest, data, clock.now))
        result = r.feed(frag, dest, data)
        assert r.buffered_bytes <= max_bytes
        if frag == 0:
            assert result == data
        elif completes(history, max_bytes, max_fragments):
            count = frag & 0x7F
            assert result == b"".join(d for _, _, d, _ in history[-count:])
        else:
            assert result is None
        deadline = r.next_deadline()
        assert (deadline is None) == (not r.pending)
        if deadline is not None:
            assert deadline > clock.now
