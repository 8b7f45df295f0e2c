"""REALID generation and the quarantine of freed REALIDs.

Both pieces are private to the table but live apart so each can be read on its own.
"""

from __future__ import annotations

import hashlib
import heapq
import os
from array import array

ID_BITS = 24
MAX_REALID = (1 << ID_BITS) - 1  # REALID is 3 octets on the wire (profile section 3)
_ID_MASK = MAX_REALID
_BLOCK_WORDS = 1024  # candidate IDs per SHAKE-256 call


class IdStream:
    """An endless stream of unpredictable 24-bit values.

    SHAKE-256 of a secret key and a block counter: an extendable-output function, so
    ``SHAKE256(key || counter)`` is a keyed PRF (no length extension in SHA-3) and one
    call yields a block of 1024 values. Without the key the next value cannot be guessed
    from earlier ones. With the same secret the stream repeats, which makes tests
    reproducible; pass ``secret=None`` for a fresh random key. Values are uniform over
    0..2**24-1; the caller rejects 0 and IDs in use.
    """

    __slots__ = ("_counter", "_key", "_pending")

    def __init__(self, secret: bytes | None) -> None:
        material = os.urandom(32) if secret is None else secret
        # Derive a fixed-size key so any secret length works and an empty one still keys.
        self._key = hashlib.blake2b(material, digest_size=32, person=b"socks64-addrmap").digest()
        self._counter = 0
        self._pending = array("I")

    def next(self) -> int:
        """Return the next value of the stream."""
        if not self._pending:
            self._refill()
        return self._pending.pop() & _ID_MASK

    def _refill(self) -> None:
        block = hashlib.shake_256(self._key + self._counter.to_bytes(8, "little"))
        self._counter += 1
        words = array("I")
        words.frombytes(block.digest(_BLOCK_WORDS * words.itemsize))
        self._pending = words


class Quarantine:
    """Freed REALIDs that must not be handed out again for ``period`` seconds.

    Membership is a 2 MiB bitmap over the whole 24-bit ID space, so the cost per
    quarantined ID is 4 octets in a bucket array, whatever the churn. IDs are bucketed by
    the time their quarantine ends, rounded up to ``period / 1024``, and a heap of bucket
    keys gives the next bucket due: no ID leaves early and none more than ``period / 1024``
    late, in whatever order IDs arrive. Release may stop after a budget, so cleaning is
    amortised: each ID is added once and removed once.
    """

    __slots__ = ("_bucket_heap", "_buckets", "_count", "_window", "bitmap", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self._window = period / 1024
        # Bit ``realid`` set while quarantined; public so the table can test it inline.
        self.bitmap = bytearray(1 << (ID_BITS - 3))
        self._buckets: dict[int, array[int]] = {}
        self._bucket_heap: list[int] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, realid: int) -> bool:
        return bool(self.bitmap[realid >> 3] & (1 << (realid & 7)))

    def add(self, realid: int, freed_at: float) -> float:
        """Quarantine ``realid`` from ``freed_at`` on (times may arrive in any order).

        Returns when it will be released (infinity when quarantine is disabled).
        """
        if self.period <= 0:
            return float("inf")
        # The bucket's start time lies after freed_at + period, float rounding included.
        bucket = int((freed_at + self.period) // self._window) + 1
        ids = self._buckets.get(bucket)
        if ids is None:
            ids = self._buckets[bucket] = array("I")
            heapq.heappush(self._bucket_heap, bucket)
        ids.append(realid)
        self.bitmap[realid >> 3] |= 1 << (realid & 7)
        self._count += 1
        return bucket * self._window

    def items(self) -> list[tuple[int, float]]:
        """Every quarantined value with the time it will be released (for saving state)."""
        return [
            (value, bucket * self._window)
            for bucket, values in self._buckets.items()
            for value in values
        ]

    def next_release(self) -> float:
        """When the next IDs may be released (infinity when none are quarantined)."""
        if not self._bucket_heap:
            return float("inf")
        return self._bucket_heap[0] * self._window

    def release(self, now: float, budget: int | None) -> int:
        """Release IDs whose quarantine has ended, at most ``budget`` of them."""
        released = 0
        heap = self._bucket_heap
        bitmap = self.bitmap
        while heap and heap[0] * self._window <= now:
            ids = self._buckets[heap[0]]
            while ids:
                if budget is not None and released >= budget:
                    self._count -= released
                    return released
                realid = ids.pop()
                bitmap[realid >> 3] &= ~(1 << (realid & 7)) & 0xFF
                released += 1
            del self._buckets[heapq.heappop(heap)]
        self._count -= released
        return released
