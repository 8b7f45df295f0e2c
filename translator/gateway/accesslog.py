"""One access-log line per finished session, and the session's share of the metrics.

The line goes to the ``socks64.access`` logger at INFO: client, user, command, the
destination as requested and as reached, the family translation, bytes each way, the
duration and how the session ended. With ``--log-format json`` the same fields are the
keys of a JSON object (the record carries them as ``record.access``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from translator.metrics import Metrics
from translator.relay.tcp import RelayStats
from translator.relay.udp import UdpStats
from translator.wire import Rep

access_log = logging.getLogger("socks64.access")

#: how a session ended (the ``end`` label and field)
OK = "ok"
REFUSED = "refused"
TIMEOUT = "timeout"
IDLE = "idle"
CLIENT_GONE = "client_gone"
PROTOCOL_ERROR = "protocol_error"
ERROR = "error"
STOPPED = "stopped"


#: the UdpStats counters of dropped datagrams, by the ``reason`` label they get
UDP_DROP_REASONS = ("policy", "foreign", "malformed", "rate", "unrenderable")


@dataclass(slots=True)
class UdpTotals:
    """Counters of the UDP associations that ended (live ones are read from themselves)."""

    up: int = 0
    down: int = 0
    evictions: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(UDP_DROP_REASONS, 0))

    def add(self, stats: UdpStats) -> None:
        self.up += stats.to_peers
        self.down += stats.to_client
        self.evictions += getattr(stats, "evictions", 0)
        for reason in self.dropped:
            self.dropped[reason] += getattr(stats, f"dropped_{reason}")

    def plus(self, live: list[UdpStats]) -> UdpTotals:
        total = UdpTotals(self.up, self.down, self.evictions, dict(self.dropped))
        for stats in live:
            total.add(stats)
        return total


_FAMILIES = ("ipv4", "ipv6")


class _Flow:
    """One relay's traffic and how much of it the metrics already show."""

    __slots__ = ("client_family", "counted", "family", "stats")

    def __init__(self, stats: RelayStats | UdpStats, client_family: str, family: str) -> None:
        self.stats = stats
        self.client_family = client_family
        self.family = family  # the destination's (TCP); UDP flows count per peer family
        self.counted = [0, 0, 0, 0, 0, 0]


class TrafficMeter:
    """Relayed bytes (and UDP datagrams) into the metrics while they flow, not only when a
    session ends: the gateway flushes every second, and each relay once more at its end.

    The relays count plain integers on their hot paths; the label lookups happen here.
    """

    def __init__(self) -> None:
        self._flows: dict[int, _Flow] = {}

    def begin_tcp(
        self, stats: RelayStats, client_family: str, family: str, metrics: Metrics
    ) -> int:
        metrics.translation("tcp", client_family, family)
        self._flows[id(stats)] = _Flow(stats, client_family, family)
        return id(stats)

    def begin_udp(self, stats: UdpStats, client_family: str) -> int:
        self._flows[id(stats)] = _Flow(stats, client_family, "")
        return id(stats)

    def end(self, token: int, metrics: Metrics) -> None:
        flow = self._flows.pop(token, None)
        if flow is not None:
            _flush(flow, metrics)

    def flush(self, metrics: Metrics) -> None:
        for flow in self._flows.values():
            _flush(flow, metrics)


def _flush(flow: _Flow, metrics: Metrics) -> None:
    stats, counted = flow.stats, flow.counted
    if isinstance(stats, RelayStats):
        up, down = stats.to_peer - counted[0], stats.to_client - counted[1]
        if up or down:
            metrics.bytes_relayed("tcp", flow.family, up, down)
            counted[0], counted[1] = stats.to_peer, stats.to_client
        return
    for v6, family in enumerate(_FAMILIES):
        up = stats.bytes_up[v6] - counted[v6]
        down = stats.bytes_down[v6] - counted[2 + v6]
        datagrams = stats.datagrams_up[v6] - counted[4 + v6]
        if up or down:
            metrics.bytes_relayed("udp", family, up, down)
            counted[v6], counted[2 + v6] = stats.bytes_up[v6], stats.bytes_down[v6]
        if datagrams:
            metrics.translation("udp", flow.client_family, family, datagrams)
            counted[4 + v6] = stats.datagrams_up[v6]


def family_name(version: int) -> str:
    return "ipv6" if version == 6 else "ipv4"


@dataclass(slots=True)
class SessionRecord:
    """What one client connection did, filled in by the session as it goes."""

    client: object  # its str() names the client: built only when the line is written
    client_family: str
    metrics: Metrics
    started: float = field(default_factory=time.monotonic)
    user: str | None = None
    command: str = "handshake"
    requested: str = "-"
    reached: str = "-"
    destination_family: str | None = None
    up: int = 0
    down: int = 0
    unit: str = "bytes"  # "datagrams" for a UDP association
    end: str = CLIENT_GONE
    rep: int | None = None
    reason: str | None = None  # why it ended, when not simply done

    def __post_init__(self) -> None:
        self.metrics.session_started(self.command)

    def doing(self, command: str) -> None:
        """The session now serves ``command`` (it moves between the active gauges)."""
        if command != self.command:
            self.metrics.session_changed(self.command, command)
            self.command = command

    def refused(self, rep: int, reason: str) -> None:
        self.end = REFUSED
        self.rep = rep
        self.reason = reason

    def finish(self) -> None:
        """Log the access line and count the session; call exactly once."""
        self.metrics.session_ended(self.command, self.end)
        if not access_log.isEnabledFor(logging.INFO):
            return
        translation = (
            f"{self.client_family}->{self.destination_family}"
            if self.destination_family
            else self.client_family
        )
        end = self.end if self.rep is None else f"{self.end} REP {self.rep} {Rep(self.rep).name}"
        if self.reason:
            end = f"{end}: {self.reason}"
        line = (
            f"{self.client}: user={self.user or '-'} {self.command} {self.requested} -> "
            f"{self.reached} {translation} up={self.up} down={self.down} {self.unit} "
            f"{time.monotonic() - self.started:.3f}s {end}"
        )
        # One line per session is on the session-rate path: skip logging's caller lookup
        # (a stack walk); the JSON formatter asks the record for its fields only if used.
        access_log.handle(
            access_log.makeRecord(
                access_log.name, logging.INFO, __file__, 0, line, (), None, extra={"access": self}
            )
        )

    def fields(self) -> dict[str, Any]:
        return {
            "client": str(self.client),
            "user": self.user,
            "command": self.command,
            "requested": self.requested,
            "reached": self.reached,
            "client_family": self.client_family,
            "destination_family": self.destination_family,
            "up": self.up,
            "down": self.down,
            "unit": self.unit,
            "duration": round(time.monotonic() - self.started, 3),
            "end": self.end,
            "rep": self.rep,
            "reason": self.reason,
        }
