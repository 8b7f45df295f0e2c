"""What a request handler returns: the reply to send and what the session does next.

The session carries each outcome out: it is the only code that reads or writes the
client socket. Every reply in an outcome is a success; failures are raised instead.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from translator.net.addresses import IPAddress
from translator.relay.listeners import BindListener
from translator.relay.udp import UdpAssociation
from translator.wire import Phase, Reply, Socks4Reply

AnyReply = Reply | Socks4Reply


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class NextRequest:
    """Reply, then read the next request on the same connection (ADDRESS ASSOCIATE)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Relay:
    """Reply, then relay the client and ``peer`` until either ends (CONNECT)."""

    reply: AnyReply
    peer: socket.socket  # connected, non-blocking; the session owns it from here
    what: tuple[str, object, int]  # for the log, built only when logged: ("CONNECT", to, port)
    #: the IPv4 address ``peer`` is connected to, when known (saves a getpeername)
    reached: IPv4Address | None = None


@dataclass(frozen=True, slots=True)
class AwaitPeer:
    """BIND: the first reply, one peer accepted while the client waits, the second reply
    (built for that peer by ``second``), then the relay."""

    first: AnyReply
    listener: BindListener
    expected: Callable[[IPAddress], bool]
    second: Callable[[IPAddress, int], Awaitable[AnyReply]]
    release: Callable[[], None] = _nothing  # once done with the listener, however it ends


@dataclass(frozen=True, slots=True)
class Hold:
    """Reply, then keep the connection (and what ``release`` frees) until the client
    closes it: the BIND MULTI holding connection."""

    reply: Reply
    release: Callable[[], None] = _nothing


@dataclass(frozen=True, slots=True)
class Associate:
    """Reply, then serve the UDP control channel (or tunnel) in ``then`` until the client
    leaves or the association goes idle; the association ends with the connection."""

    reply: Reply
    association: UdpAssociation
    then: Phase  # UDP_CONTROL or TUNNEL


Outcome = NextRequest | Relay | AwaitPeer | Hold | Associate
