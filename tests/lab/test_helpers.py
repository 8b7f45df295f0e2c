"""Pure helpers of the lab: polling with an injected clock, probe address forms, endpoints."""

from __future__ import annotations

import ipaddress

import pytest
from netnslab.cli import format_table
from netnslab.probe import all_actions, build_parser, describe, parse_address
from netnslab.scenarios import Outcome
from netnslab.services import dns_query_packet, split_endpoint
from netnslab.testserver import echo_reply, parse_echo_reply
from netnslab.timing import poll_until
from netnslab.topology import TopologyError


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_poll_until_gives_up_at_the_deadline_without_real_sleeping() -> None:
    clock = FakeClock()
    assert not poll_until(lambda: False, timeout=2.0, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(102.0)
    assert max(clock.slept) <= 0.5  # backs off, but never past half a second


def test_poll_until_returns_as_soon_as_the_condition_holds() -> None:
    clock = FakeClock()
    calls = iter([False, False, True])
    assert poll_until(lambda: next(calls), timeout=10.0, clock=clock, sleep=clock.sleep)
    assert len(clock.slept) == 2


def test_probe_addresses_round_trip_through_their_text_form() -> None:
    from translator.client import AddressId

    realid = parse_address("id:00beef")
    assert realid == AddressId(0xBEEF)
    assert describe(realid) == {"kind": "id", "text": "id:00beef"}
    assert parse_address("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert describe(parse_address("v6.lab.test")) == {"kind": "domain", "text": "v6.lab.test"}


@pytest.mark.parametrize(
    "bad", ["2001:db8::1:80", "192.0.2.1", "[2001:db8::1]80", "x:1", "1.2.3.4:0"]
)
def test_malformed_endpoints_are_rejected(bad: str) -> None:
    with pytest.raises(TopologyError):
        split_endpoint(bad)


def test_dns_query_packet_encodes_the_name_as_labels() -> None:
    packet = dns_query_packet("v4.lab.test", 1, 0x1234)
    assert packet[:2] == b"\x12\x34"
    assert packet[12:] == b"\x02v4\x03lab\x04test\x00\x00\x01\x00\x01"


def test_run_table_ends_with_the_counts() -> None:
    table = format_table(
        [Outcome("a", True, "fine", 0.1), Outcome("bb", False, "REP 4\nafter 2s", 2.0)]
    )
    lines = table.splitlines()
    assert lines[-1] == "1 passed, 1 failed"
    assert lines[3].split()[:2] == ["bb", "FAIL"] and lines[3].endswith("REP 4 after 2s")


def test_udp_echo_reply_names_the_sender_the_server_saw() -> None:
    reply = echo_reply("s6", "2001:db8:5e6::1", 27352, b"hello 0\nsecond line")
    assert parse_echo_reply(reply) == ("s6", "2001:db8:5e6::1", 27352, b"hello 0\nsecond line")


@pytest.mark.parametrize(
    "garbage", [b"", b"hello", b"echo from s6; peer x\nhi", b"echo from s6; peer h p\nhi"]
)
def test_anything_but_an_echo_reply_is_not_parsed_as_one(garbage: bytes) -> None:
    assert parse_echo_reply(garbage) is None


def test_probe_knows_the_udp_actions_and_their_flags() -> None:
    args = build_parser().parse_args(
        ["udp-echo", "--dest", "v6.lab.test", "--use-client-port", "--local-port", "20001"]
    )
    assert args.use_client_port and args.local_port == 20001 and not args.tunnel
    assert {"udp-echo", "pysocks-udp", "mcast-recv", "mcast-send", "udp-hold"} <= set(all_actions())
