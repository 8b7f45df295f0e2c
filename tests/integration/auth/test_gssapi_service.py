"""GSS-API in the deployed shape: ``socks64 serve`` with two workers that drop to
``nobody``, so every login reads the keytab (and writes the replay cache) as that user."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DnsServer
from tests.integration.service.gateway_process import (
    Spawn,
    echo_handler,
    free_port,
    gateway_config,
    spawn_fixture,  # noqa: F401 (the spawn fixture)
    tcp_server,
    write_config,
)
from tests.krb5realm import KerberosLab
from translator.client.gssapi import GssOptions
from translator.client.socks import SocksClient
from translator.wire import ProtectionLevel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to nobody needs root")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory nobody can reach (the realm's and pytest's are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="socks64-gss-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_workers_running_as_nobody_serve_kerberos_users(
    krb5_realm: KerberosLab, dns: DnsServer, spawn: Spawn, shared_dir: Path
) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    keytab = shared_dir / "socks64.keytab"
    shutil.copyfile(krb5_realm.keytab, keytab)
    os.chown(keytab, nobody, -1)
    keytab.chmod(0o400)
    krb5_conf = shared_dir / "krb5.conf"
    shutil.copyfile(krb5_realm.realm.krb5_conf, krb5_conf)
    krb5_conf.chmod(0o644)
    rcache = shared_dir / "rcache"
    rcache.mkdir(mode=0o1777)
    rcache.chmod(0o1777)
    port = free_port()
    auth = {
        "methods": ["gssapi"],
        "gssapi": {"keytab": str(keytab), "protection": ["confidentiality"]},
    }
    document = gateway_config(
        dns.address, [f"127.0.0.1:{port}"], workers=2, user="nobody", auth=auth
    )
    child = spawn(
        "serve",
        "--config",
        str(write_config(shared_dir / "socks64.yaml", document)),
        env={"KRB5_CONFIG": str(krb5_conf), "KRB5RCACHEDIR": str(rcache)},
    )
    child.wait_for(r"2 workers ready")
    options = GssOptions(
        host="localhost",
        protection=ProtectionLevel.CONFIDENTIALITY,
        ccache=f"FILE:{krb5_realm.ccache('alice')}",
    )
    with tcp_server(echo_handler) as echo:
        for i in range(16):  # enough connections for both workers to take some
            client = await SocksClient.open("127.0.0.1", port, gssapi=options)
            stream = await client.connect("127.0.0.1", echo.port)
            message = b"round %d" % i
            stream.writer.write(message)
            assert await asyncio.wait_for(stream.reader.readexactly(len(message)), 5) == message
            await stream.close()
    alice = krb5_realm.principal("alice")
    for worker in (0, 1):
        child.wait_for(rf"socks64\.access\[{worker}\]: .*user={alice} CONNECT .* ok")
    assert not child.find(r"GSS-API authentication failed")
