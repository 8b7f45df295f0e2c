"""A gateway with DNS46 on loopback: pool addresses in SOCKS requests, state, metrics.

No interception here (that needs the lab): DNS46 binds names, and SOCKS clients use the
pool addresses it handed out, which name their names.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest

from tests.conftest import GatewayFactory, RunningGateway, gateway_config, gateways_on
from tests.dnsserver import DnsServer
from tests.integration.service.gateway_process import free_port
from translator.client.socks import SocksClient, SocksReplyError
from translator.gateway.server import Gateway
from translator.transparent.front import TransparentError
from translator.wire import AddressId, Atyp, Rep

POOL = IPv4Network("198.18.0.0/15")


def transparent(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "transparent": {
            "dns_listen": ["127.0.0.1:0"],
            "state_file": str(tmp_path / "transparent.state"),
            **extra,
        }
    }


async def ask(running: RunningGateway, name: str, rdtype: str = "A") -> dns.message.Message:
    front = running.gateway.transparent
    assert front is not None
    host, port = front.dns_endpoints[0]
    query = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.udp(query, host, port=port, timeout=3)


async def pool_address(running: RunningGateway, name: str) -> IPv4Address:
    response = await ask(running, name)
    (rrset,) = response.answer
    address = IPv4Address(rrset[0].address)
    assert address in POOL
    return address


async def test_a_pool_address_in_a_socks_request_names_its_name(
    make_gateway: GatewayFactory, echo_server: dict[str, int], tmp_path: Path
) -> None:
    running = await make_gateway(**transparent(tmp_path))
    address = await pool_address(running, "web6.test")  # AAAA ::1 only
    async with await SocksClient.open("127.0.0.1", running.v4.port) as client:
        assert await client.associate(address, Atyp.DOMAIN) == "web6.test"
        realid = await client.associate(address, Atyp.ADDRESS_ID)
        assert isinstance(realid, AddressId)
        stream = await client.connect(realid, echo_server["v6"])
        stream.writer.write(b"through the ID of the name")
        echoed = await asyncio.wait_for(stream.reader.readexactly(26), 5)
        assert echoed == b"through the ID of the name"
        await stream.close()
    async with await SocksClient.open("127.0.0.1", running.v4.port) as client:
        stream = await client.connect(address, echo_server["v6"])  # the literal, too
        stream.writer.write(b"ping")
        assert await asyncio.wait_for(stream.reader.readexactly(4), 5) == b"ping"
        await stream.close()


async def test_an_unbound_pool_address_is_never_dialled(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    running = await make_gateway(**transparent(tmp_path))
    async with await SocksClient.open("127.0.0.1", running.v4.port) as client:
        with pytest.raises(SocksReplyError) as caught:
            await client.connect(IPv4Address("198.19.1.1"), 80)
    assert caught.value.rep == Rep.HOST_UNREACHABLE


async def test_bindings_survive_a_restart(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    first = await make_gateway(**transparent(tmp_path))
    address = await pool_address(first, "web6.test")
    await first.gateway.close()
    saved = json.loads((tmp_path / "transparent.state").read_text())
    assert saved["bindings"] == [[str(address), "web6.test"]]
    second = await make_gateway(**transparent(tmp_path))
    front = second.gateway.transparent
    assert front is not None
    assert front.pool.name_of(address) == "web6.test"  # before any query
    assert await pool_address(second, "web6.test") == address


async def test_new_bindings_reach_the_state_file_within_a_second_or_two(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    running = await make_gateway(**transparent(tmp_path))
    address = await pool_address(running, "web6.test")
    path = tmp_path / "transparent.state"
    for _ in range(30):
        if path.exists() and str(address) in path.read_text():
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the binding was not saved within 3 s")


async def test_the_metrics_show_the_transparent_path(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    running = await make_gateway(**transparent(tmp_path), metrics={"listen": "127.0.0.1:0"})
    await pool_address(running, "web6.test")
    await ask(running, "web4.test")
    server = running.gateway.metrics_server
    assert server is not None
    url = f"http://{server.endpoint}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'socks64_transparent_dns_answers_total{answer="synthesized"} 1.0' in text
    assert 'socks64_transparent_dns_answers_total{answer="forwarded"} 1.0' in text
    assert "socks64_transparent_pool_bound 1.0" in text
    assert "socks64_transparent_pool_size 131070.0" in text


async def test_the_gateway_never_dials_into_its_own_pool(
    dns_server_factory: Callable[..., DnsServer], tmp_path: Path
) -> None:
    # An upstream that hands out pool addresses (or is DNS46 itself) must not send the
    # gateway into its own interception: REP X'04', never a packet to the pool.
    zone = dns_server_factory(a={"loop.test": "198.18.0.9"}, aaaa={"v6.test": "::1"})
    loopback_only = {
        "rules": [
            {
                "action": "allow",
                "clients": ["127.0.0.0/8", "::1/128"],
                "destinations": ["127.0.0.0/8", "::1/128"],
            }
        ]
    }
    async with gateways_on(zone, policy=loopback_only) as make:
        running = await make(**transparent(tmp_path))
        async with await SocksClient.open("127.0.0.1", running.v4.port) as client:
            with pytest.raises(SocksReplyError) as caught:
                await client.connect("loop.test", 80)
        assert caught.value.rep == Rep.HOST_UNREACHABLE


async def test_dns46_refuses_itself_as_its_upstream(dns: DnsServer, tmp_path: Path) -> None:
    port = free_port()
    config = gateway_config(
        dns,
        resolver={"nameservers": [f"127.0.0.1:{port}"]},
        **transparent(tmp_path, dns_listen=[f"127.0.0.1:{port}"]),
    )
    gateway = Gateway(config)
    with pytest.raises(TransparentError, match="names DNS46 itself"):
        await gateway.start()
    assert gateway.transparent is None or gateway.transparent.dns is None
