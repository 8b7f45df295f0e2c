"""Real third-party clients through the gateway: curl, ncat, python-socks, PySocks."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import socks as pysocks
from python_socks.async_.asyncio import Proxy

from tests.conftest import HTTP_BODY, GatewayFactory, RunningGateway, need_tool
from translator.auth import hash_password


async def run(*argv: str, stdin: bytes = b"", limit: float = 20.0) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out, err


async def curl(proxy: str, url: str) -> tuple[int, bytes]:
    need_tool("curl")
    code, out, err = await run("curl", "-sS", "--max-time", "10", "--noproxy", "", "-x", proxy, url)
    return code, out if code == 0 else err


@pytest.mark.parametrize(
    ("scheme", "listener", "host", "server"),
    [
        # IPv4-only client, IPv6-only server, by name and by literal.
        ("socks5h", "url4", "web6.test", "v6"),
        ("socks5", "url4", "[::1]", "v6"),
        # IPv6-only client, IPv4-only server.
        ("socks5h", "url6", "web4.test", "v4"),
        ("socks5", "url6", "127.0.0.1", "v4"),
        ("socks4a", "url4", "web4.test", "v4"),
        ("socks4a", "url4", "web6.test", "v6"),
    ],
)
async def test_curl_reaches_the_other_family(
    gateway: RunningGateway,
    http_servers: dict[str, int],
    scheme: str,
    listener: str,
    host: str,
    server: str,
) -> None:
    code, body = await curl(
        f"{scheme}://{getattr(gateway, listener)}", f"http://{host}:{http_servers[server]}/"
    )
    assert code == 0, body
    assert body == HTTP_BODY


async def test_curl_unknown_name_fails_with_host_unreachable(gateway: RunningGateway) -> None:
    code, err = await curl(f"socks5h://{gateway.url4}", "http://no-such-name.test:80/")
    assert code == 97, err  # curl: "proxy handshake error"
    assert err.rstrip().endswith(b"(4)"), err  # curl prints the REP code


async def test_ncat_relays_both_ways(gateway: RunningGateway, echo_server: dict[str, int]) -> None:
    need_tool("ncat")
    code, out, err = await run(
        "ncat",
        "--proxy",
        gateway.url4,
        "--proxy-type",
        "socks5",
        "--proxy-dns",
        "remote",
        "web6.test",
        str(echo_server["v6"]),
        stdin=b"hello through socks64\n",
    )
    assert code == 0, err
    assert out == b"hello through socks64\n"


@pytest.mark.parametrize(
    ("url", "listener", "dest", "server", "payload"),
    [
        ("socks5", "url6", "web4.test", "v4", b"ping"),  # IPv6 client, IPv4-only server
        ("socks4", "url4", "web6.test", "v6", b"four-a"),  # SOCKS 4a, the other way
    ],
)
async def test_python_socks(
    gateway: RunningGateway,
    echo_server: dict[str, int],
    url: str,
    listener: str,
    dest: str,
    server: str,
    payload: bytes,
) -> None:
    proxy = Proxy.from_url(f"{url}://{getattr(gateway, listener)}", rdns=True)
    sock = await proxy.connect(dest_host=dest, dest_port=echo_server[server], timeout=5)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    writer.close()
    await writer.wait_closed()


async def test_pysocks_blocking_client(
    gateway: RunningGateway, echo_server: dict[str, int]
) -> None:
    def exchange() -> bytes:
        sock = pysocks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
        sock.set_proxy(pysocks.SOCKS5, "127.0.0.1", gateway.v4.port, rdns=True)
        sock.settimeout(5)
        try:
            sock.connect(("web6.test", echo_server["v6"]))
            sock.sendall(b"pysocks")
            return sock.recv(7)
        finally:
            sock.close()

    assert await asyncio.to_thread(exchange) == b"pysocks"


@pytest.fixture
async def auth_gateway(make_gateway: GatewayFactory, tmp_path: Path) -> RunningGateway:
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('s3cret', n=2**10)}\n")
    return await make_gateway(auth={"methods": ["username"], "users_file": str(users)})


async def test_curl_with_username_password(
    auth_gateway: RunningGateway, http_servers: dict[str, int]
) -> None:
    url = f"http://web6.test:{http_servers['v6']}/"
    code, body = await curl(f"socks5h://alice:s3cret@{auth_gateway.url4}", url)
    assert code == 0, body
    assert body == HTTP_BODY
    code, err = await curl(f"socks5h://alice:wrong@{auth_gateway.url4}", url)
    assert code != 0
    assert b"authentication failed" in err.lower() or b"user was rejected" in err.lower(), err
    code, err = await curl(f"socks5h://{auth_gateway.url4}", url)  # offers no-auth only
    assert code != 0
