"""One client connection: the only code that reads or writes the client socket.

The codec (``translator.wire``) owns every byte; request handlers decide; the session
carries out what they decide (an outcome: reply and relay, reply and wait for a BIND
peer, reply and serve a UDP association...). Each request either succeeds or fails with
exactly one reply code from ``replies.rep_for`` and one log line, and then the
connection closes (profile 3). Nothing a client sends can raise out of here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from ipaddress import IPv4Address

from translator.gss.acceptor import GssFailure
from translator.gss.protection import ProtectedChannel
from translator.gss.relay import relay_channel
from translator.net.addresses import IPAddress, ip_text, sockaddr_ip
from translator.relay.channel import Channel, ChannelClosed
from translator.relay.listeners import BindListener
from translator.relay.tcp import RelayStats, relay
from translator.relay.udp import UdpAssociation
from translator.wire import (
    AddressId,
    Command,
    ControlRequest,
    Event,
    Greeting,
    GssContextToken,
    GssProtectionRequest,
    MessageRejected,
    Method,
    Phase,
    RemoteProtocolError,
    Rep,
    Reply,
    Request,
    ServerConnection,
    Signal,
    Socks4Reply,
    Socks4Request,
    Socks6Attempt,
    TunnelDatagram,
    UserPassRequest,
)

from . import accesslog
from .accesslog import SessionRecord, family_name
from .associate import address_associate
from .bind import serve_bind
from .connect import serve_connect
from .context import RequestContext, Services
from .outcomes import AnyReply, Associate, AwaitPeer, Hold, NextRequest, Outcome, Relay
from .replies import REFUSALS, describe, rep_for
from .socks4 import serve_socks4
from .udp import control, serve_udp

log = logging.getLogger("socks64.session")

_METHOD_BY_NAME = {
    "none": Method.NO_AUTH,
    "username": Method.USERNAME_PASSWORD,
    "gssapi": Method.GSSAPI,
}
_READ_SIZE = 65536
_REQUEST_READ_SIZE = 4096  # handshake messages are small: no 64 KiB buffer per read


class ClientGone(Exception):
    """The client closed or reset its connection; nothing more to say to it."""


class Session:
    """Serves one accepted client connection from greeting to close."""

    def __init__(
        self,
        services: Services,
        channel: Channel,
        on_first_request: Callable[[], None] | None = None,
    ) -> None:
        self.services = services
        self.config = services.config
        self.channel = channel
        peer = channel.peername  # raises OSError for a client reset before it is served
        self.ctx = RequestContext(
            services,
            client_ip=sockaddr_ip(peer),
            client_port=int(peer[1]),  # type: ignore[call-overload]
            facing_of=lambda: sockaddr_ip(channel.sockname),  # few requests need it
        )
        host = peer[0]
        if isinstance(host, str) and "." in host and ":" not in host:
            self.ctx.client_host = host  # IPv4's text from the kernel is str(client_ip)
        self.conn = ServerConnection(self.config.auth.gssapi.max_token_size)
        self._doing: object = "handshake"  # for the log when the client leaves
        self._first_read = True
        self._on_first_request = on_first_request
        self.record = SessionRecord(
            self.ctx, family_name(self.ctx.client_ip.version), services.metrics
        )

    @property
    def label(self) -> str:
        return self.ctx.label

    # -- the one reader and the one writer ------------------------------------------------

    async def _read(self, size: int = _READ_SIZE) -> bytes:
        """The next bytes from the client; ClientGone at end of stream or reset."""
        try:
            data = await self.channel.recv(size)
        except ChannelClosed as exc:
            raise ClientGone(str(exc)) from None
        if not data:
            raise ClientGone("closed by client")
        return data

    async def _next_event(self, deadline: float) -> Event:
        """The next client message; TimeoutError at ``deadline`` (loop time)."""
        while True:
            event = self.conn.next_event()
            if not isinstance(event, Signal):
                return event
            if event is Signal.PAUSED:
                raise AssertionError("codec paused with no answer pending")
            channel = self.channel
            try:
                data = None
                if self._first_read:
                    # The greeting is usually in the kernel by the time the connection is
                    # accepted: skip the loop round trip. Later messages answer a reply
                    # of ours and are not there yet: a try would only cost a failed recv.
                    self._first_read = False
                    data = channel.recv_ready(_REQUEST_READ_SIZE)
                if data is None:
                    if channel.loop.time() >= deadline:
                        raise TimeoutError
                    data = await channel.recv_before(_REQUEST_READ_SIZE, deadline)
            except ChannelClosed as exc:
                raise ClientGone(str(exc)) from None
            if not data:
                raise ClientGone("closed by client")
            self.conn.receive_data(data)

    async def _send(self, data: bytes) -> None:
        """Write codec output; a client that stops reading cannot stall us forever."""
        if not data:
            return
        try:
            rest = self.channel.send_now(data)  # replies are small: the kernel takes them
            if rest:
                async with asyncio.timeout(self.config.timeouts.handshake):
                    await self.channel.send_all(rest)
        except ChannelClosed as exc:
            raise ClientGone(str(exc)) from None

    async def _reply(self, reply: AnyReply, then: Phase | None) -> None:
        if isinstance(reply, Socks4Reply):
            await self._send(self.conn.send_socks4_reply(reply, then=then))
        else:
            await self._send(self.conn.send_reply(reply, then=then))

    # -- main -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            # The channel's loop is the running one (asyncio.get_running_loop costs a
            # getpid syscall per call, for its fork check).
            deadline = self.channel.loop.time() + self.config.timeouts.handshake
            event = await self._next_event(deadline)
            if isinstance(event, Socks6Attempt):
                self.record.end = accesslog.PROTOCOL_ERROR
                self.record.reason = "SOCKS 6 is not implemented yet; sent version mismatch"
                await self._send(self.conn.send_socks6_mismatch())
                return
            if isinstance(event, Socks4Request):
                self._doing = event.command
                self._first_request(f"SOCKS4_{event.command.name}")
                await self._serve_socks4(event)
                return
            assert isinstance(event, Greeting)
            if not await self._negotiate(event, deadline):
                return
            await self._serve_requests(deadline)
        except ClientGone as exc:
            doing = getattr(self._doing, "name", self._doing)  # a command, or "handshake"
            log.debug("%s: %s during %s", self.label, exc, doing)
        except TimeoutError:
            self.record.end = accesslog.TIMEOUT
            self.record.reason = "handshake timed out"
        except RemoteProtocolError as exc:
            self.record.end = accesslog.PROTOCOL_ERROR
            self.record.rep = exc.rep or Rep.GENERAL_FAILURE
            self.record.reason = f"protocol error: {exc.reason}"
            await self._fail_quietly(exc.rep or Rep.GENERAL_FAILURE)
        except asyncio.CancelledError:
            self.record.end = accesslog.STOPPED
            raise
        except Exception:  # a bug must cost one client, never the gateway
            self.record.end = accesslog.ERROR
            log.exception("%s: internal error", self.label)
        finally:
            self.ctx.unpin_all()
            self.record.user = self.ctx.user
            self.record.finish()

    def _first_request(self, command: str) -> None:
        """The handshake is over: the admission stops counting this one as handshaking."""
        if self._on_first_request is not None:
            self._on_first_request()
            self._on_first_request = None
        self.record.doing(command)

    async def _fail_quietly(self, rep: Rep) -> None:
        with contextlib.suppress(ClientGone, TimeoutError):
            await self._send(self.conn.send_error(rep))

    async def _negotiate(self, greeting: Greeting, deadline: float) -> bool:
        offered = set(greeting.methods)
        chosen = next(
            (
                _METHOD_BY_NAME[name]
                for name in self.config.auth.methods
                if _METHOD_BY_NAME[name] in offered
            ),
            Method.NO_ACCEPTABLE,
        )
        await self._send(self.conn.send_method(chosen))
        metrics = self.services.metrics
        if chosen == Method.NO_ACCEPTABLE:
            metrics.auth_result("none", "no_acceptable")
            self.record.end = accesslog.REFUSED
            self.record.reason = f"no acceptable method among {sorted(offered)}"
            return False
        if chosen == Method.GSSAPI:
            return await self._gssapi(deadline)
        if chosen == Method.USERNAME_PASSWORD:
            event = await self._next_event(deadline)
            assert isinstance(event, UserPassRequest)
            user = event.username.decode("utf-8", "replace")
            password = event.password.decode("utf-8", "replace")
            ok = await self.services.verify_password(user, password)
            metrics.auth_result("username", "ok" if ok else "failed")
            await self._send(self.conn.send_auth_result(ok))
            if not ok:
                self.record.end = accesslog.REFUSED
                self.record.reason = f"authentication failed for user {user!r}"
                return False
            self.ctx.user = user
        else:
            metrics.auth_result("none", "ok")
        return True

    async def _gssapi(self, deadline: float) -> bool:
        """RFC 1961: the context, then the protection level; from then on the channel
        wraps and unwraps every message (levels 1 and 2)."""
        acceptor = self.services.gssapi
        assert acceptor is not None  # the method is chosen only when configured
        exchange = acceptor.exchange()
        try:
            while True:
                event = await self._next_event(deadline)
                if isinstance(event, GssContextToken):
                    answer, complete = await asyncio.to_thread(exchange.step, event.token)
                    then = Phase.GSSAPI_LEVEL if complete else Phase.GSSAPI
                    await self._send(self.conn.send_gss_token(answer, then=then))
                    continue
                assert isinstance(event, GssProtectionRequest)
                requested, agreed, answer = exchange.agree(event.token)
                break
        except ClientGone:  # no ticket, or the client refused our answer (section 3.5)
            self.record.reason = "closed by the client during GSS-API authentication"
            raise
        except RemoteProtocolError:  # an oversized token, a level that does not unwrap
            self.services.metrics.auth_result("gssapi", "failed")
            raise
        except GssFailure as exc:
            self.services.metrics.auth_result("gssapi", "failed")
            self.record.end = accesslog.REFUSED
            who = f" ({exchange.principal})" if exchange.principal else ""
            self.record.reason = f"GSS-API authentication failed{who}: {exc}"
            await self._fail_quietly(Rep.GENERAL_FAILURE)  # the abort, 01 FF
            return False
        await self._send(self.conn.send_gss_level(answer))
        self.services.metrics.auth_result("gssapi", "ok")
        self.ctx.user = exchange.principal
        protection = exchange.protection(agreed)
        log.debug(
            "%s: GSS-API as %s, protection %s (asked %d)",
            self.label,
            exchange.principal,
            agreed.name.lower(),
            requested,
        )
        if protection is not None:
            channel = ProtectedChannel.around(self.channel, protection)
            self.channel = channel
            self.ctx.protection = protection
            pipelined = self.conn.take_trailing_data()  # wrapped, read with the level
            if pipelined:
                self.conn.receive_data(channel.open(pipelined))
        return True

    async def _serve_requests(self, deadline: float) -> None:
        loop = self.channel.loop
        limit = self.config.limits.max_requests_per_connection
        for _ in range(limit):
            request = await self._next_event(deadline)
            assert isinstance(request, Request)
            self._doing = request.command
            command = request.command.name
            self._first_request(command)
            self.record.requested = _show(request)
            try:
                outcome = await _handle(self.ctx, request)
                self.services.metrics.request(command, _atyp(request.address), 0)
                if isinstance(outcome, NextRequest):
                    await self._reply(outcome.reply, Phase.REQUEST)
                    # The control channel stays open (profile 5): next request within idle.
                    deadline = loop.time() + self.config.timeouts.idle
                    self.record.end = accesslog.OK
                    continue
                await self._carry_out(outcome)
            except REFUSALS as exc:
                rep = rep_for(exc)
                self.services.metrics.request(command, _atyp(request.address), rep)
                self.record.refused(rep, describe(exc))
                await self._fail_quietly(rep)
            return
        self.record.refused(Rep.GENERAL_FAILURE, f"more than {limit} requests on one connection")
        await self._fail_quietly(Rep.GENERAL_FAILURE)

    async def _serve_socks4(self, request: Socks4Request) -> None:
        command = f"SOCKS4_{request.command.name}"
        atyp = _atyp(request.address)
        self.record.requested = f"{request.address}:{request.port}"
        try:
            outcome = await serve_socks4(self.ctx, request)
            self.services.metrics.request(command, atyp, 0)
            await self._carry_out(outcome)
        except REFUSALS as exc:
            self.services.metrics.request(command, atyp, rep_for(exc))
            self.record.refused(Rep.GENERAL_FAILURE, describe(exc))  # CD 91 on the wire
            await self._fail_quietly(Rep.GENERAL_FAILURE)  # CD 91: SOCKS 4 has no other

    # -- outcomes -------------------------------------------------------------------------

    async def _carry_out(self, outcome: Outcome) -> None:
        if isinstance(outcome, Relay):
            await self._relay_after(outcome.reply, outcome.peer, outcome.what, outcome.reached)
        elif isinstance(outcome, AwaitPeer):
            await self._bind(outcome)
        elif isinstance(outcome, Hold):
            await self._hold(outcome)
        elif isinstance(outcome, Associate):
            await self._associate(outcome)
        else:
            raise AssertionError(f"{outcome!r} answers a request; it does not end one")

    async def _relay_after(
        self,
        reply: AnyReply,
        peer: socket.socket,
        what: tuple[str, object, int],
        reached: IPv4Address | None = None,
    ) -> None:
        """Send the final success reply, then relay; both sockets end closed."""
        try:
            await self._reply(reply, Phase.RELAY)
        except BaseException:
            peer.close()
            raise
        trailing = self.conn.take_trailing_data()  # the client pipelined payload
        record = self.record
        if reached is not None:  # CONNECT to one IPv4 address: the one connected to
            record.reached = f"{ip_text(reached)}:{what[2]}"
            record.destination_family = "ipv4"
        else:
            with contextlib.suppress(OSError):
                host, port = peer.getpeername()[:2]  # one syscall; no address object needed
                v6 = peer.family == socket.AF_INET6
                record.reached = f"[{host}]:{port}" if v6 else f"{host}:{port}"
                record.destination_family = family_name(6 if v6 else 4)
        record.end = accesslog.OK  # the reply went out: from here the session did its job
        stats = RelayStats()
        traffic, metrics = self.services.traffic, self.services.metrics
        flow = traffic.begin_tcp(
            stats, record.client_family, record.destination_family or "ipv4", metrics
        )
        channel = self.channel
        client, watched = channel.hand_over()
        try:
            if isinstance(channel, ProtectedChannel):
                failure = await relay_channel(
                    channel,
                    client,
                    peer,
                    watched=watched,
                    idle_timeout=self.config.timeouts.idle,
                    clock=self.services.clock,
                    to_peer=trailing,
                    stats=stats,
                )
                if failure is not None:  # no reply is owed in the relay: just why
                    record.end = accesslog.PROTOCOL_ERROR
                    record.reason = f"protocol error: {failure}"
            else:
                await relay(
                    client,
                    peer,
                    idle_timeout=self.config.timeouts.idle,
                    clock=self.services.clock,
                    to_peer=trailing,
                    stats=stats,
                    client_watched=watched,
                    loop=channel.loop,
                )
        finally:  # also when the gateway stops and cancels us: the bytes moved count
            traffic.end(flow, metrics)
            record.up, record.down = stats.to_peer, stats.to_client
            if stats.idle_timeout:
                record.end = accesslog.IDLE
        if log.isEnabledFor(logging.DEBUG):  # once per session: skip building the arguments
            log.debug(
                "%s: %s %s:%d done, %d bytes up, %d down%s",
                self.label,
                *what,
                stats.to_peer,
                stats.to_client,
                " (idle timeout)" if stats.idle_timeout else "",
            )

    async def _bind(self, outcome: AwaitPeer) -> None:
        """BIND: first reply, the peer (while watching the client), second reply, relay."""
        try:
            await self._reply(outcome.first, Phase.BIND_WAIT)
            sock, peer_ip, peer_port = await self._accept(outcome.listener, outcome.expected)
        finally:
            outcome.release()
        try:
            second = await outcome.second(peer_ip, peer_port)
        except BaseException:
            sock.close()
            raise
        await self._relay_after(second, sock, ("BIND peer", peer_ip, peer_port))

    async def _accept(
        self, listener: BindListener, expected: Callable[[IPAddress], bool]
    ) -> tuple[socket.socket, IPAddress, int]:
        """Accept the peer, giving up when the client leaves or bind_accept runs out.
        Bytes the client sends meanwhile are kept for the relay (the codec holds them)."""
        accept = asyncio.ensure_future(listener.accept(expected))
        watch = asyncio.ensure_future(self._read())
        handed_over = False
        try:
            async with asyncio.timeout(self.config.timeouts.bind_accept):
                while True:
                    await asyncio.wait((accept, watch), return_when=asyncio.FIRST_COMPLETED)
                    if accept.done():
                        handed_over = True
                        return accept.result()
                    self.conn.receive_data(watch.result())
                    watch = asyncio.ensure_future(self._read())
        finally:
            watch.cancel()
            if not handed_over:
                accept.cancel()
                with contextlib.suppress(BaseException):
                    await accept
                if accept.done() and not accept.cancelled() and accept.exception() is None:
                    accept.result()[0].close()  # accepted just as we gave up
            with contextlib.suppress(BaseException):
                await watch

    async def _hold(self, outcome: Hold) -> None:
        """A MULTI holding connection keeps its listener until the client closes."""
        try:
            await self._reply(outcome.reply, Phase.HOLD)
            with contextlib.suppress(ClientGone):
                while True:
                    await self._read()  # nothing is parsed while holding
        finally:
            outcome.release()

    async def _associate(self, outcome: Associate) -> None:
        association = outcome.association
        if outcome.then is Phase.TUNNEL:
            association.tunnel = self.channel  # its datagrams are written on our connection
        self.services.udp_associations[association] = self.channel
        record = self.record
        record.unit = "datagrams"
        traffic, metrics = self.services.traffic, self.services.metrics
        flow = traffic.begin_udp(association.stats, record.client_family)
        try:
            await self._reply(outcome.reply, outcome.then)
            record.end = accesslog.OK
            log.debug("%s: UDP association on port %d", self.label, outcome.reply.port)
            await self._serve_association(association)
        finally:
            self.services.udp_associations.pop(association, None)
            association.close()
            stats = association.stats
            self.services.udp_totals.add(stats)
            traffic.end(flow, metrics)
            record.up, record.down = stats.to_peers, stats.to_client
            log.debug(
                "%s: UDP association ended: %d to peers, %d to client, %d dropped",
                self.label,
                stats.to_peers,
                stats.to_client,
                stats.dropped,
            )

    async def _serve_association(self, association: UdpAssociation) -> None:
        """Control requests and tunnelled datagrams until the client leaves or goes idle."""
        idle = self.config.udp.idle
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except MessageRejected as exc:
                if exc.answer_owed:
                    await self._answer(Reply(exc.rep or Rep.GENERAL_FAILURE))
                    log.info("%s: control request refused: %s", self.label, exc.reason)
                else:
                    association.stats.dropped_malformed += 1
                    association.stats.dropped += 1
                continue
            if isinstance(event, TunnelDatagram):
                association.client_datagram(event.datagram)
                continue
            if isinstance(event, ControlRequest):
                await self._answer(await self._control(association, event))
                continue
            assert event is Signal.NEED_DATA
            remaining = association.last_activity + idle - self.services.clock()
            if remaining <= 0:
                self.record.end = accesslog.IDLE
                self.record.reason = f"UDP association idle for {idle:g} s"
                return
            try:
                async with asyncio.timeout(remaining):
                    data = await self._read()
            except TimeoutError:
                continue  # datagrams may have kept it alive: re-check the idle clock
            except ClientGone:
                return  # the TCP connection ended, and the association with it
            conn.receive_data(data)

    async def _control(self, association: UdpAssociation, request: ControlRequest) -> Reply:
        metrics = self.services.metrics
        try:
            reply = await control(self.ctx, association, request)
            metrics.request(request.sub.name, _atyp(request.address), 0)
            return reply
        except REFUSALS as exc:
            rep = rep_for(exc)
            metrics.request(request.sub.name, _atyp(request.address), rep)
            what = f"{request.sub.name} {request.address}:{request.port}"
            log.info("%s: %s: %s -> REP %d %s", self.label, what, describe(exc), rep, rep.name)
            return Reply(rep)

    async def _answer(self, reply: Reply) -> None:
        then = self.conn.phase if reply.rep == Rep.SUCCEEDED else None
        try:
            await self._send(self.conn.send_reply(reply, then=then))
        except TimeoutError:
            raise ClientGone("client does not read its control replies") from None


async def _handle(ctx: RequestContext, request: Request) -> Outcome:
    """Dispatch a SOCKS 5 request to its handler."""
    if request.command == Command.ADDRESS_ASSOCIATE:
        return await address_associate(ctx, request)
    base = request.command.base
    if base == Command.CONNECT:
        return await serve_connect(ctx, request)
    if base == Command.BIND:
        return await serve_bind(ctx, request)
    return await serve_udp(ctx, request)


def _show(request: Request) -> str:
    address = request.address
    text = ip_text(address) if isinstance(address, IPv4Address) else str(address)
    return f"[{text}]:{request.port}" if ":" in text else f"{text}:{request.port}"


def _atyp(address: object) -> str:
    """The address type label of the request metrics."""
    if isinstance(address, AddressId):
        return "id"
    if isinstance(address, str):
        return "domain"
    return "ipv6" if getattr(address, "version", 4) == 6 else "ipv4"
