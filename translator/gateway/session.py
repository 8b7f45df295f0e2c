"""One client connection: handshake, requests, and the hand-over to the relay.

The codec (``translator.wire``) owns every byte; this module decides. Each request either
succeeds, or fails with exactly one reply code from ``replies.rep_for`` and one log line,
and then the connection closes (profile 3). Nothing a client sends can raise out of here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

from addrmap import AddrMapError, Owner, Target
from translator import policy as pol
from translator.net.addresses import IPAddress, as_target, owner_for, sockaddr_ip
from translator.net.resolver import ResolveError
from translator.relay.channel import Channel, ChannelClosed
from translator.relay.tcp import RelayStats, relay
from translator.wire import (
    FLAG_REAL_FAMILY,
    NEED_DATA,
    PAUSED,
    Address,
    AddressId,
    Command,
    Event,
    Greeting,
    Method,
    Phase,
    RemoteProtocolError,
    Rep,
    Request,
    ServerConnection,
    Socks4Request,
    Socks6Attempt,
    UserPassRequest,
)

from .replies import GatewayError, describe, rep_for

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("socks64.session")

_POLICY_COMMAND = {
    Command.CONNECT: pol.Command.CONNECT,
    Command.CONNECT_AA: pol.Command.CONNECT,
    Command.BIND: pol.Command.BIND,
    Command.BIND_AA: pol.Command.BIND,
    Command.UDP_ASSOCIATE: pol.Command.UDP,
    Command.UDP_ASSOCIATE_AA: pol.Command.UDP,
    Command.ADDRESS_ASSOCIATE: pol.Command.ASSOCIATE,
}
_METHOD_BY_NAME = {"none": Method.NO_AUTH, "username": Method.USERNAME_PASSWORD}


class ClientGone(Exception):
    """The client closed or reset its connection; nothing more to say to it."""


class Session:
    """Serves one accepted client connection from greeting to close."""

    def __init__(self, gateway: Gateway, channel: Channel) -> None:
        self.gw = gateway
        self.channel = channel
        peer = channel.peername
        self.client_ip: IPAddress = sockaddr_ip(peer)
        self.client_port: int = int(peer[1])  # type: ignore[call-overload]
        self.facing_ip: IPAddress = sockaddr_ip(channel.sockname)
        self.user: str | None = None
        self.conn = ServerConnection()
        self._pins: list[int] = []

    @property
    def label(self) -> str:
        """The client as logs name it; built only when something is logged."""
        if self.client_ip.version == 6:
            return f"[{self.client_ip}]:{self.client_port}"
        return f"{self.client_ip}:{self.client_port}"

    @property
    def owner(self) -> Owner:
        return owner_for(self.client_ip, self.user)

    # -- I/O helpers ------------------------------------------------------------------

    async def next_event(self, deadline: float) -> Event:
        """The next client message; TimeoutError at ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            event = self.conn.next_event()
            if event is PAUSED:
                raise AssertionError("codec paused with no answer pending")
            if event is not NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                # Most requests are already in the kernel: skip the loop round trip.
                data = self.channel.recv_ready(4096)
                if data is None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(remaining):
                        data = await self.channel.recv(4096)
            except ChannelClosed as exc:
                raise ClientGone(str(exc)) from None
            if not data:
                raise ClientGone("closed by client")
            self.conn.receive_data(data)

    async def send(self, data: bytes) -> None:
        """Write codec output; a client that stops reading cannot stall us forever."""
        if not data:
            return
        try:
            rest = self.channel.send_now(data)  # replies are small: the kernel takes them
            if rest:
                async with asyncio.timeout(self.gw.config.timeouts.handshake):
                    await self.channel.send_all(rest)
        except ChannelClosed as exc:
            raise ClientGone(str(exc)) from None

    async def relay_after(self, reply: bytes, peer: socket.socket) -> RelayStats:
        """Send the final success reply, then relay; both sockets end closed."""
        try:
            await self.send(reply)
        except BaseException:
            peer.close()
            raise
        trailing = self.conn.take_trailing_data()  # the client pipelined payload
        return await relay(
            self.channel.detach(),
            peer,
            idle_timeout=self.gw.config.timeouts.idle,
            clock=self.gw.clock,
            to_peer=trailing,
        )

    def pin(self, realid: int) -> None:
        if self.gw.table.pin(self.owner, realid):
            self._pins.append(realid)

    # -- main -------------------------------------------------------------------------

    async def run(self) -> None:
        what = "handshake"
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.gw.config.timeouts.handshake
            event = await self.next_event(deadline)
            if isinstance(event, Socks6Attempt):
                await self.send(self.conn.send_socks6_mismatch())
                log.info("%s: SOCKS 6 is not implemented yet; sent version mismatch", self.label)
                return
            if isinstance(event, Socks4Request):
                from .socks4 import serve_socks4

                what = f"SOCKS4 {event.command.name}"
                await serve_socks4(self, event)
                return
            assert isinstance(event, Greeting)
            if not await self._negotiate(event, deadline):
                return
            await self._serve_requests(deadline)
        except ClientGone as exc:
            log.debug("%s: %s during %s", self.label, exc, what)
        except TimeoutError:
            log.info("%s: handshake timed out", self.label)
        except RemoteProtocolError as exc:
            await self._fail_quietly(exc.rep or Rep.GENERAL_FAILURE)
            log.info("%s: protocol error: %s", self.label, exc.reason)
        except Exception:  # a bug must cost one client, never the gateway
            log.exception("%s: internal error", self.label)
        finally:
            for realid in self._pins:
                self.gw.table.unpin(self.owner, realid)
            self._pins.clear()

    async def _fail_quietly(self, rep: Rep) -> None:
        with contextlib.suppress(ClientGone, TimeoutError):
            await self.send(self.conn.send_error(rep))

    async def _negotiate(self, greeting: Greeting, deadline: float) -> bool:
        offered = set(greeting.methods)
        chosen = next(
            (
                _METHOD_BY_NAME[name]
                for name in self.gw.config.auth.methods
                if _METHOD_BY_NAME[name] in offered
            ),
            Method.NO_ACCEPTABLE,
        )
        await self.send(self.conn.send_method(chosen))
        if chosen == Method.NO_ACCEPTABLE:
            log.info("%s: no acceptable method among %s", self.label, sorted(offered))
            return False
        if chosen == Method.USERNAME_PASSWORD:
            event = await self.next_event(deadline)
            assert isinstance(event, UserPassRequest)
            user = event.username.decode("utf-8", "replace")
            password = event.password.decode("utf-8", "replace")
            ok = await self.gw.verify_password(user, password)
            await self.send(self.conn.send_auth_result(ok))
            if not ok:
                log.info("%s: authentication failed for user %r", self.label, user)
                return False
            self.user = user
        return True

    async def _serve_requests(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        limit = self.gw.config.limits.max_requests_per_connection
        for _ in range(limit):
            request = await self.next_event(deadline)
            assert isinstance(request, Request)
            try:
                if request.command == Command.ADDRESS_ASSOCIATE:
                    from .associate import address_associate

                    reply = await address_associate(self, request)
                    await self.send(self.conn.send_reply(reply, then=Phase.REQUEST))
                    # The control channel stays open (profile 5): next request within idle.
                    deadline = loop.time() + self.gw.config.timeouts.idle
                    continue
                await self._final_request(request)
            except (GatewayError, OSError, ResolveError, AddrMapError) as exc:
                await self.refuse(request, exc)
            return
        await self.refuse_text(Rep.GENERAL_FAILURE, f"more than {limit} requests on one connection")

    async def _final_request(self, request: Request) -> None:
        base = request.command.base
        if base == Command.CONNECT:
            from .connect import serve_connect

            await serve_connect(self, request)
        elif base == Command.BIND:
            from .bind import serve_bind

            await serve_bind(self, request)
        else:
            from .udp import serve_udp

            await serve_udp(self, request)

    async def refuse(self, request: Request | None, exc: BaseException) -> None:
        rep = rep_for(exc)
        what = "" if request is None else f"{request.command.name} {_show(request)}: "
        log.info("%s: %s%s -> REP %d %s", self.label, what, describe(exc), rep, rep.name)
        await self._fail_quietly(rep)

    async def refuse_text(self, rep: Rep, reason: str) -> None:
        await self.refuse(None, GatewayError(rep, reason))

    # -- shared request steps ---------------------------------------------------------

    def policy_command(self, command: Command) -> pol.Command:
        return _POLICY_COMMAND[command]

    def target_of(self, address: Address) -> tuple[Target, int | None]:
        """A request's address as a table target, and the REALID when it was an ID."""
        if isinstance(address, AddressId):
            if address.unspecified:
                raise GatewayError(Rep.INVALID_ADDRESS, "the unspecified ADDRESS ID names nothing")
            target = self.gw.table.lookup(self.owner, address.realid)
            if target is None:
                raise GatewayError(Rep.INVALID_ADDRESS, f"unknown or foreign {address}")
            return target, address.realid
        return as_target(address), None

    async def destination(
        self, address: Address, port: int, command: pol.Command
    ) -> tuple[Target, list[IPAddress], int | None]:
        """Resolve a destination to the addresses the policy lets this client reach."""
        policy = self.gw.config.policy
        if not policy.may_allow(client=self.client_ip, user=self.user, command=command):
            raise GatewayError(Rep.NOT_ALLOWED, "no rule allows this client")
        target, realid = self.target_of(address)
        name = target if isinstance(target, str) else None
        candidates = [target] if name is None else await self.gw.resolver.resolve(name)
        allowed: list[IPAddress] = []
        reason = ""
        for candidate in candidates:
            decision = policy.check(
                client=self.client_ip,
                user=self.user,
                command=command,
                address=candidate,  # type: ignore[arg-type]
                name=name,
                port=port,
            )
            if decision.allowed:
                allowed.append(candidate)  # type: ignore[arg-type]
            else:
                reason = decision.reason
        if not allowed:
            raise GatewayError(Rep.NOT_ALLOWED, f"denied by policy ({reason})")
        return target, allowed, realid

    def reply_flag(self, request: Request, honoured: int = 0) -> int:
        """FLAG bits echoed in a reply: only those the gateway understood and honoured."""
        return (request.flag & FLAG_REAL_FAMILY) | honoured


def _show(request: Request) -> str:
    address = request.address
    text = f"[{address}]" if ":" in str(address) else str(address)
    return f"{text}:{request.port}"
