"""addrmap.backend: redis:// — gateways sharing one table in a real redis-server.

Two ``socks64 serve`` processes (one of them with workers) on one Redis accept each
other's IDs; while Redis is down, what needs the table is refused with REP X'01' and
logged, everything else is served, and the gateways come back by themselves.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.dnsserver import DnsServer
from tests.redisfixture import RedisServer
from translator.wire import AddressId, Command, Rep, Request

from .gateway_process import (
    Spawn,
    echo_handler,
    echo_round_trip,
    free_port,
    gateway_config,
    serve,
    socks_connect,
    socks_greet,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    write_config,
)
from .test_workers import LOOPBACK, ask, associate, connected_by_id, serve_workers

OTHER = "127.0.0.2"  # another loopback destination: a target no gateway has seen


def _config(
    tmp_path: Path, name: str, dns: DnsServer, port: int, url: str, **extra: object
) -> Path:
    document = gateway_config(dns.address, [f"127.0.0.1:{port}"], addrmap={"backend": url}, **extra)
    return write_config(tmp_path / f"{name}.yaml", document)


def test_two_gateways_on_one_redis_accept_each_others_ids(
    tmp_path: Path, dns: DnsServer, spawn: Spawn, redis_server: RedisServer
) -> None:
    port_a, port_b = free_port(), free_port()
    a = serve(spawn, _config(tmp_path, "a", dns, port_a, redis_server.url))
    b = serve_workers(spawn, _config(tmp_path, "b", dns, port_b, redis_server.url, workers=2))
    gateway_a, gateway_b = ("127.0.0.1", port_a), ("127.0.0.1", port_b)
    with tcp_server(echo_handler) as echo:
        made = associate(gateway_a, LOOPBACK).address
        assert isinstance(made, AddressId)
        for _ in range(8):  # on whichever worker of b
            with connected_by_id(gateway_b, made.realid, echo.port) as relayed:
                echo_round_trip(relayed, b"an ID from the other gateway")
            assert associate(gateway_b, LOOPBACK).address == made  # the same target: same ID
        other = associate(gateway_b, OTHER).address
        assert isinstance(other, AddressId) and other != made
        with socks_greet(gateway_a) as sock:  # b's ID, by a: known there too
            reply = ask(sock, Request(Command.ADDRESS_ASSOCIATE, other, 0x01))  # as IPv4
            assert str(reply.address) == OTHER
    assert a.stop() == 0 and b.stop() == 0
    a.assert_clean()
    b.assert_clean()


def test_a_redis_outage_refuses_only_what_needs_the_table_and_passes(
    tmp_path: Path, dns: DnsServer, spawn: Spawn, redis_server: RedisServer
) -> None:
    port = free_port()
    child = serve(spawn, _config(tmp_path, "gw", dns, port, redis_server.url))
    gateway = ("127.0.0.1", port)
    with tcp_server(echo_handler) as echo:
        known = associate(gateway, LOOPBACK).address
        assert isinstance(known, AddressId)
        mark = child.mark()
        redis_server.stop()
        started = time.monotonic()
        assert associate(gateway, OTHER).rep == Rep.GENERAL_FAILURE  # needs Redis: REP 1
        assert time.monotonic() - started < 3  # within about the backend's timeout
        child.wait_for(
            r"ADDRESS_ASSOCIATE .* refused REP 1 GENERAL_FAILURE: TableUnavailable", after=mark
        )
        with socks_greet(gateway) as sock:  # an ID nobody here has seen
            reply = ask(sock, Request(Command.CONNECT, AddressId(0x123456), echo.port))
            assert reply.rep == Rep.GENERAL_FAILURE
        # Everything else goes on: a literal, and the ID this gateway has already seen.
        with socks_connect(gateway, "127.0.0.1", echo.port) as relayed:
            echo_round_trip(relayed, b"no table needed")
        with connected_by_id(gateway, known.realid, echo.port) as relayed:
            echo_round_trip(relayed, b"a cached ID")
        child.wait_for(r"WARNING socks64\.idtable: shared ID table unavailable", after=mark)

        redis_server.start()  # back (empty: this test server keeps nothing on disk)
        deadline = time.monotonic() + 10
        while associate(gateway, OTHER).rep != Rep.SUCCEEDED:
            assert time.monotonic() < deadline, "the gateway did not reconnect to Redis"
            time.sleep(0.2)
        child.wait_for(r"shared ID table reachable again", after=mark, timeout=5)
    assert child.stop() == 0
    child.assert_clean()
