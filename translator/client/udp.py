"""The client side of UDP ASSOCIATE: a relay socket or a TCP tunnel, control requests.

async with await client.udp_associate() as udp:
    await udp.send("v6.example.test", 53, b"...")
    datagram = await udp.recv()            # UdpDatagram(address=source, port, data)
    address, port = await udp.interface_data("v6.example.test", 53)
    await udp.join(IPv6Address("ff15::1:2"), 5000)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from translator.wire import (
    Address,
    ControlRequest,
    ControlSub,
    Rep,
    Reply,
    UdpDatagram,
    decode_reply,
    decode_tunnel_frame,
    decode_udp_datagram,
    encode_tunnel_frame,
)

from .connection import ControlConnection, SocksReplyError


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[bytes]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.queue.qsize() < 10000:
            self.queue.put_nowait(data)


class UdpSession:
    """An open UDP association. Datagrams to the client arrive in ``recv()``."""

    def __init__(self, client: ControlConnection, reply: Reply, tunnel: bool) -> None:
        self.client = client
        self.reply = reply
        self.tunnel = tunnel
        self.relay: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self._datagrams: asyncio.Queue[bytes] = asyncio.Queue()
        self._replies: asyncio.Queue[Reply] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        #: RFC 1961: datagrams on the relay socket travel wrapped (a tunnel's are already)
        self.sealing = None if tunnel else client.protection

    async def _start(self, sock: socket.socket | None) -> None:
        if self.tunnel:
            self._pump = asyncio.create_task(self._read_tunnel())
            return
        assert sock is not None
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: _Inbox(self._datagrams), sock=sock
        )
        relay_host = str(self.reply.address)
        if self.reply.address.__class__.__name__ == "AddressId":  # UDP+AA: the TCP peer's address
            relay_host = self.client.network.get_extra_info("peername")[0]
        self.relay = (relay_host, self.reply.port)
        self._pump = asyncio.create_task(self._read_replies())

    async def _read_tunnel(self) -> None:
        buffer = self.client._buffer
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                got = decode_tunnel_frame(buffer)
                if got is None:
                    data = await self.client.reader.read(65536)
                    if not data:
                        return
                    buffer += data
                    continue
                payload, used = got
                del buffer[:used]
                if payload[:1] == b"\x05":
                    reply = decode_reply(payload)
                    if reply is not None:
                        self._replies.put_nowait(reply[0])
                else:
                    self._datagrams.put_nowait(payload)

    async def _read_replies(self) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                self._replies.put_nowait(await self.client._read(decode_reply))

    async def send(self, dest: Address, port: int, data: bytes, *, frag: int = 0) -> None:
        packet = UdpDatagram(dest, port, data, frag).encode()
        if self.sealing is not None:
            packet = self.sealing.seal_datagram(packet)
        if self.tunnel:
            self.client.writer.write(encode_tunnel_frame(packet))
            await self.client.writer.drain()
        else:
            assert self.transport is not None and self.relay is not None
            self.transport.sendto(packet, self.relay)

    async def send_raw(self, packet: bytes) -> None:
        """Send bytes as they are (tests of malformed input)."""
        assert self.transport is not None and self.relay is not None
        self.transport.sendto(packet, self.relay)

    async def recv(self, timeout: float = 5.0) -> UdpDatagram:  # noqa: ASYNC109
        packet = await asyncio.wait_for(self._datagrams.get(), timeout)
        if self.sealing is not None:
            packet = self.sealing.open_datagram(packet)
        return decode_udp_datagram(packet)

    async def control(self, request: ControlRequest, timeout: float = 5.0) -> Reply:  # noqa: ASYNC109
        """Send a control channel request; raises SocksReplyError on a failure reply."""
        data = request.encode()
        self.client.writer.write(encode_tunnel_frame(data) if self.tunnel else data)
        await self.client.writer.drain()
        reply = await asyncio.wait_for(self._replies.get(), timeout)
        if reply.rep != Rep.SUCCEEDED:
            raise SocksReplyError(reply.rep)
        return reply

    async def interface_data(self, dest: Address, port: int) -> tuple[Address, int]:
        reply = await self.control(ControlRequest(ControlSub.INTERFACE_DATA, dest, port))
        return reply.address, reply.port

    async def join(self, group: Address, port: int) -> Reply:
        return await self.control(ControlRequest(ControlSub.MULTICAST_JOIN, group, port))

    async def leave(self, group: Address, port: int) -> Reply:
        return await self.control(ControlRequest(ControlSub.MULTICAST_LEAVE, group, port))

    @property
    def local_port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
        if self.transport is not None:
            self.transport.close()
        await self.client.close()

    async def __aenter__(self) -> UdpSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def client_udp_socket(control: asyncio.StreamWriter, port: int = 0) -> socket.socket:
    """A UDP socket on the address our TCP connection uses, so the gateway knows us."""
    local = control.get_extra_info("sockname")
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((local[0], port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
