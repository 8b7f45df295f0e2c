"""RFC 1928 section 7 fragment reassembly for one UDP association, sans I/O.

Theory of operation. A UDP request header carries FRAG: X'00' is a standalone datagram;
otherwise the low seven bits are the fragment's position (1..127) in a sequence and the high
bit (X'80') marks the last fragment. Each association owns one reassembly queue and one
timer (RFC 1928: "no less than 5 seconds"). We read the RFC strictly, so that a partial or
spliced payload can never be delivered:

- A sequence starts at position 1 and continues with exactly the next position, to the same
  destination. It completes on the fragment carrying the end bit; ``feed`` returns the
  concatenated payload. X'81' is a whole one-fragment sequence.
- A repeated or lower position (the RFC's "less than the highest FRAG value processed"), or
  a gap (a higher position than the next one), abandons the pending sequence
  (``dropped_out_of_order``). If that datagram is position 1 it starts a new sequence;
  otherwise it is discarded too.
- A datagram to another destination, or a standalone (X'00') datagram, abandons the pending
  sequence (``dropped_interrupted``) and is then handled as if nothing were pending: the
  standalone one is delivered, the other starts a sequence only at position 1.
- A fragment with no sequence pending and a position other than 1 (its start was lost or
  abandoned) is discarded (``dropped_out_of_order``); so is X'80' (position 0 with the end
  bit), which no sequence can contain.
- The timer starts at a sequence's first fragment and is not extended by later ones: a
  sequence still pending ``timeout`` seconds later is abandoned (``dropped_timeout``), by
  ``expire()`` or lazily by the next ``feed``.
- Memory is bounded: a sequence whose payload would exceed ``max_bytes`` or whose fragment
  count would exceed ``max_fragments`` is abandoned (``dropped_overflow``) together with
  the datagram that would have overflowed it. So at most ``max_bytes`` are ever buffered,
  and no reassembled payload is longer than ``max_bytes``.

Each ``feed`` call increments at most one ``dropped_*`` counter; ``discarded_fragments``
counts every fragment datagram thrown away (buffered ones included) for whatever reason.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

END_OF_SEQUENCE = 0x80
POSITION_MASK = 0x7F
MAX_POSITION = 127
MIN_TIMEOUT = 5.0  # RFC 1928 section 7: the reassembly timer MUST be no less than 5 s


@dataclass(slots=True)
class ReassemblyStats:
    """Counters for one association's reassembly queue."""

    standalone: int = 0  # FRAG X'00' datagrams passed through
    completed: int = 0  # sequences delivered whole
    dropped_timeout: int = 0
    dropped_out_of_order: int = 0  # lower, repeated or skipped position; orphan fragment
    dropped_interrupted: int = 0  # pending sequence cut by FRAG 0 or another destination
    dropped_overflow: int = 0
    discarded_fragments: int = 0  # fragment datagrams thrown away, whatever the reason


class Reassembler:
    """One association's reassembly queue and timer (see the module docstring)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        timeout: float = MIN_TIMEOUT,
        max_bytes: int = 256 * 1024,
        max_fragments: int = MAX_POSITION,
    ) -> None:
        if timeout < MIN_TIMEOUT:
            raise ValueError(f"RFC 1928 needs a reassembly timer of at least 5 s, not {timeout}")
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if not 1 <= max_fragments <= MAX_POSITION:
            raise ValueError(f"max_fragments must be within 1..{MAX_POSITION}")
        self._clock = clock
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._max_fragments = max_fragments
        self.stats = ReassemblyStats()
        # The pending sequence: its destination, fragments so far, size and start time.
        self._destination: Hashable | None = None
        self._fragments: list[bytes] = []
        self._buffered = 0
        self._started = 0.0

    @property
    def pending(self) -> bool:
        """Whether a sequence is waiting for more fragments."""
        return bool(self._fragments)

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the pending sequence (never more than ``max_bytes``)."""
        return self._buffered

    def feed(self, frag: int, destination_key: Hashable, data: bytes) -> bytes | None:
        """Take one datagram's FRAG, destination and data.

        Returns the data of a standalone datagram, the whole payload when this datagram
        completes a sequence, and None when it was buffered or discarded. Never raises for
        any FRAG in 0..255.
        """
        if not 0 <= frag <= 0xFF:
            raise ValueError(f"FRAG is one octet, not {frag}")
        self.expire()
        if frag == 0:
            if self._fragments:
                self._abandon("dropped_interrupted")
            self.stats.standalone += 1
            return data

        position = frag & POSITION_MASK
        last = bool(frag & END_OF_SEQUENCE)
        counted = False
        if self._fragments and destination_key != self._destination:
            self._abandon("dropped_interrupted")
            counted = True
        if self._fragments and position != len(self._fragments) + 1:
            self._abandon("dropped_out_of_order")
            counted = True
        if not self._fragments and position != 1:
            # Orphan: its start was lost or abandoned, or it is X'80'.
            if not counted:
                self.stats.dropped_out_of_order += 1
            self.stats.discarded_fragments += 1
            return None

        if (
            self._buffered + len(data) > self._max_bytes
            or len(self._fragments) + 1 > self._max_fragments
        ):
            self.stats.discarded_fragments += 1
            if self._fragments:
                self._abandon("dropped_overflow")
            else:
                self.stats.dropped_overflow += 1
            return None

        if not self._fragments:
            self._destination = destination_key
            self._started = self._clock()
        if last:
            payload = b"".join(self._fragments) + data
            self._reset()
            self.stats.completed += 1
            return payload
        self._fragments.append(bytes(data))
        self._buffered += len(data)
        return None

    def expire(self) -> None:
        """Abandon the pending sequence if its timer has run out."""
        deadline = self.next_deadline()
        if deadline is not None and self._clock() >= deadline:
            self._abandon("dropped_timeout")

    def next_deadline(self) -> float | None:
        """When ``expire()`` should next be called (clock time), or None if nothing waits."""
        if not self._fragments:
            return None
        return self._started + self._timeout

    def clear(self) -> None:
        """Forget the pending sequence without counting it (the association is ending)."""
        self._reset()

    def _abandon(self, reason: str) -> None:
        setattr(self.stats, reason, getattr(self.stats, reason) + 1)
        self.stats.discarded_fragments += len(self._fragments)
        self._reset()

    def _reset(self) -> None:
        self._destination = None
        self._fragments = []
        self._buffered = 0
        self._started = 0.0
