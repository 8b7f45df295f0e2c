"""Prometheus metrics for one gateway: the names, the labels, the collectors.

``translator.net.exporter.MetricsServer`` serves them over HTTP.

Each gateway owns a :class:`Metrics` with a private ``CollectorRegistry``: several gateways
may run in one process (the tests do), so the global ``REGISTRY`` is never used.

No label ever carries a client address, a user name or a destination name: labels hold
only small fixed vocabularies (commands, reasons, families, REP codes) and the gateway's
own listener endpoints, so the series count stays bounded and scrapes leak no traffic data.

This module sits below the gateway layer: it imports only the standard library and
``prometheus_client``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = [
    "DURATION_BUCKETS",
    "Metric",
    "Metrics",
    "table_metrics",
    "transparent_metrics",
    "udp_metrics",
]

#: histogram observations kept for the next flush at most (scrapes flush them too)
_MAX_OBSERVED = 1024

DURATION_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class _Flush:
    """Registered first: applies the hot paths' pending counts before anything is read."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def collect(self) -> Iterable[Metric]:
        self._flush()
        return ()


class _Source:
    """Adapts a callable to the registry's collector protocol (read at scrape time)."""

    def __init__(self, source: Callable[[], Iterable[Metric]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        return list(self._source())


class Metrics:
    """The gateway's metrics, in a registry of their own.

    The attributes are the raw prometheus_client metrics; the methods are the hot-path
    helpers, which cache label children so a call costs a dict lookup and an increment
    instead of the library's per-call label validation. The increments themselves wait in
    a plain dict until the registry is read (``flush``, run first by every collection):
    a child's ``inc`` takes a lock and checks itself each time, and a session makes a
    dozen of them. Read the values through the registry (``render``), or ``flush`` first.
    """

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        #: label child (counter or gauge) -> amount not yet added to it
        self._pending: dict[Any, float] = {}
        #: (histogram child, value) not yet observed
        self._observed: list[tuple[Any, float]] = []
        r.register(_Flush(self.flush))  # before every metric: collections run in order
        self.connections_accepted = Counter(
            "socks64_connections_accepted_total",
            "Client connections accepted, by listener.",
            ["listener"],
            registry=r,
        )
        self.connections_rejected = Counter(
            "socks64_connections_rejected_total",
            "Client connections closed at accept, by reason.",
            ["reason"],
            registry=r,
        )
        self.accept_paused = Counter(
            "socks64_accept_paused_total",
            "Times accepting was paused on descriptor or memory exhaustion, by errno.",
            ["reason"],
            registry=r,
        )
        self.sessions_active = Gauge(
            "socks64_sessions_active",
            "Client sessions in progress, by current command.",
            ["command"],
            registry=r,
        )
        self.sessions_finished = Counter(
            "socks64_sessions_total",
            "Client sessions finished, by command and how they ended.",
            ["command", "end"],
            registry=r,
        )
        self.requests = Counter(
            "socks64_requests_total",
            "Requests answered, by command, address type and REP.",
            ["command", "atyp", "rep"],
            registry=r,
        )
        self.auth = Counter(
            "socks64_auth_total",
            "Authentication outcomes, by method.",
            ["method", "result"],
            registry=r,
        )
        self.relayed_bytes = Counter(
            "socks64_relayed_bytes_total",
            "Payload bytes relayed, by protocol, direction and destination family.",
            ["protocol", "direction", "family"],
            registry=r,
        )
        self.translations = Counter(
            "socks64_translations_total",
            "Relays by client and destination family (TCP: connections, UDP: datagrams).",
            ["protocol", "client_family", "destination_family"],
            registry=r,
        )
        self.connect_seconds = Histogram(
            "socks64_connect_duration_seconds",
            "Outbound connect time, by destination family.",
            ["family"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.dns_seconds = Histogram(
            "socks64_dns_duration_seconds",
            "Name resolution time.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.config_reloads = Counter(
            "socks64_config_reloads_total",
            "Configuration reloads, by result.",
            ["result"],
            registry=r,
        )
        for result in ("ok", "error"):  # present from the start: alerts see the first error
            self.config_reloads.labels(result)
        self.listeners = Gauge(
            "socks64_listener_info",
            "1 for each open client listener.",
            ["endpoint"],
            registry=r,
        )
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self._listener_set: set[str] = set()
        # Label children cached by label tuple: the hot paths skip labels() entirely.
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._byte_children: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self._translation_children: dict[tuple[str, str, str], Counter] = {}
        self._active_children: dict[str, Gauge] = {}
        self._finished_children: dict[tuple[str, str], Counter] = {}
        self._accepted_children: dict[str, Counter] = {}
        self._auth_children: dict[tuple[str, str], Counter] = {}

    # --- hot paths -------------------------------------------------------------------

    def flush(self) -> None:
        """Add the pending counts to the metrics (every collection does this first)."""
        pending, observed = self._pending, self._observed
        if pending:
            self._pending = {}
            for child, amount in pending.items():
                if amount:
                    child.inc(amount)  # a gauge's may be negative: Gauge.inc takes it
        if observed:
            self._observed = []
            for histogram, value in observed:
                histogram.observe(value)

    def observe(self, histogram: Any, value: float) -> None:
        """``histogram.observe(value)`` (a label child), at the next flush."""
        observed = self._observed
        observed.append((histogram, value))
        if len(observed) >= _MAX_OBSERVED:  # nobody scrapes: keep the list short
            self.flush()

    def request(self, command: str, atyp: str, rep: int) -> None:
        """Count one answered request; ``rep`` is the SOCKS REP code."""
        key = (command, atyp, rep)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(command, atyp, str(rep))
        pending = self._pending
        pending[child] = pending.get(child, 0) + 1

    def bytes_relayed(self, protocol: str, family: str, up: int, down: int) -> None:
        """Add relayed payload; ``family`` is the destination's, ``up`` is client->destination."""
        key = (protocol, family)
        pair = self._byte_children.get(key)
        if pair is None:
            pair = self._byte_children[key] = (
                self.relayed_bytes.labels(protocol, "up", family),
                self.relayed_bytes.labels(protocol, "down", family),
            )
        pending = self._pending
        if up:
            pending[pair[0]] = pending.get(pair[0], 0) + up
        if down:
            pending[pair[1]] = pending.get(pair[1], 0) + down

    def translation(
        self, protocol: str, client_family: str, destination_family: str, n: int = 1
    ) -> None:
        """Count relays between families (TCP: per connection, UDP: per datagram)."""
        key = (protocol, client_family, destination_family)
        child = self._translation_children.get(key)
        if child is None:
            child = self._translation_children[key] = self.translations.labels(*key)
        pending = self._pending
        pending[child] = pending.get(child, 0) + n

    def _active(self, command: str) -> Gauge:
        child = self._active_children.get(command)
        if child is None:
            child = self._active_children[command] = self.sessions_active.labels(command)
        return child

    def session_started(self, command: str) -> None:
        """A session began (usually as ``handshake``)."""
        child = self._active(command)
        pending = self._pending
        pending[child] = pending.get(child, 0) + 1

    def session_changed(self, old: str, new: str) -> None:
        """A session moved on to another command (handshake -> CONNECT, ...)."""
        if old != new:
            was, now = self._active(old), self._active(new)
            pending = self._pending
            pending[was] = pending.get(was, 0) - 1
            pending[now] = pending.get(now, 0) + 1

    def session_ended(self, command: str, end: str) -> None:
        """A session under ``command`` finished; ``end`` says how (ok, refused, ...)."""
        active = self._active(command)
        key = (command, end)
        child = self._finished_children.get(key)
        if child is None:
            child = self._finished_children[key] = self.sessions_finished.labels(command, end)
        pending = self._pending
        pending[active] = pending.get(active, 0) - 1
        pending[child] = pending.get(child, 0) + 1

    def connection_accepted(self, listener: str) -> None:
        child = self._accepted_children.get(listener)
        if child is None:
            child = self._accepted_children[listener] = self.connections_accepted.labels(listener)
        pending = self._pending
        pending[child] = pending.get(child, 0) + 1

    # --- colder paths ----------------------------------------------------------------

    def connection_rejected(self, reason: str) -> None:
        self.connections_rejected.labels(reason).inc()

    def accept_pause(self, reason: str) -> None:
        """Accepting paused on ``reason`` (an errno name such as EMFILE)."""
        self.accept_paused.labels(reason).inc()

    def auth_result(self, method: str, result: str) -> None:
        key = (method, result)
        child = self._auth_children.get(key)
        if child is None:
            child = self._auth_children[key] = self.auth.labels(method, result)
        pending = self._pending
        pending[child] = pending.get(child, 0) + 1

    def config_reload(self, ok: bool) -> None:
        self.config_reloads.labels("ok" if ok else "error").inc()

    def set_listeners(self, endpoints: Iterable[str]) -> None:
        """Make ``socks64_listener_info`` list exactly the open listeners."""
        now = set(endpoints)
        for gone in self._listener_set - now:
            self.listeners.remove(gone)
        for endpoint in now:
            self.listeners.labels(endpoint).set(1)
        self._listener_set = now

    def add_source(self, source: Callable[[], Iterable[Metric]]) -> None:
        """Register metrics computed at scrape time from ``source()`` (on the event loop)."""
        self.registry.register(_Source(source))

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        """The text exposition of everything in this registry."""
        return generate_latest(self.registry)


def table_metrics(
    live: int,
    pinned: int,
    quarantined: int,
    issued: int,
    freed: int,
    quota_refusals: int,
    capacity_refusals: int,
) -> list[Metric]:
    """Metric families for the ADDRESS ID table, for an :meth:`Metrics.add_source` source."""
    refused = CounterMetricFamily(
        "socks64_address_ids_refused", "ADDRESS IDs refused, by reason.", labels=["reason"]
    )
    refused.add_metric(["quota"], quota_refusals)
    refused.add_metric(["capacity"], capacity_refusals)
    return [
        GaugeMetricFamily("socks64_address_ids", "ADDRESS IDs live.", value=live),
        GaugeMetricFamily(
            "socks64_address_ids_pinned", "ADDRESS IDs pinned by a session.", value=pinned
        ),
        GaugeMetricFamily(
            "socks64_address_ids_quarantined",
            "Freed ADDRESS IDs not yet reusable.",
            value=quarantined,
        ),
        CounterMetricFamily("socks64_address_ids_issued", "ADDRESS IDs issued.", value=issued),
        CounterMetricFamily(
            "socks64_address_ids_expired", "ADDRESS IDs expired and freed.", value=freed
        ),
        refused,
    ]


def udp_metrics(
    active: int,
    datagrams_up: int,
    datagrams_down: int,
    dropped: Mapping[str, int],
    evictions: int,
) -> list[Metric]:
    """Metric families for the UDP relays, for an :meth:`Metrics.add_source` source."""
    datagrams = CounterMetricFamily(
        "socks64_udp_datagrams", "UDP datagrams relayed, by direction.", labels=["direction"]
    )
    datagrams.add_metric(["up"], datagrams_up)
    datagrams.add_metric(["down"], datagrams_down)
    drops = CounterMetricFamily(
        "socks64_udp_dropped", "UDP datagrams dropped, by reason.", labels=["reason"]
    )
    for reason, count in sorted(dropped.items()):
        drops.add_metric([reason], count)
    return [
        GaugeMetricFamily(
            "socks64_udp_associations_active", "UDP associations open.", value=active
        ),
        datagrams,
        drops,
        CounterMetricFamily(
            "socks64_udp_peer_evictions",
            "UDP peers evicted from full association tables.",
            value=evictions,
        ),
    ]


# --- the HTTP endpoint ---------------------------------------------------------------


def transparent_metrics(
    answers: Mapping[str, int],
    flows: Mapping[tuple[str, str], int],
    refusals: Mapping[tuple[str, str], int],
    active: Mapping[str, int],
    bound: int,
    quarantined: int,
    size: int,
) -> list[Metric]:
    """Metric families for the transparent front (DNS46, the pool, intercepted flows)."""
    dns = CounterMetricFamily(
        "socks64_transparent_dns_answers",
        "DNS46 answers, by kind (synthesized, forwarded, empty, ptr, refused, servfail, formerr).",
        labels=["answer"],
    )
    for answer, count in sorted(answers.items()):
        dns.add_metric([answer], count)
    intercepted = CounterMetricFamily(
        "socks64_transparent_flows",
        "Intercepted flows relayed, by protocol and the family of the destination reached.",
        labels=["protocol", "family"],
    )
    for (protocol, family), count in sorted(flows.items()):
        intercepted.add_metric([protocol, family], count)
    refused = CounterMetricFamily(
        "socks64_transparent_refusals",
        "Intercepted flows refused, by protocol and reason.",
        labels=["protocol", "reason"],
    )
    for (protocol, reason), count in sorted(refusals.items()):
        refused.add_metric([protocol, reason], count)
    live = GaugeMetricFamily(
        "socks64_transparent_flows_active", "Intercepted flows open.", labels=["protocol"]
    )
    for protocol, count in sorted(active.items()):
        live.add_metric([protocol], count)
    return [
        dns,
        intercepted,
        refused,
        live,
        GaugeMetricFamily(
            "socks64_transparent_pool_bound", "Pool addresses bound to a name.", value=bound
        ),
        GaugeMetricFamily(
            "socks64_transparent_pool_quarantined",
            "Pool addresses freed and not yet reusable.",
            value=quarantined,
        ),
        GaugeMetricFamily(
            "socks64_transparent_pool_size", "Addresses the pool can bind.", value=size
        ),
    ]
