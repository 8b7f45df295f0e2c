"""The transparent front's kernel plumbing against a real kernel, in throw-away namespaces.

Two namespaces joined by a veth pair: ``client`` (192.0.2.10/24, default route via the
gateway) and ``gw`` (192.0.2.1/24 on ``v-c4``, IP forwarding off). The code under test runs
in the test process after it switched its network namespace with setns() (one thread; the
sockets it creates stay in that namespace for good, and ``nft`` children inherit it); the
checks use iproute2 and nft from outside (``ip -n``, ``ip netns exec``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest
from netnslab.netlink import create_namespace, remove_namespace
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from translator.transparent import netfilter
from translator.transparent.netfilter import (
    Interception,
    InterceptionError,
    InterceptPlan,
    leftovers,
    render_ruleset,
)
from translator.transparent.sockets import (
    IcmpSender,
    MissingDestination,
    original_destination,
    recv_with_destination,
    reply_socket,
    transparent_listener,
)

IN_CI = os.environ.get("CI", "").lower() == "true"
POOL = IPv4Network("198.18.0.0/15")
WAIT = 5.0
IP_RECVERR = 11  # <linux/in.h>; not exported by the socket module


def require(condition: bool, reason: str) -> None:
    """Cannot run: fail under CI=true, skip otherwise."""
    if not condition:
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


def plan_for(port: int = 40000, **changes: object) -> InterceptPlan:
    fields: dict[str, object] = {
        "pool": POOL,
        "interfaces": ("v-c4",),
        "port": port,
        "fwmark": 0x5364,
        "route_table": 164,
    }
    fields.update(changes)
    return InterceptPlan(**fields)  # type: ignore[arg-type]


def run(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the block in namespace ``name`` (this thread only), then come back."""
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        netns.setns(name, flags=0)
        try:
            yield
        finally:
            netns.setns(saved, flags=0)
    finally:
        os.close(saved)


@dataclass
class Lab:
    client: str
    gw: str

    def ip(self, ns: str, *args: str) -> str:
        return run("ip", "-n", ns, *args)

    def nft(self, ns: str, *args: str, check: bool = True) -> str:
        return run("ip", "netns", "exec", ns, "nft", *args, check=check)

    def sysctl(self, ns: str, key: str) -> str:
        return run("ip", "netns", "exec", ns, "cat", "/proc/sys/" + key.replace(".", "/")).strip()


@pytest.fixture(scope="module")
def kernel_ready() -> None:
    """Root, iproute2, nft, and a kernel that accepts the ruleset (tproxy, socket, nat)."""
    require(os.geteuid() == 0, "network namespace tests need root")
    require(shutil.which("ip") is not None, "iproute2 (ip) is not installed")
    have_nft = shutil.which("nft") is not None or os.access("/usr/sbin/nft", os.X_OK)
    require(have_nft, "nft (nftables) is not installed")
    name = f"s64tp-probe-{uuid.uuid4().hex[:8]}"
    create_namespace(name)
    try:
        done = subprocess.run(
            ["ip", "netns", "exec", name, netfilter.nft_binary(), "-f", "-"],
            input=render_ruleset(plan_for()),
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    finally:
        remove_namespace(name)
    require(done.returncode == 0, f"kernel rejects the ruleset: {done.stderr.strip()}")


@pytest.fixture
def lab(kernel_ready: None) -> Iterator[Lab]:
    tag = uuid.uuid4().hex[:8]
    space = Lab(client=f"s64tp-c-{tag}", gw=f"s64tp-g-{tag}")
    created: list[str] = []
    try:
        for name in (space.client, space.gw):
            create_namespace(name)
            created.append(name)
        space.ip(space.gw, "link", "add", "v-c4", "type", "veth", "peer", "name", "v-cl",
                 "netns", space.client)  # fmt: skip
        for ns, ifname, address in ((space.gw, "v-c4", "192.0.2.1/24"),
                                    (space.client, "v-cl", "192.0.2.10/24")):  # fmt: skip
            space.ip(ns, "link", "set", "lo", "up")
            space.ip(ns, "addr", "add", address, "dev", ifname)
            space.ip(ns, "link", "set", ifname, "up")
        space.ip(space.client, "route", "add", "default", "via", "192.0.2.1")
        # The gateway's upstream: local apps need some route towards the pool to reach the
        # nat output hook (the neighbour is never resolved: REDIRECT reroutes to lo).
        space.ip(space.gw, "route", "add", "default", "via", "192.0.2.254")
        with inside(space.gw), open("/proc/sys/net/ipv4/ip_forward", "w") as handle:
            handle.write("0")
        yield space
    finally:
        for name in reversed(created):
            remove_namespace(name)


@dataclass
class Front:
    plan: InterceptPlan
    tcp: socket.socket
    udp: socket.socket


@pytest.fixture
def front(lab: Lab) -> Iterator[Front]:
    """The gw's interception in front of a TCP and a UDP transparent listener."""
    with contextlib.ExitStack() as stack:
        with inside(lab.gw):
            tcp = stack.enter_context(transparent_listener("127.0.0.1", 0, socket.SOCK_STREAM))
            port = tcp.getsockname()[1]
            udp = stack.enter_context(transparent_listener("127.0.0.1", port, socket.SOCK_DGRAM))
            plan = plan_for(port)
            Interception(plan).install()
        stack.callback(remove_in, lab.gw, plan)
        yield Front(plan, tcp, udp)


def remove_in(namespace: str, plan: InterceptPlan) -> None:
    with inside(namespace):
        Interception(plan).remove()


def wait_readable(sock: socket.socket) -> None:
    ready, _, _ = select.select([sock], [], [], WAIT)
    assert ready, "timed out waiting for a packet"


def state(lab: Lab) -> tuple[list[str], list[str], list[str]]:
    """(inet tables, rules of 0x5364 or toward the pool, routes of table 164) from outside."""
    tables = [t.strip() for t in lab.nft(lab.gw, "list", "tables").splitlines() if t.strip()]
    rules = [
        r.strip()
        for r in lab.ip(lab.gw, "rule").splitlines()
        if "0x5364" in r or "198.18.0.0/15" in r
    ]
    # iproute2 fails on a table that does not exist (any more): no routes.
    shown = run("ip", "-n", lab.gw, "route", "show", "table", "164", check=False)
    routes = [r.strip() for r in shown.splitlines()]
    return tables, rules, routes


OURS_RULE = "16400:\tfrom all fwmark 0x5364 lookup 164"
OURS_LOCAL_RULE = "16401:\tfrom all to 198.18.0.0/15 iif lo lookup 164"
OURS_ROUTE = "local 198.18.0.0/15 dev lo"


# --- pure: the plan and the text ------------------------------------------------------------


def test_ruleset_text() -> None:
    text = render_ruleset(plan_for())
    assert text.startswith("add table inet socks64\ndelete table inet socks64\n")
    assert (
        'iifname { "v-c4" } ip daddr 198.18.0.0/15 meta l4proto { tcp, udp } '
        "tproxy ip to 127.0.0.1:40000 meta mark set 0x5364 accept"
    ) in text
    assert "ip daddr 198.18.0.0/15 meta l4proto tcp redirect to :40000" in text


@pytest.mark.parametrize(
    "change",
    [
        {"interfaces": ('v-c4" accept',)},
        {"interfaces": ("a/b",)},
        {"interfaces": ("x" * 16,)},
        {"port": 0},
        {"fwmark": 0},
        {"route_table": 254},
        {"rule_priority": 0},
        {"table": "bad name"},
        {"pool": "198.18.0.0/15"},
    ],
)
def test_plan_validation(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        plan_for(**change)  # type: ignore[arg-type]


# --- install and remove ---------------------------------------------------------------------


def test_install_and_remove_touch_only_ours(lab: Lab) -> None:
    gw = lab.gw
    lab.nft(gw, "add", "table", "inet", "foreign")
    lab.nft(gw, "add", "chain", "inet", "foreign", "input",
            "{ type filter hook input priority 0; policy accept; }")  # fmt: skip
    lab.ip(gw, "rule", "add", "fwmark", "0x5364", "lookup", "165", "priority", "16401")
    lab.ip(gw, "route", "add", "local", "203.0.113.0/24", "dev", "lo", "table", "164")
    plan = plan_for()
    in_host = leftovers(plan)  # the test process's own namespace must not be touched
    with inside(gw):
        assert leftovers(plan) == []
        assert Interception(plan).install() == []
    assert leftovers(plan) == in_host
    with inside(gw):
        assert sorted(leftovers(plan)) == sorted(
            [plan.table_text, plan.rule_text, plan.local_rule_text, plan.route_text]
        )
    listing = lab.nft(gw, "list", "table", "inet", "socks64")
    assert "tproxy ip to 127.0.0.1:40000 meta mark set 0x00005364 accept" in listing
    assert "socket transparent 1" in listing
    assert "redirect to :40000" in listing
    tables, rules, routes = state(lab)
    assert tables == ["table inet foreign", "table inet socks64"]
    assert OURS_RULE in rules and OURS_LOCAL_RULE in rules
    assert "16401:\tfrom all fwmark 0x5364 lookup 165" in rules
    assert any(r.startswith(OURS_ROUTE) for r in routes)
    assert lab.sysctl(gw, "net.ipv4.ip_forward") == "0"

    with inside(gw):
        removed = Interception(plan).remove()
        assert sorted(removed) == sorted(
            [plan.table_text, plan.rule_text, plan.local_rule_text, plan.route_text]
        )
        assert Interception(plan).remove() == []
        assert leftovers(plan) == []
    tables, rules, routes = state(lab)
    assert tables == ["table inet foreign"]
    assert rules == ["16401:\tfrom all fwmark 0x5364 lookup 165"]
    assert len(routes) == 1 and routes[0].startswith("local 203.0.113.0/24 dev lo ")
    assert "chain input" in lab.nft(gw, "list", "table", "inet", "foreign")
    assert lab.sysctl(gw, "net.ipv4.ip_forward") == "0"


def test_crash_recovery(lab: Lab) -> None:
    plan = plan_for()
    with inside(lab.gw):
        Interception(plan).install()
        # The process died here; the next start finds and replaces what it left.
        removed = Interception(plan).install()
    assert sorted(removed) == sorted(
        [plan.table_text, plan.rule_text, plan.local_rule_text, plan.route_text]
    )
    tables, rules, routes = state(lab)
    assert tables == ["table inet socks64"]
    assert rules == [OURS_RULE, OURS_LOCAL_RULE]
    assert len(routes) == 1 and routes[0].startswith(OURS_ROUTE)
    with inside(lab.gw):
        assert len(Interception(plan).remove()) == 4
    assert state(lab) == ([], [], [])


def test_failed_install_is_undone(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    class NoRoutes(IPRoute):  # type: ignore[misc]
        def route(self, command: str, **kwargs: object) -> object:
            if command == "add":
                raise NetlinkError(errno.EPERM, "Operation not permitted")
            return super().route(command, **kwargs)

    monkeypatch.setattr(netfilter, "IPRoute", NoRoutes)
    with inside(lab.gw), pytest.raises(InterceptionError, match="CAP_NET_ADMIN"):
        Interception(plan_for()).install()
    assert state(lab) == ([], [], [])


def test_missing_nft_is_a_clear_error(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with inside(lab.gw), pytest.raises(InterceptionError, match=r"nft .* not installed"):
        Interception(plan_for()).install()
    assert state(lab) == ([], [], [])


# --- end to end: packets from the client namespace ------------------------------------------


def test_tcp_from_client(lab: Lab, front: Front) -> None:
    listener = front.tcp
    with inside(lab.client):
        client = socket.create_connection(("198.18.0.5", 80), timeout=WAIT)
    with client:
        wait_readable(listener)
        conn, peer = listener.accept()
        with conn:
            assert peer[0] == "192.0.2.10"
            assert original_destination(conn) == (IPv4Address("198.18.0.5"), 80, False)
            client.sendall(b"hello")
            conn.setblocking(True)
            conn.settimeout(WAIT)
            assert conn.recv(100) == b"hello"
            conn.sendall(b"world")
            assert client.recv(100) == b"world"


def test_udp_from_client(lab: Lab, front: Front) -> None:
    listener = front.udp
    with inside(lab.client):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with client:
        client.settimeout(WAIT)
        client.connect(("198.18.0.7", 5353))  # a wrong reply source would not be delivered
        client.send(b"query")
        wait_readable(listener)
        data, source, destination = recv_with_destination(listener)
        assert (data, destination) == (b"query", (IPv4Address("198.18.0.7"), 5353))
        assert source == client.getsockname()
        with inside(lab.gw):
            replier = reply_socket(IPv4Address("198.18.0.7"), 5353)
        with replier:
            replier.sendto(b"answer", source)
            assert client.recvfrom(100) == (b"answer", ("198.18.0.7", 5353))
            client.send(b"again")  # still to the listener, not to the reply socket
            wait_readable(listener)
            assert recv_with_destination(listener)[0] == b"again"


def test_tcp_from_local_app(lab: Lab, front: Front) -> None:
    listener = front.tcp
    with inside(lab.gw):
        app = socket.create_connection(("198.18.0.9", 81), timeout=WAIT)
    with app:
        wait_readable(listener)
        conn, _ = listener.accept()
        with conn:
            assert original_destination(conn) == (IPv4Address("198.18.0.9"), 81, True)
            app.sendall(b"ping")
            conn.settimeout(WAIT)
            assert conn.recv(100) == b"ping"


def test_not_intercepted_has_no_destination(lab: Lab, front: Front) -> None:
    """A direct connection or datagram to the listener is no interception."""
    port = front.plan.port
    with inside(lab.gw):
        app = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with app, plain:
        wait_readable(front.tcp)
        conn, _ = front.tcp.accept()
        with conn, pytest.raises(MissingDestination):
            original_destination(conn)
        plain.bind(("127.0.0.1", 0))
        plain.sendto(b"x", plain.getsockname())
        wait_readable(plain)
        with pytest.raises(MissingDestination):
            recv_with_destination(plain)


@pytest.mark.parametrize(
    ("code", "recverr", "expected"),
    [
        (13, False, errno.EHOSTUNREACH),  # administratively prohibited: a hard error
        (3, False, errno.ECONNREFUSED),  # port unreachable: a hard error
        # host unreachable is a soft error on Linux: only reported with IP_RECVERR
        (1, True, errno.EHOSTUNREACH),
    ],
)
def test_icmp_unreachable_reaches_client_socket(
    lab: Lab, front: Front, code: int, recverr: bool, expected: int
) -> None:
    listener = front.udp
    with inside(lab.gw):
        sender = IcmpSender()
    with inside(lab.client):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert sender.available
        client.settimeout(WAIT)
        if recverr:
            client.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
        client.connect(("198.18.0.11", 9))
        client.send(b"discard me")
        wait_readable(listener)
        data, source, destination = recv_with_destination(listener)
        sender.unreachable(source, destination, len(data), code)
        with pytest.raises(OSError) as caught:
            client.recv(100)
        assert caught.value.errno == expected
    finally:
        client.close()
        sender.close()


def test_refusals_without_listener(lab: Lab) -> None:
    """Nothing listens on the port: TCP is reset, UDP and ICMP get host-unreachable."""
    with inside(lab.gw):
        Interception(plan_for()).install()
    with inside(lab.client):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with tcp, udp, raw:
        tcp.settimeout(WAIT)
        with pytest.raises(ConnectionRefusedError):
            tcp.connect(("198.18.0.5", 80))
        udp.settimeout(WAIT)
        udp.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
        udp.connect(("198.18.0.7", 5353))
        udp.send(b"query")
        with pytest.raises(OSError) as caught:
            udp.recv(100)
        assert caught.value.errno == errno.EHOSTUNREACH
        echo = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x5364, 1) + b"ping")
        echo[2:4] = struct.pack("!H", checksum(bytes(echo)))
        raw.sendto(bytes(echo), ("198.18.0.9", 0))
        assert icmp_error_about(raw, "198.18.0.9") == (3, 1)


def checksum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total & 0xFFFF) + (total >> 16)
    return ~(total + (total >> 16)) & 0xFFFF


def icmp_error_about(raw: socket.socket, destination: str) -> tuple[int, int] | None:
    """(type, code) of the first ICMP error quoting a packet to ``destination``, within WAIT."""
    raw.settimeout(WAIT)
    with contextlib.suppress(TimeoutError):
        while True:
            packet = raw.recv(2048)
            icmp = packet[(packet[0] & 0x0F) * 4 :]
            if icmp[0] == 3 and len(icmp) >= 28 and socket.inet_ntoa(icmp[24:28]) == destination:
                return icmp[0], icmp[1]
    return None


def test_without_privilege(kernel_ready: None) -> None:
    """As nobody: transparent_listener says why it fails; IcmpSender is unavailable."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root, report, never return into pytest
        result = b"?"
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                transparent_listener("127.0.0.1", 0, socket.SOCK_STREAM)
                result = b"no error"
            except PermissionError as exc:
                result = b"PermissionError: " + str(exc).encode()
            result += b"|available=%d" % IcmpSender().available
        finally:
            os.write(writer, result)
            os._exit(0)
    os.close(writer)
    try:
        output = b""
        while chunk := os.read(reader, 4096):
            output += chunk
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    assert output.startswith(b"PermissionError: ") and b"CAP_NET_ADMIN" in output
    assert output.endswith(b"|available=0")
