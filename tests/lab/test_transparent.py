"""The transparent front in the lab: unmodified IPv4-only programs, no proxy settings.

Topology ``transparent``: c4 (IPv4-only, allowed) and c4x (IPv4-only, denied) have gw as
their default router and DNS server; s6 is IPv6-only; gw keeps forwarding off. Every
check runs real programs (curl, getent, a plain Python socket) in the client namespace.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import sys
import time
import urllib.parse
from collections.abc import Iterator

import pytest
from netnslab.lab import Lab
from netnslab.pytest_plugin import INTERCEPTING, wait_for_interception
from netnslab.timing import poll_until

POOL = ipaddress.ip_network("198.18.0.0/15")
GATEWAY_V6 = "2001:db8:5e6::1"
SERVER = "v6only.lab.test"

pytestmark = pytest.mark.usefixtures("transparent_lab")


def _run(lab: Lab, node: str, *argv: str, timeout: float = 20.0) -> tuple[int, str, str]:
    done = lab.exec(node, list(argv), timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def _pool_address(lab: Lab, node: str = "c4", name: str = SERVER) -> str:
    code, out, err = _run(lab, node, "getent", "ahostsv4", name)
    assert code == 0, f"getent ahostsv4 {name} in {node}: {code} {err}"
    address = out.split()[0]
    assert ipaddress.ip_address(address) in POOL, out
    return address


def _metrics(lab: Lab) -> str:
    code, out, err = _run(
        lab, "gw", "curl", "-s", "--max-time", "5", "http://127.0.0.1:9464/metrics"
    )
    assert code == 0, err
    return out


def _sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _gateway_log(lab: Lab) -> str:
    proc = lab.service_process("gw", "gateway")
    assert proc is not None
    with open(proc.log, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def _start_gateway(lab: Lab) -> None:
    """Start gw's gateway and wait until it intercepts, not only until it accepts."""
    seen = _gateway_log(lab).count(INTERCEPTING)
    lab.start_service("gw", "gateway")
    wait_for_interception(lab, seen=seen)


def _installed(lab: Lab) -> list[str]:
    """What of the gateway's interception exists in gw now."""
    found = []
    if _run(lab, "gw", "nft", "list", "table", "inet", "socks64")[0] == 0:
        found.append("nft table inet socks64")
    rules = _run(lab, "gw", "ip", "-4", "rule", "show")[1]
    found += [line for line in rules.splitlines() if "0x5364" in line or "198.18.0.0/15" in line]
    routes = _run(lab, "gw", "ip", "-4", "route", "show", "table", "164")[1]
    found += [line for line in routes.splitlines() if line.strip()]
    return found


@pytest.fixture
def gw_http(transparent_lab: Lab) -> Iterator[int]:
    """A plain HTTP server on gw's client-side address (reached by its real A record)."""
    port = 8090
    argv = [sys.executable, "-m", "http.server", "--bind", "192.0.2.1", str(port)]
    with transparent_lab.popen("gw", argv):
        assert poll_until(
            lambda: _run(transparent_lab, "gw", "curl", "-s", f"http://192.0.2.1:{port}/")[0] == 0,
            timeout=10,
            interval=0.1,
        )
        yield port


def test_curl_by_name_without_any_proxy_setting(transparent_lab: Lab) -> None:
    lab = transparent_lab
    assert _run(lab, "gw", "sysctl", "-n", "net.ipv4.ip_forward")[1].strip() == "0"
    assert _run(lab, "c4", "ip", "-6", "-o", "addr", "show", "scope", "global")[1].strip() == ""
    address = _pool_address(lab)
    assert _pool_address(lab) == address  # the same name keeps its address
    before = _sample(
        _metrics(lab), "socks64_transparent_flows_total", protocol="tcp", family="ipv6"
    )
    code, out, err = _run(lab, "c4", "curl", "-sS", "--max-time", "10", f"http://{SERVER}:8080/")
    assert code == 0, err
    assert "hello from s6" in out
    assert f"client {GATEWAY_V6}" in out  # the server saw the gateway's IPv6 address
    metrics = _metrics(lab)
    assert (
        _sample(metrics, "socks64_transparent_flows_total", protocol="tcp", family="ipv6")
        == before + 1
    )
    assert _sample(metrics, "socks64_transparent_dns_answers_total", answer="synthesized") >= 2
    assert f"TRANSPARENT_TCP {SERVER}:8080 ({address})" in _gateway_log(lab)


def test_a_real_a_record_is_answered_and_not_intercepted(
    transparent_lab: Lab, gw_http: int
) -> None:
    lab = transparent_lab
    assert _pool_address(lab) != ""  # warm: the lab is up and answering
    code, out, _ = _run(lab, "c4", "getent", "ahostsv4", "gw.lab.test")
    assert code == 0 and out.split()[0] == "192.0.2.1", out
    flows = _sample(_metrics(lab), "socks64_transparent_flows_total", protocol="tcp", family="ipv4")
    flows6 = _sample(
        _metrics(lab), "socks64_transparent_flows_total", protocol="tcp", family="ipv6"
    )
    code, out, err = _run(
        lab, "c4", "curl", "-sS", "--max-time", "5", f"http://gw.lab.test:{gw_http}/"
    )
    assert code == 0, err
    metrics = _metrics(lab)
    assert (
        _sample(metrics, "socks64_transparent_flows_total", protocol="tcp", family="ipv4") == flows
    )
    assert (
        _sample(metrics, "socks64_transparent_flows_total", protocol="tcp", family="ipv6") == flows6
    )
    assert _sample(metrics, "socks64_transparent_dns_answers_total", answer="forwarded") >= 1


_UDP_CLIENT = """
import socket, sys
address = socket.getaddrinfo(sys.argv[1], 7007, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(5)
sock.sendto(b"plain datagram", (address, 7007))
data, source = sock.recvfrom(4096)
print(address, source[0], source[1])
print(data.decode())
"""


def test_unmodified_udp_client_talks_to_an_ipv6_only_echo(transparent_lab: Lab) -> None:
    code, out, err = _run(transparent_lab, "c4", sys.executable, "-c", _UDP_CLIENT, SERVER)
    assert code == 0, err
    first, *reply = out.splitlines()
    address, source, port = first.split()
    assert ipaddress.ip_address(address) in POOL
    assert (source, port) == (address, "7007")  # the reply comes from where it was sent
    assert reply[0].startswith(f"echo from s6; peer {GATEWAY_V6} ")
    assert reply[1] == "plain datagram"


def test_an_unbound_pool_address_fails_within_a_second(transparent_lab: Lab) -> None:
    lab = transparent_lab
    unbound = "198.19.254.254"
    started = time.monotonic()
    code, _, err = _run(lab, "c4", "curl", "-sS", "--max-time", "5", f"http://{unbound}:8080/")
    assert code != 0
    assert time.monotonic() - started < 1.0 + 0.5  # curl's own start-up included
    assert re.search(r"reset|refused|Empty reply|connect to server", err), err
    probe = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1);"
        f"s.connect(('{unbound}', 7007)); s.send(b'x')\n"
        "try:\n s.recv(100); print('answered')\n"
        "except OSError as e: print(type(e).__name__)"
    )
    code, out, err = _run(lab, "c4", sys.executable, "-c", probe)
    assert out.strip() in ("ConnectionRefusedError", "OSError"), (out, err)
    assert re.search(  # its access line: what a SOCKS client would have got, and why
        rf"TRANSPARENT_TCP {re.escape(unbound)}:8080 -> - ipv4 .* refused REP 4 HOST_UNREACHABLE: "
        rf"pool address {re.escape(unbound)} is not bound \(unbound\)",
        _gateway_log(lab),
    )


def test_a_denied_client_gets_refused_and_is_logged(transparent_lab: Lab) -> None:
    lab = transparent_lab
    address = _pool_address(lab, "c4")
    code, _, _ = _run(lab, "c4x", "getent", "ahostsv4", SERVER)
    assert code != 0  # REFUSED: no address at all
    code, _, err = _run(lab, "c4x", "curl", "-sS", "--max-time", "5", f"http://{address}:8080/")
    assert code != 0 and re.search(r"reset|Empty reply|connect to server", err), err
    assert poll_until(  # one line, the access line, with the client and the reason
        lambda: re.search(
            r"192\.0\.2\.130:\d+: user=- TRANSPARENT_TCP \S+ -> - ipv4 .* refused REP 2 "
            r"NOT_ALLOWED: no rule allows the transparent path for this client \(policy\)",
            _gateway_log(lab),
        ),
        timeout=5,
        interval=0.1,
    )
    assert _sample(_metrics(lab), "socks64_transparent_dns_answers_total", answer="refused") >= 1


def test_a_cached_address_survives_a_restart(transparent_lab: Lab) -> None:
    lab = transparent_lab
    address = _pool_address(lab)
    lab.stop_service("gw", "gateway")
    assert _installed(lab) == []
    _start_gateway(lab)
    code, out, err = _run(lab, "c4", "curl", "-sS", "--max-time", "10", f"http://{address}:8080/")
    assert code == 0 and "hello from s6" in out, err


def test_nothing_is_left_after_sigkill_and_a_new_start_and_stop(transparent_lab: Lab) -> None:
    lab = transparent_lab
    address = _pool_address(lab)
    time.sleep(1.5)  # the state file is written within a second of a change
    lab.signal_service("gw", "gateway", signal.SIGKILL)
    assert poll_until(
        lambda: lab.service_process("gw", "gateway") is None or not _alive(lab),
        timeout=5,
        interval=0.1,
    )
    assert "nft table inet socks64" in _installed(lab)  # what a crash leaves behind
    _start_gateway(lab)
    assert "removed leftovers of an earlier run" in _gateway_log(lab)
    assert len([line for line in _installed(lab) if "fwmark" in line]) == 1
    assert len([line for line in _installed(lab) if "iif lo" in line]) == 1
    code, out, err = _run(lab, "c4", "curl", "-sS", "--max-time", "10", f"http://{address}:8080/")
    assert code == 0 and "hello from s6" in out, err
    lab.stop_service("gw", "gateway")
    assert _installed(lab) == []
    _start_gateway(lab)  # for whatever runs after


def _alive(lab: Lab) -> bool:
    from netnslab import procs

    proc = lab.service_process("gw", "gateway")
    return proc is not None and procs.is_running(proc)


def test_a_program_on_the_gateway_host_is_redirected(transparent_lab: Lab) -> None:
    address = _pool_address(transparent_lab)
    assert _run(transparent_lab, "gw", "ip", "-4", "route", "show", "default")[1].strip() == ""
    code, out, err = _run(
        transparent_lab, "gw", "curl", "-sS", "--max-time", "10", f"http://{address}:8080/"
    )
    assert code == 0 and "hello from s6" in out, err
    assert re.search(
        rf"127\.0\.0\.1:\d+: user=- TRANSPARENT_TCP {SERVER}:8080 \({address}\) -> ",
        _gateway_log(transparent_lab),
    )


def test_a_socks_client_learns_the_name_behind_a_pool_address(transparent_lab: Lab) -> None:
    lab = transparent_lab
    address = _pool_address(lab)
    quoted = urllib.parse.quote(address)
    code, out, err = _run(
        lab,
        "c4",
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--proxy",
        "socks5h://192.0.2.1:1080",
        f"http://{quoted}:8080/",
    )
    assert code == 0 and "hello from s6" in out, err  # SOCKS to a pool address: its name
