"""UdpAssociation with in-memory transports: who may send, where datagrams go, and how
peers' sources are written back to the client. No socket is opened."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from tests.unit.fakes import make_ctx, make_services
from translator.gateway.udp import association_deps
from translator.relay.udp import UdpAssociation
from translator.wire import AddressId, UdpDatagram, decode_udp_datagram

CLIENT = ("192.0.2.7", 40001)
V6_PEER = IPv6Address("2001:db8:6::6")


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str) -> Any:
        return ("0.0.0.0", 50000) if name == "sockname" else None

    def close(self) -> None:
        pass


def _association(*, aa: bool = False) -> tuple[UdpAssociation, dict[int, FakeTransport]]:
    services, _, _, _ = make_services()
    association = UdpAssociation(
        association_deps(make_ctx(services)), aa=aa, real_family=False, client_port=None
    )
    transports = {
        0: FakeTransport(),  # the client-facing relay socket
        socket.AF_INET: FakeTransport(),
        socket.AF_INET6: FakeTransport(),
    }
    association.relay = transports[0]  # type: ignore[assignment]
    association.outbound = {f: transports[f] for f in (socket.AF_INET, socket.AF_INET6)}  # type: ignore[misc]
    return association, transports


def _from_client(association: UdpAssociation, address: Any, port: int, data: bytes) -> None:
    association.from_client(UdpDatagram(address, port, data).encode(), CLIENT)


async def test_client_datagrams_go_out_without_their_header_to_the_right_family() -> None:
    association, transports = _association()
    _from_client(association, V6_PEER, 53, b"query")
    _from_client(association, V6_PEER, 53, b"again")  # the cached route: same result
    _from_client(association, IPv4Address("198.51.100.4"), 7, b"v4")
    assert transports[socket.AF_INET6].sent == [
        (b"query", ("2001:db8:6::6", 53)),
        (b"again", ("2001:db8:6::6", 53)),
    ]
    assert transports[socket.AF_INET].sent == [(b"v4", ("198.51.100.4", 7))]
    assert association.stats.to_peers == 3
    association.close()


async def test_only_the_client_may_send_and_its_first_port_is_pinned() -> None:
    association, transports = _association()
    association.from_client(UdpDatagram(V6_PEER, 53, b"x").encode(), ("192.0.2.8", 40001))
    assert association.stats.dropped_foreign == 1
    _from_client(association, V6_PEER, 53, b"pinned")
    association.from_client(UdpDatagram(V6_PEER, 53, b"x").encode(), ("192.0.2.7", 40002))
    assert association.stats.dropped_foreign == 2
    assert [d for d, _ in transports[socket.AF_INET6].sent] == [b"pinned"]
    association.close()


async def test_denied_and_malformed_datagrams_are_dropped_and_counted() -> None:
    association, transports = _association()
    _from_client(association, IPv4Address("203.0.113.5"), 53, b"denied")
    association.from_client(b"\x00\x00\x00\x07garbage", CLIENT)
    assert association.stats.dropped_policy == 1
    assert association.stats.dropped_malformed == 1
    assert transports[socket.AF_INET].sent == []
    association.close()


async def test_a_peer_of_the_other_family_comes_back_under_the_name_the_client_used() -> None:
    association, transports = _association()
    _from_client(association, "v6.example.test", 53, b"query")
    for _ in range(5):  # the name resolves in a task of the association's
        await asyncio.sleep(0)
    assert transports[socket.AF_INET6].sent == [(b"query", ("2001:db8:6::6", 53))]
    association.from_peer(b"answer", ("2001:db8:6::6", 53, 0, 0))
    packet, to = transports[0].sent[-1]
    assert to == ("192.0.2.7", 40001)
    datagram = decode_udp_datagram(packet)
    assert (datagram.address, datagram.port, datagram.data) == ("v6.example.test", 53, b"answer")
    association.close()


async def test_an_unnamed_peer_of_the_other_family_cannot_be_shown_and_is_dropped() -> None:
    association, transports = _association()
    _from_client(association, V6_PEER, 53, b"hello")  # pins the client's port
    association.from_peer(b"who?", ("2001:db8:99::1", 53, 0, 0))
    assert association.stats.dropped_unrenderable == 1
    assert transports[0].sent == []
    association.close()


async def test_udp_aa_shows_every_peer_as_an_id_of_the_clients() -> None:
    association, transports = _association(aa=True)
    _from_client(association, V6_PEER, 53, b"hello")
    association.from_peer(b"hi", ("2001:db8:6::6", 53, 0, 0))
    datagram = decode_udp_datagram(transports[0].sent[-1][0])
    assert isinstance(datagram.address, AddressId)
    deps = association.deps
    assert deps.ids.table.lookup(deps.owner, datagram.address.realid) == V6_PEER
    association.close()
