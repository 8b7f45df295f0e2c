"""Name resolution for the gateway (wire profile section 5a): a thin layer over aiodns.

Theory of operation: a name is validated and lower-cased first; an IP literal is its own
answer. Then, in order and stopping at the first that knows the name:

1. ``localhost`` and ``*.localhost`` are loopback, without a query (RFC 6761 section 6.3);
2. the hosts file (re-read when it changes);
3. DNS through the configured nameservers, A and AAAA queried in parallel.

DNS answers are kept in a bounded LRU cache for the smallest TTL of the answer; NXDOMAIN
and NODATA are kept for ``negative_ttl``; transient failures (timeout, SERVFAIL, ...) are
not kept. Concurrent lookups of the same name share one query. Every lookup ends within
``timeout * tries`` seconds, whatever c-ares does with its retries.

aiodns 4 / pycares 5: ``DNSResolver.query_dns()`` returns a ``pycares.DNSResult`` whose
``answer`` holds ``DNSRecord(type, ttl, data)``; failures raise ``aiodns.error.DNSError``
with a c-ares status code in ``args[0]``. Nameservers are set as c-ares CSV strings,
``IP:PORT`` / ``[IPv6]:PORT``. c-ares keeps its own TTL-bounded query cache underneath
ours; pycares offers no switch for it, and it never outlives a record's TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Generic, TypeVar

import aiodns
import pycares
from aiodns import error as ares_error

from .addresses import IPAddress

__all__ = [
    "HostsFile",
    "IPAddress",
    "ResolveError",
    "ResolveReason",
    "Resolver",
    "ResolverStats",
    "TtlLruCache",
    "normalize_name",
    "parse_nameserver",
]


_LOOPBACK: tuple[IPAddress, ...] = (IPv6Address("::1"), IPv4Address("127.0.0.1"))
_MAX_NAME_LENGTH = 253  # RFC 1035 section 2.3.4, in text form without the final dot
_MAX_LABEL_LENGTH = 63


class ResolveReason(StrEnum):
    """Why a name did not resolve. Compares equal to its string value."""

    INVALID = "invalid"  # not a usable name (NUL, control octets, bad label lengths)
    NXDOMAIN = "nxdomain"  # the name does not exist
    NODATA = "nodata"  # the name exists but has no record of the asked type
    WRONG_FAMILY = "wrong_family"  # an IP literal of the other family was asked for
    TIMEOUT = "timeout"  # no answer within timeout * tries
    UNREACHABLE = "unreachable"  # no nameserver could be contacted (e.g. port closed)
    SERVFAIL = "servfail"
    REFUSED = "refused"
    ERROR = "error"  # anything else: malformed answer, resolver closed, ...


class ResolveError(Exception):
    """A name (or an address, for reverse lookups) could not be resolved."""

    def __init__(self, name: str, reason: ResolveReason, detail: str = "") -> None:
        message = f"cannot resolve {name!r}: {reason.value}"
        super().__init__(f"{message} ({detail})" if detail else message)
        self.name = name
        self.reason = reason


# c-ares status -> reason. Unlisted codes map to ERROR.
_ARES_REASONS = {
    ares_error.ARES_ENOTFOUND: ResolveReason.NXDOMAIN,
    ares_error.ARES_ENONAME: ResolveReason.NXDOMAIN,
    ares_error.ARES_ENODATA: ResolveReason.NODATA,
    ares_error.ARES_ETIMEOUT: ResolveReason.TIMEOUT,
    ares_error.ARES_ECONNREFUSED: ResolveReason.UNREACHABLE,
    ares_error.ARES_ESERVFAIL: ResolveReason.SERVFAIL,
    ares_error.ARES_EREFUSED: ResolveReason.REFUSED,
    ares_error.ARES_EBADNAME: ResolveReason.INVALID,
}

# When A and AAAA both fail, the reason reported is the first of these that occurred:
# a definite "no such name" beats a transient failure, which beats "no record of this type".
_REASON_PRIORITY = (
    ResolveReason.INVALID,
    ResolveReason.NXDOMAIN,
    ResolveReason.TIMEOUT,
    ResolveReason.UNREACHABLE,
    ResolveReason.SERVFAIL,
    ResolveReason.REFUSED,
    ResolveReason.ERROR,
    ResolveReason.WRONG_FAMILY,
    ResolveReason.NODATA,
)

_NEGATIVE_REASONS = frozenset({ResolveReason.NXDOMAIN, ResolveReason.NODATA})


def normalize_name(name: str) -> str:
    """Return ``name`` lower-cased, without a final dot, IDNA-encoded if not ASCII.

    Raises ResolveError(reason INVALID) for empty names, NUL / control / non-printable
    characters, whitespace, and names or labels that are too long or empty.
    """
    if any(ord(char) <= 0x20 or ord(char) == 0x7F or not char.isprintable() for char in name):
        raise ResolveError(name, ResolveReason.INVALID, "non-printable or whitespace character")
    text = name[:-1] if name.endswith(".") else name
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ResolveError(name, ResolveReason.INVALID, "not a valid IDN") from exc
    text = text.lower()
    if not text or len(text) > _MAX_NAME_LENGTH:
        raise ResolveError(name, ResolveReason.INVALID, "empty or longer than 253 octets")
    if any(not 0 < len(label) <= _MAX_LABEL_LENGTH for label in text.split(".")):
        raise ResolveError(name, ResolveReason.INVALID, "empty label or label over 63 octets")
    return text


def _ip_literal(name: str) -> IPAddress | None:
    try:
        return ip_address(name)
    except ValueError:
        return None


def _is_localhost(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost")


def parse_nameserver(entry: str) -> str:
    """Turn ``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` into c-ares CSV form (port 53 default).

    Raises ValueError for anything else.
    """
    host, port = entry, 53
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad nameserver {entry!r}")
        if rest:
            port = int(rest[1:])
    elif entry.count(":") == 1:  # IPv4:PORT; a bare IPv6 address has several colons
        host, _, port_text = entry.partition(":")
        port = int(port_text)
    address = ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"bad nameserver port in {entry!r}")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlLruCache(Generic[K, V]):
    """A bounded mapping whose entries expire; the least recently used is evicted first."""

    def __init__(self, capacity: int, clock: Callable[[], float]) -> None:
        self._capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The live value for ``key``, or None (expired entries are dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V, ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds; a ttl of 0 or less keeps nothing."""
        if ttl <= 0 or self._capacity <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class HostsFile:
    """A hosts(5) file, re-read when its mtime or size changes (checked every few seconds)."""

    def __init__(
        self, path: str | None, clock: Callable[[], float], recheck_interval: float = 2.0
    ) -> None:
        self._path = path
        self._clock = clock
        self._recheck_interval = recheck_interval
        self._checked_at: float | None = None
        self._signature: tuple[int, int] | None = None
        self._forward: dict[str, list[IPAddress]] = {}
        self._reverse: dict[IPAddress, str] = {}

    def lookup(self, name: str) -> list[IPAddress]:
        """Addresses listed for ``name`` (already normalised), in file order; may be empty."""
        self._refresh()
        return list(self._forward.get(name, ()))

    def reverse(self, address: IPAddress) -> str | None:
        """The canonical (first) name on the first line listing ``address``."""
        self._refresh()
        return self._reverse.get(address)

    def _refresh(self) -> None:
        if self._path is None:
            return
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self._recheck_interval:
            return
        self._checked_at = now
        try:
            stat = os.stat(self._path)
        except OSError:
            self._signature, self._forward, self._reverse = None, {}, {}
            return
        signature = (stat.st_mtime_ns, stat.st_size)
        if signature != self._signature:
            self._signature = signature
            self._load()

    def _load(self) -> None:
        forward: dict[str, list[IPAddress]] = {}
        reverse: dict[IPAddress, str] = {}
        try:
            with open(self._path or "", encoding="utf-8", errors="replace") as hosts:
                lines = hosts.readlines()
        except OSError:
            lines = []
        for line in lines:
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            address = _ip_literal(fields[0])
            if address is None:
                continue
            names = []
            for field in fields[1:]:
                with contextlib.suppress(ResolveError):
                    names.append(normalize_name(field))
            if not names:
                continue
            reverse.setdefault(address, names[0])
            for name in names:
                known = forward.setdefault(name, [])
                if address not in known:
                    known.append(address)
        self._forward, self._reverse = forward, reverse


@dataclass
class ResolverStats:
    """Counters a test or a status page can read."""

    queries: int = 0  # DNS queries handed to c-ares
    cache_hits: int = 0


_CacheValue = tuple[IPAddress, ...] | str | ResolveReason
_QTYPES: dict[int, str] = {socket.AF_INET: "A", socket.AF_INET6: "AAAA"}


class Resolver:
    """Forward and reverse lookups with the gateway's order: localhost, hosts file, DNS.

    Create it anywhere; the aiodns channel is made on first use inside the running loop.
    Call ``close()`` before that loop ends.
    """

    def __init__(
        self,
        *,
        nameservers: Sequence[str] = (),
        timeout: float = 5.0,
        tries: int = 2,
        cache_size: int = 4096,
        hosts_file: str | None = "/etc/hosts",
        clock: Callable[[], float] = time.monotonic,
        negative_ttl: float = 30.0,
        max_ttl: float = 3600.0,
    ) -> None:
        """``nameservers`` entries are "IP", "IP:PORT" or "[IPv6]:PORT"; empty means the
        system's (c-ares reads /etc/resolv.conf). ``timeout`` is per try."""
        if timeout <= 0 or tries < 1:
            raise ValueError("timeout must be positive and tries at least 1")
        self._nameservers = [parse_nameserver(entry) for entry in nameservers]
        self._timeout = timeout
        self._tries = tries
        self._deadline = timeout * tries
        self._negative_ttl = negative_ttl
        self._max_ttl = max_ttl
        self._cache: TtlLruCache[tuple[str, str], _CacheValue] = TtlLruCache(cache_size, clock)
        self._hosts = HostsFile(hosts_file, clock)
        self._inflight: dict[tuple[str, str], asyncio.Task[_CacheValue]] = {}
        self._dns: aiodns.DNSResolver | None = None
        self._closed = False
        self.stats = ResolverStats()
        #: called with the seconds each DNS query took, answered or not (metrics)
        self.observe_query: Callable[[float], None] | None = None

    async def resolve(self, name: str) -> list[IPAddress]:
        """All addresses of ``name``, IPv6 first. One family failing is not an error.

        Raises ResolveError when no address is found.
        """
        literal = _ip_literal(name)
        if literal is not None:
            return [literal]
        qname = normalize_name(name)
        if _is_localhost(qname):
            return list(_LOOPBACK)
        listed = self._hosts.lookup(qname)
        if listed:
            return listed
        outcomes = await asyncio.gather(
            self._lookup(qname, "AAAA"), self._lookup(qname, "A"), return_exceptions=True
        )
        addresses: list[IPAddress] = []
        failures: list[ResolveError] = []
        for outcome in outcomes:
            if isinstance(outcome, ResolveError):
                failures.append(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                addresses.extend(outcome)
        if addresses:
            return addresses
        raise _worst(failures)

    async def resolve_family(self, name: str, family: int) -> list[IPAddress]:
        """Addresses of ``name`` in one family (socket.AF_INET or socket.AF_INET6).

        An IP literal of the other family raises ResolveError(WRONG_FAMILY).
        """
        qtype = _QTYPES.get(family)
        if qtype is None:
            raise ValueError(f"family must be AF_INET or AF_INET6, not {family!r}")
        version = 4 if family == socket.AF_INET else 6
        literal = _ip_literal(name)
        if literal is not None:
            if literal.version != version:
                raise ResolveError(name, ResolveReason.WRONG_FAMILY)
            return [literal]
        qname = normalize_name(name)
        if _is_localhost(qname):
            return [address for address in _LOOPBACK if address.version == version]
        listed = [address for address in self._hosts.lookup(qname) if address.version == version]
        if listed:
            return listed
        return list(await self._lookup(qname, qtype))

    async def reverse(self, address: IPAddress) -> str:
        """The name of ``address``: the hosts file first, then a PTR query.

        An IPv4-mapped IPv6 address is looked up as the IPv4 address. Raises ResolveError.
        """
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        listed = self._hosts.reverse(address)
        if listed is not None:
            return listed
        pointer = address.reverse_pointer
        outcome = await self._cached_query(pointer, "PTR")
        assert isinstance(outcome, str)
        return outcome

    async def close(self) -> None:
        """Cancel outstanding queries and release the c-ares channel."""
        self._closed = True
        # Closing the channel fails pending queries (ARES_ECANCELLED -> reason ERROR), so
        # their waiters get a ResolveError rather than a CancelledError they did not ask for.
        if self._dns is not None:
            dns, self._dns = self._dns, None
            await dns.close()

    async def __aenter__(self) -> Resolver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _lookup(self, qname: str, qtype: str) -> tuple[IPAddress, ...]:
        outcome = await self._cached_query(qname, qtype)
        assert isinstance(outcome, tuple)
        return outcome

    async def _cached_query(self, qname: str, qtype: str) -> tuple[IPAddress, ...] | str:
        """Answer from the cache, or join / start the one query for (qtype, qname)."""
        key = (qtype, qname)
        cached = self._cache.get(key)
        if cached is not None:
            self.stats.cache_hits += 1
        else:
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._query(qname, qtype))
                self._inflight[key] = task
                task.add_done_callback(lambda done: self._query_done(key, done))
            # Shielded: one caller giving up must not cancel the query for the others.
            cached = await asyncio.shield(task)
        if isinstance(cached, ResolveReason):
            raise ResolveError(qname, cached)
        return cached

    def _query_done(self, key: tuple[str, str], task: asyncio.Task[_CacheValue]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so abandoned queries log nothing

    async def _query(self, qname: str, qtype: str) -> _CacheValue:
        """One DNS query; caches and returns the outcome, raises on transient failures."""
        if self._closed:
            raise ResolveError(qname, ResolveReason.ERROR, "resolver is closed")
        dns = self._channel()
        self.stats.queries += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._deadline):
                result = await dns.query_dns(qname, qtype)
        except TimeoutError as exc:
            raise ResolveError(qname, ResolveReason.TIMEOUT) from exc
        except ares_error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            reason = _ARES_REASONS.get(code, ResolveReason.ERROR)
            if reason in _NEGATIVE_REASONS:
                self._cache.put((qtype, qname), reason, self._negative_ttl)
                return reason
            raise ResolveError(qname, reason, str(exc.args[-1]) if exc.args else "") from exc
        finally:
            if self.observe_query is not None:
                self.observe_query(time.monotonic() - started)
        value, ttl = _parse_answer(result, qtype)
        if isinstance(value, ResolveReason):
            ttl = self._negative_ttl
        self._cache.put((qtype, qname), value, min(ttl, self._max_ttl))
        return value

    def _channel(self) -> aiodns.DNSResolver:
        if self._dns is None:
            self._dns = aiodns.DNSResolver(
                nameservers=self._nameservers or None,
                loop=asyncio.get_running_loop(),
                timeout=self._timeout,
                tries=self._tries,
            )
        return self._dns


def _parse_answer(result: pycares.DNSResult, qtype: str) -> tuple[_CacheValue, float]:
    """Pick the records of ``qtype`` from an answer; the TTL is the smallest in the chain
    (CNAMEs included). An answer without such records is NODATA."""
    records = result.answer
    ttl = float(min((record.ttl for record in records), default=0))
    if qtype == "PTR":
        for record in records:
            if isinstance(record.data, pycares.PTRRecordData):
                return record.data.dname.rstrip(".").lower(), ttl
        return ResolveReason.NODATA, 0.0
    wanted = pycares.ARecordData if qtype == "A" else pycares.AAAARecordData
    addresses = tuple(
        ip_address(record.data.addr) for record in records if isinstance(record.data, wanted)
    )
    if not addresses:
        return ResolveReason.NODATA, 0.0
    return addresses, ttl


def _worst(failures: list[ResolveError]) -> ResolveError:
    return min(failures, key=lambda failure: _REASON_PRIORITY.index(failure.reason))
