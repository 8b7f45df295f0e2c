"""An asyncio client for everything socks64 speaks: the tests', the lab's and users'."""

from __future__ import annotations

from translator.wire import Address, AddressId

from .connection import ControlConnection, SocksReplyError
from .socks import Listener, SocksClient, Stream, open_connection
from .udp import UdpSession, client_udp_socket

__all__ = [
    "Address",
    "AddressId",
    "ControlConnection",
    "Listener",
    "SocksClient",
    "SocksReplyError",
    "Stream",
    "UdpSession",
    "client_udp_socket",
    "open_connection",
]
