"""Request handlers on a fake resolver, connector and clock: what each request kind
answers, refuses, pins and connects to, with no socket and no DNS."""

from __future__ import annotations

import errno
from ipaddress import IPv4Address, IPv6Address

import pytest

from addrmap import Owner
from tests.unit.fakes import make_ctx, make_services, refused
from translator.gateway.associate import address_associate
from translator.gateway.bind import Expected, serve_bind
from translator.gateway.connect import serve_connect
from translator.gateway.context import RequestContext
from translator.gateway.outcomes import AwaitPeer, NextRequest, Relay
from translator.gateway.replies import GatewayError, rep_for
from translator.gateway.socks4 import serve_socks4
from translator.gateway.udp import association_deps, control
from translator.net.resolver import ResolveError
from translator.relay.udp import UdpAssociation
from translator.wire import (
    FLAG_BIND_MULTI,
    FLAG_REAL_FAMILY,
    Address,
    AddressId,
    Atyp,
    Command,
    ControlRequest,
    ControlSub,
    Greeting,
    Method,
    Phase,
    Rep,
    Request,
    ServerConnection,
    Socks4Command,
    Socks4Request,
    Socks4Status,
    decode_reply,
)

V4_DEST = IPv4Address("198.51.100.4")
V6_DEST = IPv6Address("2001:db8:6::6")


def request(command: Command, address: Address, port: int, flag: int = 0) -> Request:
    return Request(command, address, port, flag)


async def refusal(coro: object) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await coro  # type: ignore[misc]
    return info.value


# -- ADDRESS ASSOCIATE -------------------------------------------------------------------


async def test_associate_issues_an_id_that_names_the_target_for_this_owner_only() -> None:
    services, _, resolver, _ = make_services()
    ctx = make_ctx(services)
    answer = await address_associate(ctx, request(Command.ADDRESS_ASSOCIATE, "V6.Example.Test", 0))
    assert isinstance(answer, NextRequest)
    assert answer.reply.rep == Rep.SUCCEEDED
    assert isinstance(answer.reply.address, AddressId)
    realid = answer.reply.address.realid
    assert services.ids.table.lookup(ctx.owner, realid) == "v6.example.test"
    assert services.ids.table.lookup(Owner("192.0.2.8"), realid) is None
    assert resolver.asked == []  # an ID is issued for the name; nothing resolved yet


@pytest.mark.parametrize(
    ("target", "preference", "expected"),
    [
        ("dual.example.test", Atyp.IPV4, IPv4Address("198.51.100.46")),  # forward, A
        ("dual.example.test", Atyp.IPV6, IPv6Address("2001:db8:46::46")),  # forward, AAAA
        (V6_DEST, Atyp.DOMAIN, "v6.example.test"),  # reverse, PTR without the final dot
        (V4_DEST, Atyp.IPV4, V4_DEST),  # already in the asked form
        ("v6.example.test", Atyp.DOMAIN, "v6.example.test"),
    ],
)
async def test_associate_answers_in_the_form_adr_pref_asks_for(
    target: Address, preference: int, expected: Address
) -> None:
    services, _, _, _ = make_services()
    answer = await address_associate(
        make_ctx(services), request(Command.ADDRESS_ASSOCIATE, target, preference)
    )
    assert answer.reply.address == expected
    assert answer.reply.port == 0


async def test_associate_real_family_flag_gives_the_address_the_gateway_would_use() -> None:
    services, _, _, _ = make_services()  # resolver.prefer: ipv6 by default
    answer = await address_associate(
        make_ctx(services),
        request(Command.ADDRESS_ASSOCIATE, "dual.example.test", Atyp.IPV4, FLAG_REAL_FAMILY),
    )
    assert answer.reply.address == IPv6Address("2001:db8:46::46")
    assert answer.reply.flag == FLAG_REAL_FAMILY


@pytest.mark.parametrize(
    ("target", "preference", "rep"),
    [
        (V4_DEST, Atyp.IPV6, Rep.ADDRESS_TYPE_NOT_SUPPORTED),  # no IPv6 form of an IPv4
        (V4_DEST, 0x42, Rep.ADDRESS_TYPE_NOT_SUPPORTED),  # unknown ADR.PREF
        (IPv4Address("203.0.113.5"), 0, Rep.NOT_ALLOWED),  # policy: denied range
        (AddressId(0x123456), 0, Rep.INVALID_ADDRESS),  # never issued
        (AddressId(0), 0, Rep.INVALID_ADDRESS),  # the unspecified ID names nothing
    ],
)
async def test_associate_refusals_carry_their_reply_code(
    target: Address, preference: int, rep: Rep
) -> None:
    services, _, _, _ = make_services()
    error = await refusal(
        address_associate(
            make_ctx(services), request(Command.ADDRESS_ASSOCIATE, target, preference)
        )
    )
    assert error.rep == rep


async def test_associate_by_a_client_no_rule_allows_is_refused_before_any_lookup() -> None:
    services, _, resolver, _ = make_services()
    stranger = make_ctx(services, client="198.51.100.99")
    error = await refusal(
        address_associate(stranger, request(Command.ADDRESS_ASSOCIATE, "v6.example.test", 6))
    )
    assert error.rep == Rep.NOT_ALLOWED
    assert resolver.asked == []


async def test_associate_reverse_of_an_unknown_address_is_host_unreachable() -> None:
    services, _, _, _ = make_services()
    with pytest.raises(ResolveError) as info:
        await address_associate(
            make_ctx(services), request(Command.ADDRESS_ASSOCIATE, V4_DEST, Atyp.DOMAIN)
        )
    assert rep_for(info.value) == Rep.HOST_UNREACHABLE


async def test_associate_reply_goes_through_the_codec_and_keeps_the_connection() -> None:
    services, _, _, _ = make_services()
    conn = ServerConnection()
    conn.receive_data(Greeting((Method.NO_AUTH,)).encode())
    assert isinstance(conn.next_event(), Greeting)
    conn.send_method(Method.NO_AUTH)
    conn.receive_data(request(Command.ADDRESS_ASSOCIATE, "v4.example.test", Atyp.IPV4).encode())
    event = conn.next_event()
    assert isinstance(event, Request)
    answer = await address_associate(make_ctx(services), event)
    wire = conn.send_reply(answer.reply, then=Phase.REQUEST)
    decoded = decode_reply(bytearray(wire))
    assert decoded is not None
    assert decoded[0].address == V4_DEST
    assert conn.phase is Phase.REQUEST  # the next request may follow


# -- CONNECT -----------------------------------------------------------------------------


async def test_connect_by_name_tries_only_the_addresses_the_policy_allows() -> None:
    services, connector, _, _ = make_services()
    outcome = await serve_connect(
        make_ctx(services), request(Command.CONNECT, "half.example.test", 80)
    )
    assert isinstance(outcome, Relay)
    assert connector.calls == [([IPv6Address("2001:db8:9::9")], 80)]  # 203.0.113.9 dropped


async def test_connect_reply_is_in_the_client_family_unless_real_family_is_asked() -> None:
    services, _, _, _ = make_services()
    v4_client = make_ctx(services)  # reached us on 192.0.2.1
    plain = await serve_connect(v4_client, request(Command.CONNECT, V6_DEST, 80))
    assert plain.reply.address == IPv4Address("192.0.2.1")  # the v6 local address is hidden
    assert plain.reply.port == 50006
    real = await serve_connect(v4_client, request(Command.CONNECT, V6_DEST, 80, FLAG_REAL_FAMILY))
    assert real.reply.address == IPv6Address("2001:db8::1")
    assert real.reply.flag == FLAG_REAL_FAMILY


async def test_connect_aa_answers_with_a_pinned_id_of_the_destination() -> None:
    services, _, _, clock = make_services()
    ctx = make_ctx(services)
    outcome = await serve_connect(ctx, request(Command.CONNECT_AA, "v6.example.test", 80))
    bound = outcome.reply.address
    assert isinstance(bound, AddressId)
    assert services.ids.table.lookup(ctx.owner, bound.realid) == "v6.example.test"
    assert ctx.pins == [bound.realid]
    clock.now += 10 * services.config.addrmap.ttl
    assert services.ids.table.expire() == 0  # pinned while the connection lives
    ctx.unpin_all()
    clock.now += 10 * services.config.addrmap.ttl
    assert services.ids.table.expire() == 1


async def test_connect_by_id_pins_it_once_and_answers_with_the_same_id() -> None:
    services, connector, _, _ = make_services()
    ctx = make_ctx(services)
    realid = services.ids.table.associate(ctx.owner, "v4.example.test")
    outcome = await serve_connect(ctx, request(Command.CONNECT_AA, AddressId(realid), 443))
    assert outcome.reply.address == AddressId(realid)
    assert ctx.pins == [realid]
    assert connector.calls == [([V4_DEST], 443)]


@pytest.mark.parametrize(
    ("address", "port", "rep"),
    [
        ("denied.example.test", 80, Rep.NOT_ALLOWED),
        (V4_DEST, 25, Rep.NOT_ALLOWED),  # denied port
        (AddressId(0x0ABCDE), 80, Rep.INVALID_ADDRESS),
    ],
)
async def test_connect_refused_before_any_connection(address: Address, port: int, rep: Rep) -> None:
    services, connector, _, _ = make_services()
    error = await refusal(
        serve_connect(make_ctx(services), request(Command.CONNECT, address, port))
    )
    assert error.rep == rep
    assert connector.calls == []


async def test_connect_failure_keeps_its_errno_for_the_reply_code() -> None:
    services, connector, _, _ = make_services()
    connector.fail_with = refused(errno.ECONNREFUSED)
    with pytest.raises(OSError) as info:
        await serve_connect(make_ctx(services), request(Command.CONNECT, V4_DEST, 1))
    assert rep_for(info.value) == Rep.CONNECTION_REFUSED


async def test_connect_id_of_another_owner_is_invalid_address() -> None:
    services, connector, _, _ = make_services()
    other = services.ids.table.associate(Owner("192.0.2.8"), "v4.example.test")
    error = await refusal(
        serve_connect(make_ctx(services), request(Command.CONNECT, AddressId(other), 80))
    )
    assert error.rep == Rep.INVALID_ADDRESS
    assert connector.calls == []


# -- SOCKS 4 -----------------------------------------------------------------------------


async def test_socks4a_connect_by_name_relays_with_a_granted_reply() -> None:
    services, connector, _, _ = make_services()
    outcome = await serve_socks4(
        make_ctx(services), Socks4Request(Socks4Command.CONNECT, 80, "v4.example.test")
    )
    assert isinstance(outcome, Relay)
    assert outcome.reply.status == Socks4Status.GRANTED  # type: ignore[union-attr]
    assert connector.calls == [([V4_DEST], 80)]


# -- BIND --------------------------------------------------------------------------------


class _HeldListener:
    """A MULTI listener another connection holds, as the registry hands it out."""

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.address = IPv6Address("2001:db8::1")
        self.port = 41000
        self.closed = False
        self.expected = lambda peer: True


async def test_bind_multi_attaches_to_the_owners_held_listener() -> None:
    services, _, _, _ = make_services()
    ctx = make_ctx(services)
    held = _HeldListener(ctx.owner)
    services.multi.add(held)  # type: ignore[arg-type]
    outcome = await serve_bind(ctx, request(Command.BIND, V6_DEST, 41000, FLAG_BIND_MULTI))
    assert isinstance(outcome, AwaitPeer)
    assert outcome.listener is held
    assert outcome.first.address == IPv4Address("192.0.2.1")  # v6 listener, v4 client
    assert outcome.first.port == 41000 and outcome.first.flag == FLAG_BIND_MULTI
    second = await outcome.second(IPv6Address("2001:db8:6::6"), 5555)
    assert (second.address, second.port) == (IPv4Address("192.0.2.1"), 5555)
    outcome.release()
    assert not held.closed  # the holding connection owns it


async def test_bind_multi_of_another_owner_does_not_attach() -> None:
    services, _, _, _ = make_services()
    services.multi.add(_HeldListener(Owner("192.0.2.8")))  # type: ignore[arg-type]
    error = await refusal(
        serve_bind(
            make_ctx(services, client="198.51.100.99"),
            request(Command.BIND, V6_DEST, 41000, FLAG_BIND_MULTI),
        )
    )
    assert error.rep == Rep.NOT_ALLOWED  # treated as a new BIND, which the policy refuses


def test_bind_admits_only_the_expected_peers_the_policy_allows() -> None:
    services, _, _, _ = make_services()
    ctx = make_ctx(services)
    expected = Expected(ctx, [V4_DEST, IPv4Address("203.0.113.5")])
    assert expected(V4_DEST)
    assert not expected(IPv4Address("198.51.100.5"))  # not the peer the client named
    assert not expected(IPv4Address("203.0.113.5"))  # named, but denied
    anyone = Expected(ctx, None)
    assert anyone(IPv4Address("198.51.100.5"))
    assert not anyone(IPv4Address("203.0.113.7"))


# -- UDP control channel -----------------------------------------------------------------


def _association(ctx: RequestContext) -> UdpAssociation:
    return UdpAssociation(association_deps(ctx), aa=False, real_family=False, client_port=None)


@pytest.mark.parametrize(
    ("sub", "address", "rep"),
    [
        (ControlSub.MULTICAST_JOIN, V4_DEST, Rep.INVALID_ADDRESS),  # not a group
        (ControlSub.MULTICAST_JOIN, IPv4Address("239.9.9.9"), Rep.NETWORK_UNREACHABLE),
        (ControlSub.MULTICAST_LEAVE, "group.example.test", Rep.INVALID_ADDRESS),  # not joined
        (ControlSub.INTERFACE_DATA, "denied.example.test", Rep.NOT_ALLOWED),
    ],
)
async def test_control_refusals_map_to_their_reply_code(
    sub: ControlSub, address: Address, rep: Rep
) -> None:
    services, _, _, _ = make_services()
    ctx = make_ctx(services)
    association = _association(ctx)
    try:
        with pytest.raises(Exception) as info:
            await control(ctx, association, ControlRequest(sub, address, 5000))
        assert rep_for(info.value) == rep
        assert association.memberships == {}
    finally:
        association.close()
