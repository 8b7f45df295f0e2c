"""GSS-API (RFC 1961) through a real gateway with a real KDC: socks64's own client at
every protection level, TCP and UDP, and the refusals a Kerberos site meets."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayFactory, RunningGateway
from tests.integration.auth.gss import access_lines, gss_auth
from tests.krb5realm import KerberosLab
from translator.client.gssapi import GssError, GssOptions
from translator.client.socks import SocksClient, SocksReplyError
from translator.config import ConfigError
from translator.gss.acceptor import acceptor_for
from translator.wire import AddressId, ProtectionLevel, Rep

LEVELS = [ProtectionLevel.NONE, ProtectionLevel.INTEGRITY, ProtectionLevel.CONFIDENTIALITY]



def options(lab: KerberosLab, level: ProtectionLevel, user: str = "alice", **kw: Any) -> GssOptions:
    return GssOptions(host="localhost", protection=level, ccache=f"FILE:{lab.ccache(user)}", **kw)




@pytest.mark.parametrize("level", LEVELS, ids=lambda level: level.name.lower())
@pytest.mark.parametrize("listener", ["v4", "v6"])
async def test_connect_at_each_level_carries_the_bytes_both_ways(
    krb5_realm: KerberosLab,
    gss_gateway: RunningGateway,
    echo_server: dict[str, int],
    level: ProtectionLevel,
    listener: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint = getattr(gss_gateway, listener)
    caplog.set_level(logging.INFO, "socks64.access")
    client = await SocksClient.open(endpoint.host, endpoint.port, gssapi=options(krb5_realm, level))
    assert client.gss_level == level
    stream = await client.connect("127.0.0.1", echo_server["v4"])
    payload = bytes(range(256)) * 1200  # several wrapped messages each way
    stream.writer.write(payload)
    await stream.writer.drain()
    echoed = await asyncio.wait_for(stream.reader.readexactly(len(payload)), 10)
    assert echoed == payload
    await stream.close()
    line = (await access_lines(caplog))[0]
    assert f"user={krb5_realm.principal('alice')} CONNECT" in line
    assert f"up={len(payload)} down={len(payload)}" in line




@pytest.mark.parametrize("level", LEVELS, ids=lambda level: level.name.lower())
async def test_udp_datagrams_at_each_level(
    krb5_realm: KerberosLab,
    gss_gateway: RunningGateway,
    level: ProtectionLevel,
) -> None:
    echo = await _udp_echo()
    try:
        client = await SocksClient.open(
            "127.0.0.1",
            gss_gateway.v4.port,
            gssapi=options(krb5_realm, level, sequence=False),
        )
        async with await client.udp_associate() as udp:
            for i in range(5):
                await udp.send("127.0.0.1", echo.port, b"datagram %d" % i)
                got = await udp.recv()
                assert got.data == b"datagram %d" % i
                assert got.port == echo.port
        assert echo.seen == [b"datagram %d" % i for i in range(5)]  # plaintext on the far side
    finally:
        echo.transport.close()


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.transport: Any = None
        self.port = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen.append(data)
        self.transport.sendto(data, addr)


async def _udp_echo() -> _Echo:
    loop = asyncio.get_running_loop()
    _, echo = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    return echo


async def test_no_ticket_is_a_clear_error_and_the_gateway_serves_others(
    krb5_realm: KerberosLab,
    gss_gateway: RunningGateway,
    echo_server: dict[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "socks64.access")
    empty = GssOptions(host="localhost", ccache=f"FILE:{krb5_realm.no_ticket_ccache}")
    with pytest.raises(GssError, match="GSS-API: No credentials cache found"):
        await SocksClient.open("127.0.0.1", gss_gateway.v4.port, gssapi=empty)
    line = (await access_lines(caplog))[0]
    assert "user=- handshake" in line
    assert "client_gone: closed by the client during GSS-API authentication" in line
    client = await SocksClient.open(
        "127.0.0.1", gss_gateway.v4.port, gssapi=options(krb5_realm, ProtectionLevel.INTEGRITY)
    )
    stream = await client.connect("127.0.0.1", echo_server["v4"])
    await stream.close()


async def test_a_user_rule_allows_one_principal_and_denies_another(
    krb5_realm: KerberosLab,
    make_gateway: GatewayFactory,
    echo_server: dict[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice, bob = krb5_realm.principal("alice"), krb5_realm.principal("bob")
    policy = {
        "default": "deny",
        "rules": [{"action": "allow", "clients": ["127.0.0.0/8", "::1/128"], "users": [alice]}],
    }
    gateway = await make_gateway(auth=gss_auth(krb5_realm), policy=policy)
    caplog.set_level(logging.INFO, "socks64.access")
    level = ProtectionLevel.INTEGRITY
    client = await SocksClient.open(
        "127.0.0.1", gateway.v4.port, gssapi=options(krb5_realm, level, "alice")
    )
    stream = await client.connect("127.0.0.1", echo_server["v4"])
    stream.writer.write(b"alice's bytes")
    assert await asyncio.wait_for(stream.reader.readexactly(13), 5) == b"alice's bytes"
    await stream.close()
    client = await SocksClient.open(
        "127.0.0.1", gateway.v4.port, gssapi=options(krb5_realm, level, "bob")
    )
    with pytest.raises(SocksReplyError) as refused:
        await client.connect("127.0.0.1", echo_server["v4"])
    assert refused.value.rep == Rep.NOT_ALLOWED
    await client.close()
    line = (await access_lines(caplog, 2))[1]
    assert f"user={bob} CONNECT" in line and "REP 2" in line


async def test_the_principal_owns_its_address_ids(
    krb5_realm: KerberosLab, gss_gateway: RunningGateway, echo_server: dict[str, int]
) -> None:
    async def client_as(user: str) -> SocksClient:
        return await SocksClient.open(
            "127.0.0.1",
            gss_gateway.v4.port,
            gssapi=options(krb5_realm, ProtectionLevel.CONFIDENTIALITY, user),
        )

    alice = await client_as("alice")
    realid = await alice.associate(IPv4Address("127.0.0.1"))
    assert isinstance(realid, AddressId)
    again = await client_as("alice")
    stream = await again.connect(realid, echo_server["v4"])  # the same owner: its ID works
    await stream.close()
    bob = await client_as("bob")
    with pytest.raises(SocksReplyError) as foreign:
        await bob.connect(realid, echo_server["v4"])  # same address, another principal
    assert foreign.value.rep == Rep.INVALID_ADDRESS  # not this owner's ID (profile)
    for client in (alice, bob):
        await client.close()


# -- what a config that cannot serve GSS-API is told ----------------------------------


def _config(lab: KerberosLab, **auth: Any) -> Any:
    from translator.config import config_from_mapping

    data: dict[str, Any] = {"auth": gss_auth(lab, **auth.pop("gssapi", {})), **auth}
    return config_from_mapping(data)


def test_a_keytab_without_the_service_is_refused_at_start(krb5_realm: KerberosLab) -> None:
    config = _config(krb5_realm, gssapi={"keytab": str(krb5_realm.other_keytab)})
    with pytest.raises(ConfigError, match="gives no key for service 'rcmd'") as error:
        acceptor_for(config)
    assert error.value.key == "auth.gssapi.keytab"
    acceptor_for(_config(krb5_realm, gssapi={"keytab": str(krb5_realm.other_keytab),
                                             "service": "any"}))  # fmt: skip


def test_a_missing_keytab_fails_check_config(krb5_realm: KerberosLab, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "auth:\n  methods: [gssapi]\n  gssapi: {keytab: /nonexistent/socks64.keytab}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "translator.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "auth.gssapi.keytab" in result.stderr
    assert "keytab /nonexistent/socks64.keytab does not exist" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege drop needs root")
def test_a_keytab_the_dropped_user_cannot_read_is_refused(
    krb5_realm: KerberosLab, tmp_path: Path
) -> None:
    keytab = tmp_path / "root-only.keytab"
    shutil.copyfile(krb5_realm.keytab, keytab)
    keytab.chmod(0o600)
    config = _config(krb5_realm, gssapi={"keytab": str(keytab)}, user="nobody")
    with pytest.raises(ConfigError, match="not readable by user nobody"):
        acceptor_for(config)
    os.chown(keytab, pwd.getpwnam("nobody").pw_uid, -1)
    assert acceptor_for(config) is not None


def test_without_the_package_gssapi_is_refused_naming_it(
    krb5_realm: KerberosLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gssapi", None)
    with pytest.raises(ConfigError, match=r"gssapi cannot be offered.*socks64\[gssapi\]") as error:
        acceptor_for(_config(krb5_realm))
    assert error.value.key == "auth.methods"


# -- the rest of the protocol, wrapped ---------------------------------------------------


async def test_a_udp_tunnel_and_its_control_requests_travel_wrapped(
    krb5_realm: KerberosLab, gss_gateway: RunningGateway
) -> None:
    echo = await _udp_echo()
    try:
        client = await SocksClient.open(
            "127.0.0.1",
            gss_gateway.v4.port,
            gssapi=options(krb5_realm, ProtectionLevel.CONFIDENTIALITY),
        )
        async with await client.udp_associate(tunnel=True) as udp:
            address, port = await udp.interface_data(IPv4Address("127.0.0.1"), echo.port)
            assert port > 0 and str(address) == "127.0.0.1"
            await udp.send("127.0.0.1", echo.port, b"through the tunnel")
            assert (await udp.recv()).data == b"through the tunnel"
        assert echo.seen == [b"through the tunnel"]
    finally:
        echo.transport.close()


async def test_bind_replies_and_the_peer_s_bytes_travel_wrapped(
    krb5_realm: KerberosLab, gss_gateway: RunningGateway
) -> None:
    client = await SocksClient.open(
        "127.0.0.1",
        gss_gateway.v4.port,
        gssapi=options(krb5_realm, ProtectionLevel.INTEGRITY),
    )
    listener = await client.bind(IPv4Address("127.0.0.1"))
    host, port = listener.bound
    peer_reader, peer_writer = await asyncio.open_connection(str(host), port)
    stream = await listener.accept(timeout=5)
    peer_writer.write(b"from the peer")
    assert await asyncio.wait_for(stream.reader.readexactly(13), 5) == b"from the peer"
    stream.writer.write(b"from the client")
    assert await asyncio.wait_for(peer_reader.readexactly(15), 5) == b"from the client"
    peer_writer.close()
    await stream.close()


async def test_a_client_that_stalls_in_the_exchange_meets_the_handshake_timeout(
    krb5_realm: KerberosLab, make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await make_gateway(auth=gss_auth(krb5_realm), timeouts={"handshake": 0.5})
    caplog.set_level(logging.INFO, "socks64.access")
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.v4.port)
    writer.write(b"\x05\x01\x01" + b"\x01\x01\x00\x10" + b"half a token")  # 16 announced
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x05\x01"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no abort: it timed out
    writer.close()
    assert "handshake timed out" in (await access_lines(caplog))[0]
