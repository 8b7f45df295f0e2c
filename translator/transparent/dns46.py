"""DNS46: the transparent front's DNS server, handing IPv4-only clients fake-IP addresses.

An IPv4-only LAN client uses the gateway as its DNS server. For a name with AAAA but no
A record ("missing-a" mode; every existing name in "always" mode) it gets one A record
with an address of the :class:`~addrmap.fakeip.FakeIpPool`; the gateway intercepts
traffic to that address and relays it to the name's IPv6 host. Everything else is
forwarded to the upstream resolvers (in order; UDP, then TCP on truncation; TCP queries
stay TCP) and returned as given, with the client's message ID.

Decisions:

* HTTPS and SVCB get NOERROR with an empty answer: their ipv4hint/ipv6hint (and ECH,
  alternative endpoints) would let a client bypass the gateway, or fail. In "always"
  mode AAAA is emptied for the same reason, so dual-stack clients take the gateway too.
* A synthesized TTL is min(record TTL, ``max_ttl``): each answer refreshes the binding's
  idle lifetime in the table, and a short TTL brings clients back to refresh it while
  they use the address instead of trusting an answer whose binding expired meanwhile.
* PTR of a pool address comes from the pool (NXDOMAIN when unbound), never upstream.
* The pool full (:class:`~addrmap.errors.LimitExceeded`) is SERVFAIL, logged at most once
  a second; more than ``max_inflight`` queries at once are SERVFAIL at once.
* Garbage with a readable header gets FORMERR; shorter garbage, and any message with QR
  set (a response: answering it could loop two servers), get nothing.
* The upstream query ID is drawn afresh; the client's ID is put back on the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
from dns.message import Message

from addrmap import FakeIpPool, InvalidTarget, LimitExceeded
from translator.ratelog import RateLimitedLog

__all__ = ["Dns46", "parse_nameserver"]

log = logging.getLogger("socks64.transparent.dns")

ClientAddress = IPv4Address | IPv6Address
Outcome = tuple[Message, str, str]  # response, count kind, detail for the log

TCP_IDLE_TIMEOUT = 10.0  # seconds without a query before a TCP connection is closed
MAX_TCP_CONNECTIONS = 64  # per listener; more are closed at once
TCP_PIPELINE = 16  # queries of one TCP connection answered at once (RFC 7766 6.2.1.1)
OUR_PAYLOAD = 1232  # EDNS payload we offer (DNS flag day 2020)
_EMPTY_TYPES = frozenset({dns.rdatatype.HTTPS, dns.rdatatype.SVCB})
_MODES = ("missing-a", "always")
_DENIED = ("real", "refused")
_udp_query = partial(dns.asyncquery.udp, ignore_unexpected=True, ignore_errors=True)
_UPSTREAM_ERRORS = (TimeoutError, OSError, EOFError, ValueError, dns.exception.DNSException)


def parse_nameserver(text: str) -> tuple[str, int]:
    """(address, port) of "IP", "IPv4:PORT", "IPv6" or "[IPv6]:PORT"; port 53 by default."""
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not IP, IP:PORT or [IPv6]:PORT")
        port = rest[1:] if rest else port
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    try:
        address = ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not IP, IP:PORT or [IPv6]:PORT") from None
    if text.strip().startswith("[") and address.version != 6:
        raise ValueError(f"{text!r}: only an IPv6 address goes in brackets")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"bad port in {text!r}")
    return str(address), int(port)


def _unmapped(client: ClientAddress) -> ClientAddress:
    """An IPv4-mapped IPv6 address (a dual-stack socket's peer) as the IPv4 address."""
    mapped = client.ipv4_mapped if isinstance(client, IPv6Address) else None
    return client if mapped is None else mapped


def _client_of(peer: Any) -> ClientAddress | None:
    """The client address of a socket peer name."""
    try:
        return _unmapped(ip_address(peer[0]))
    except (TypeError, ValueError, IndexError):
        return None


def _header_only(wire: bytes, rcode: int) -> bytes | None:
    """A bare response (no sections) to the header of ``wire``, or None without one."""
    if len(wire) < 12:
        return None
    ident, flags = struct.unpack_from("!HH", wire)
    if flags & dns.flags.QR:
        return None
    flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | dns.flags.RA | rcode
    return struct.pack("!HHHHHH", ident, flags, 0, 0, 0, 0)


def _chain_ttl(response: Message) -> int | None:
    """The TTL of the answer for the question (CNAMEs included), None when there is none."""
    if response.rcode() != dns.rcode.NOERROR or not isinstance(response, dns.message.QueryMessage):
        return None
    try:
        chain = response.resolve_chaining()
    except dns.exception.DNSException:
        return None
    return chain.minimum_ttl if chain.answer else None


@dataclass
class _Listener:
    """The TCP side of one endpoint: its server and its connection count."""

    server: asyncio.Server | None = None
    connections: int = 0


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Dns46) -> None:
        self._owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        client = _client_of(addr)
        if client is not None:
            self._owner._spawn(self._reply(data, client, addr))

    async def _reply(self, data: bytes, client: ClientAddress, addr: tuple[Any, ...]) -> None:
        wire = await self._owner.answer(data, client)
        transport = self.transport
        if wire is not None and transport is not None and not transport.is_closing():
            with contextlib.suppress(OSError):
                transport.sendto(wire, addr)


class Dns46:
    """The DNS46 server; see the module docstring."""

    def __init__(
        self,
        *,
        pool: FakeIpPool,
        upstreams: Sequence[tuple[str, int]],
        synthesize: str,
        denied_answer: str,
        may_use: Callable[[ClientAddress], bool],
        max_ttl: int,
        timeout: float,
        count: Callable[[str], None] = lambda kind: None,
        max_inflight: int = 1024,
    ) -> None:
        if synthesize not in _MODES or denied_answer not in _DENIED:
            raise ValueError(f"synthesize: one of {_MODES}; denied_answer: one of {_DENIED}")
        if not upstreams or max_ttl < 0 or not timeout > 0 or max_inflight < 1:
            raise ValueError("need upstreams, max_ttl >= 0, timeout > 0, max_inflight >= 1")
        self._pool = pool
        self._upstreams = [(host, port) for host, port in upstreams]
        self._always = synthesize == "always"
        self._refuse_denied = denied_answer == "refused"
        self._may_use = may_use
        self._max_ttl = max_ttl
        self._timeout = timeout
        self._count = count
        self._max_inflight = max_inflight
        self._inflight = 0
        self._limit_log = RateLimitedLog(interval=1.0)
        self._bug_log = RateLimitedLog(interval=1.0)
        self._closed = False
        self._udp: list[asyncio.DatagramTransport] = []
        self._listeners: list[_Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the logic -----------------------------------------------------------------

    async def answer(
        self, wire: bytes, client: ClientAddress, *, tcp: bool = False
    ) -> bytes | None:
        """The answer to the query ``wire`` from ``client``; None to send nothing."""
        client = _unmapped(client)
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # dnspython raises many kinds on garbage
            formerr = _header_only(wire, dns.rcode.FORMERR)
            log.debug("%s: unparseable query (%d octets)", client, len(wire))
            if formerr is not None:
                self._count("formerr")
            return formerr
        if query.flags & dns.flags.QR:
            return None
        ident = query.id
        if self._inflight >= self._max_inflight:
            outcome: Outcome = (self._reply(query, dns.rcode.SERVFAIL), "servfail", "overload")
        else:
            self._inflight += 1
            try:
                outcome = await self._resolve(query, client, tcp)
            except Exception as exc:  # a bug, not the client's doing: keep serving
                self._bug_log(log, "DNS46 failed on a query from %s: %r", client, exc)
                self._count("servfail")
                return _header_only(wire, dns.rcode.SERVFAIL)
            finally:
                self._inflight -= 1
        response, kind, detail = outcome
        response.id = ident
        self._count(kind)
        if log.isEnabledFor(logging.DEBUG):
            q = query.question[0] if query.question else None
            asked = f"{q.name} {dns.rdatatype.to_text(q.rdtype)}" if q is not None else "-"
            log.debug("%s %s: %s, %s", client, asked, kind, detail)
        return self._render(response, wire, 65535 if tcp else self._udp_limit(query))

    async def _resolve(self, query: Message, client: ClientAddress, tcp: bool) -> Outcome:
        if not self._may_use(client):
            if self._refuse_denied:
                return self._reply(query, dns.rcode.REFUSED), "refused", "client denied"
            return await self._forwarded(query, tcp)
        if (
            query.opcode() != dns.opcode.QUERY
            or len(query.question) != 1
            or query.question[0].rdclass != dns.rdataclass.IN
        ):
            return await self._forwarded(query, tcp)
        qname, rdtype = query.question[0].name, query.question[0].rdtype
        if rdtype in _EMPTY_TYPES or (rdtype == dns.rdatatype.AAAA and self._always):
            return self._reply(query), "empty", "emptied"
        if rdtype == dns.rdatatype.A:
            return await self._address(query, qname, tcp)
        if rdtype == dns.rdatatype.PTR:
            address = self._pool_address(qname)
            if address is not None:
                return self._pointer(query, qname, address)
        return await self._forwarded(query, tcp)

    async def _address(self, query: Message, qname: dns.name.Name, tcp: bool) -> Outcome:
        upstream = await self._forward(query, tcp)
        if upstream is None:
            return self._reply(query, dns.rcode.SERVFAIL), "servfail", "no upstream answered"
        ttl = _chain_ttl(upstream)
        if upstream.rcode() != dns.rcode.NOERROR or (ttl is not None and not self._always):
            return upstream, "forwarded", dns.rcode.to_text(upstream.rcode())
        if ttl is None:  # NODATA for A: is there an IPv6 host?
            aaaa = dns.message.make_query(qname, dns.rdatatype.AAAA, payload=OUR_PAYLOAD)
            v6 = await self._forward(aaaa, tcp)
            if v6 is None:  # not NODATA: the client must not cache a transient failure
                return self._reply(query, dns.rcode.SERVFAIL), "servfail", "AAAA unanswered"
            ttl = _chain_ttl(v6)
            if ttl is None:
                return upstream, "forwarded", "NODATA"
        name = qname.to_text(omit_final_dot=True)
        if "\\" in name:  # a label with odd octets: nothing the relay could resolve
            return upstream, "forwarded", "not synthesized (odd name)"
        try:
            address = self._pool.bind(name)
        except LimitExceeded as exc:
            self._limit_log(log, "DNS46 cannot bind %s: %s", name, exc)
            return self._reply(query, dns.rcode.SERVFAIL), "servfail", f"pool: {exc}"
        except InvalidTarget:
            return upstream, "forwarded", "not synthesized (invalid name)"
        response = self._reply(query)
        rrset = dns.rrset.from_text(qname, min(ttl, self._max_ttl), "IN", "A", str(address))
        response.answer.append(rrset)
        return response, "synthesized", f"{address} ttl {rrset.ttl}"

    def _pool_address(self, qname: dns.name.Name) -> IPv4Address | None:
        """The pool address ``qname`` is the reverse name of, if it is one."""
        if not qname.is_subdomain(dns.reversename.ipv4_reverse_domain):
            return None
        try:
            address = IPv4Address(dns.reversename.to_address(qname))
        except (ValueError, dns.exception.DNSException):
            return None
        return address if address in self._pool else None

    def _pointer(self, query: Message, qname: dns.name.Name, address: IPv4Address) -> Outcome:
        name = self._pool.name_of(address)
        response = self._reply(query)
        # a name restored from a (hand-edited) state file may not parse: as if unbound
        with contextlib.suppress(dns.exception.DNSException):
            if name is not None:
                ptr = dns.rrset.from_text(qname, self._max_ttl, "IN", "PTR", f"{name}.")
                response.answer.append(ptr)
                return response, "ptr", f"{address} is {name}"
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response, "ptr", f"{address} unbound"

    async def _forwarded(self, query: Message, tcp: bool) -> Outcome:
        response = await self._forward(query, tcp)
        if response is None:
            return self._reply(query, dns.rcode.SERVFAIL), "servfail", "no upstream answered"
        return response, "forwarded", dns.rcode.to_text(response.rcode())

    async def _forward(self, query: Message, tcp: bool) -> Message | None:
        """Upstream's response to ``query`` (its ID is changed), None when all failed."""
        query.id = secrets.randbelow(65536)
        for host, port in self._upstreams:
            try:
                if not tcp:
                    async with asyncio.timeout(self._timeout):
                        response = await _udp_query(query, host, self._timeout, port)
                    if not response.flags & dns.flags.TC:
                        return response
                async with asyncio.timeout(self._timeout):
                    return await dns.asyncquery.tcp(query, host, timeout=self._timeout, port=port)
            except _UPSTREAM_ERRORS as exc:
                log.debug("upstream %s port %d failed: %r", host, port, exc)
        return None

    @staticmethod
    def _reply(query: Message, rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> Message:
        response = dns.message.make_response(
            query, recursion_available=True, our_payload=OUR_PAYLOAD
        )
        response.set_rcode(rcode)
        return response

    @staticmethod
    def _udp_limit(query: Message) -> int:
        return min(max(512, query.payload), 65535) if query.edns >= 0 else 512

    @staticmethod
    def _render(response: Message, query: bytes, limit: int) -> bytes | None:
        """``response`` in at most ``limit`` octets: truncated (TC, no records) if need be."""
        try:
            try:
                return response.to_wire(max_size=limit)
            except dns.exception.TooBig:
                response.flags |= dns.flags.TC
                response.answer, response.authority, response.additional = [], [], []
                return response.to_wire(max_size=limit)
        except Exception:
            log.debug("DNS46 could not render an answer", exc_info=True)
            return _header_only(query, dns.rcode.SERVFAIL)

    # -- the listeners -------------------------------------------------------------

    async def start(self, endpoints: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """Listen on UDP and TCP at each (host, port); the bound (host, port) pairs."""
        bound = []
        try:
            for host, port in endpoints:
                bound.append((host, await self._listen(host, port)))
        except BaseException:
            await self.close()
            raise
        return bound

    async def _listen(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        for attempt in range(20):  # with port 0, the free UDP port may be taken for TCP
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port)
            )
            actual: int = transport.get_extra_info("sockname")[1]
            listener = _Listener()
            try:
                listener.server = await asyncio.start_server(
                    partial(self._serve_tcp, listener), host, actual
                )
            except OSError:
                transport.close()
                if port or attempt == 19:
                    raise
                continue
            self._udp.append(transport)
            self._listeners.append(listener)
            return actual
        raise AssertionError("unreachable")

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run ``coroutine`` as a task close() cancels and waits for."""
        if self._closed:
            coroutine.close()
            return None
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve_tcp(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        client = _client_of(writer.get_extra_info("peername"))
        if self._closed or client is None or listener.connections >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        listener.connections += 1
        current = asyncio.current_task()
        if current is not None:
            self._tasks.add(current)
        pending: set[asyncio.Task[None]] = set()
        slots, lock = asyncio.Semaphore(TCP_PIPELINE), asyncio.Lock()

        async def reply(wire: bytes) -> None:
            try:
                answer = await self.answer(wire, client, tcp=True)
                if answer is not None and not writer.is_closing():
                    async with lock, asyncio.timeout(TCP_IDLE_TIMEOUT):
                        writer.write(struct.pack("!H", len(answer)) + answer)
                        await writer.drain()
            except (TimeoutError, OSError):
                writer.transport.abort()
            finally:
                slots.release()

        try:
            with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, OSError):
                while True:
                    await slots.acquire()  # at most TCP_PIPELINE queries in flight
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                        (size,) = struct.unpack("!H", await reader.readexactly(2))
                        wire = await reader.readexactly(size)
                    task = self._spawn(reply(wire))
                    if task is None:
                        break
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            if pending:  # the client stopped asking: still answer what it asked
                await asyncio.wait(pending)
            writer.close()  # after what is buffered
        except asyncio.CancelledError:
            pass  # closing; returning normally keeps 3.11's streams from logging it
        finally:
            for task in pending:
                task.cancel()
            listener.connections -= 1
            if current is not None:
                self._tasks.discard(current)
            if not writer.is_closing():
                writer.transport.abort()

    async def close(self) -> None:
        """Close the listeners and cancel every query being answered."""
        self._closed = True
        for transport in self._udp:
            transport.close()
        servers = [listener.server for listener in self._listeners if listener.server]
        for server in servers:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers:
            await server.wait_closed()
        self._udp.clear()
        self._listeners.clear()
