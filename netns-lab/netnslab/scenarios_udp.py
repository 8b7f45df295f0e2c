"""UDP and multicast scenarios: datagrams across families through the gateway's relay.

s4 and s6 run a UDP echo whose answer names the sender as the echo saw it, so a scenario
checks both ends: the source the *client* is shown (the name or ID it used, profile 6) and
the address and port the *server* saw (the gateway's, or the client's own port with
USECLIENTSPORT). Multicast memberships are read from gw's /proc/net/igmp and igmp6.
Imported by `netnslab.scenarios`, which registers these with the rest.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from typing import Any

from netnslab import netlink
from netnslab.driver import (
    check,
    expect_ok,
    gateway_config,
    probe_argv,
    read_json_line,
    require_services,
    run_probe,
)
from netnslab.lab import Lab
from netnslab.scenario_kit import (
    GATEWAY,
    PREF_ID,
    V4_TO_V6,
    V6_TO_V4,
    Direction,
    ask,
    associate_one,
    directed,
    endpoint_text,
    gw_address_toward,
    proxy,
    scenario,
)
from netnslab.services import split_endpoint
from netnslab.timing import poll_until

FLAG_USECLIENTSPORT, FLAG_TUNNEL = 0x04, 0x20
GROUP_PORT = 6464
STREAM_LENGTH = 5  # datagrams a multicast sender sends
CLOSE_LIMIT = 5.0  # seconds for the gateway to end an association whose address went away


def _echo_port(lab: Lab, node: str) -> int:
    endpoints = lab.service(node, "testserver").options.get("udp") or []
    check(endpoints, f"{node}'s testserver has no UDP echo in this topology")
    return split_endpoint(str(endpoints[0]))[1]


def _domain(name: str) -> dict[str, str]:
    return {"kind": "domain", "text": name}


def _ip(text: str) -> dict[str, str]:
    return {"kind": f"ipv{ipaddress.ip_address(text).version}", "text": text}


def _udp_echo(lab: Lab, client: str, dest: str, server: str, **options: object) -> dict[str, Any]:
    """Associate from ``client`` and echo with ``server``'s UDP echo at ``dest``."""
    return ask(
        lab,
        client,
        "udp-echo",
        f"UDP echo {client} -> {dest}",
        20.0,
        dest=dest,
        port=_echo_port(lab, server),
        **options,
    )


def _check_replies(
    lab: Lab, result: dict[str, Any], server: str, source: dict[str, str], count: int = 1
) -> None:
    """Every echo came back, shown from ``source``, and ``server`` saw the gateway send it."""
    replies = result["replies"]
    check(len(replies) == count, f"{len(replies)} echoes of {count}: {replies}")
    version = 6 if server == "s6" else 4
    gateway_side = gw_address_toward(lab, server, version)
    for index, reply in enumerate(replies):
        check(reply["source"] == source, f"echo {index} shown from {reply['source']}, not {source}")
        check(reply["port"] == _echo_port(lab, server), f"echo {index} from port {reply['port']}")
        check(reply["data"] == f"hello {index}", f"echo {index} carried {reply['data']!r}")
        echo = reply["echo"] or {}
        check(echo.get("server") == server, f"echo {index} answered by {echo}")
        check(echo.get("peer") == gateway_side, f"{server} saw {echo}, not gw {gateway_side}")


def _address_id(lab: Lab, client: str, name: str) -> str:
    """The ADDRESS ID the gateway gives ``client`` for ``name`` (ADR.PREF X'08')."""
    got = associate_one(lab, client, name, PREF_ID, f"ADDRESS ASSOCIATE {name}")
    check(got["ok"] and got["bound"]["kind"] == "id", f"no ID for {name}: {got}")
    return str(got["bound"]["text"])


# --- unicast across families --------------------------------------------------------------


@directed(("udp-v4-to-v6-name", V4_TO_V6))
def udp_by_name(lab: Lab, way: Direction) -> str:
    """{client} exchanges datagrams with {name}'s UDP echo; replies come from that name."""
    require_services(lab, GATEWAY)
    result = _udp_echo(lab, way.client, way.name, way.server, count=2)
    reached = split_endpoint(proxy(lab, way.client))[0]
    check(result["relay"] == _ip(reached), f"relay on {result['relay']}, not {reached}")
    _check_replies(lab, result, way.server, _domain(way.name), count=2)
    relay = endpoint_text(reached, result["relay_port"])
    return f"2 echoes via relay {relay}, shown from {way.name}"


@directed(("udp-v4-to-v6-id", V4_TO_V6))
def udp_by_id(lab: Lab, way: Direction) -> str:
    """{client} sends to {server} by ADDRESS ID; the replies' source is that same ID."""
    require_services(lab, GATEWAY)
    realid = _address_id(lab, way.client, way.name)
    result = _udp_echo(lab, way.client, realid, way.server)
    _check_replies(lab, result, way.server, {"kind": "id", "text": realid})
    return f"echo shown from {realid}"


@directed(("udp-v6-to-v4", V6_TO_V4))
def udp_by_name_then_id(lab: Lab, way: Direction) -> str:
    """The reverse: {client} exchanges datagrams with {name} by name, then by ID."""
    return f"{udp_by_name(lab, way)}; then {udp_by_id(lab, way)}"


@scenario("udp-pysocks")
def udp_pysocks(lab: Lab) -> str:
    """PySocks (socksocket SOCK_DGRAM, rdns) from c4 reaches v6.lab.test's echo by name."""
    require_services(lab, GATEWAY)
    result = ask(
        lab,
        "c4",
        "pysocks-udp",
        "PySocks UDP",
        dest="v6.lab.test",
        port=_echo_port(lab, "s6"),
        line="pysocks",
    )
    check(result["source"] == "v6.lab.test", f"PySocks saw the reply from {result['source']!r}")
    check(result["data"] == "pysocks", f"PySocks got {result['data']!r}")
    echo = result["echo"] or {}
    gateway_side = gw_address_toward(lab, "s6", 6)
    check(echo.get("server") == "s6" and echo.get("peer") == gateway_side, f"echo saw {echo}")
    return "PySocks got s6's echo, shown from v6.lab.test"


@scenario("udp-use-client-port")
def udp_use_client_port(lab: Lab) -> str:
    """c4 asks USECLIENTSPORT for its port P: the reply echoes X'04', s6 sees gw's port P."""
    require_services(lab, GATEWAY)
    port = 20000 + secrets.randbelow(10000)  # below every node's ephemeral range: free
    result = _udp_echo(lab, "c4", "v6.lab.test", "s6", use_client_port=True, local_port=port)
    check(result["flag"] & FLAG_USECLIENTSPORT, f"reply FLAG {result['flag']:#04x} lacks X'04'")
    check(result["local_port"] == port, f"the client's port is {result['local_port']}")
    _check_replies(lab, result, "s6", _domain("v6.lab.test"))
    seen = result["replies"][0]["echo"]["peer_port"]
    check(seen == port, f"s6 saw the gateway's port {seen}, not the client's {port}")
    return f"s6 saw [{gw_address_toward(lab, 's6', 6)}]:{seen}"


@scenario("udp-tunnel")
def udp_tunnel(lab: Lab) -> str:
    """c6 in TUNNEL mode (datagrams on the TCP connection) to v4.lab.test by name."""
    require_services(lab, GATEWAY)
    result = _udp_echo(lab, "c6", "v4.lab.test", "s4", tunnel=True, count=2)
    check(result["flag"] & FLAG_TUNNEL, f"reply FLAG {result['flag']:#04x} lacks X'20'")
    check(result["relay_port"] == 0, f"a tunnel has no relay port: {result['relay_port']}")
    _check_replies(lab, result, "s4", _domain("v4.lab.test"), count=2)
    return "2 echoes through the tunnel, shown from v4.lab.test"


# --- multicast -----------------------------------------------------------------------------


def _multicast_interface(lab: Lab, version: int, sender: str) -> str:
    """gw's configured multicast interface for ``version``; it must face ``sender``."""
    configured = (gateway_config(lab).get("udp") or {}).get("multicast_interface") or {}
    name = configured.get(f"ipv{version}") if isinstance(configured, dict) else configured
    facing = lab.topology.link_between("gw", sender).end("gw").ifname
    check(name == facing, f"udp.multicast_interface ipv{version} is {name!r}, not {facing}")
    return facing


def _gw_groups(
    lab: Lab, version: int, ifname: str
) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The groups gw's kernel has joined on ``ifname`` (any socket), from /proc/net."""
    from translator.net.interfaces import parse_igmp, parse_igmp6

    index = lab.exec("gw", ["cat", f"/sys/class/net/{ifname}/ifindex"])
    check(index.returncode == 0, f"gw has no interface {ifname}: {index.stderr.strip()}")
    path = "/proc/net/igmp6" if version == 6 else "/proc/net/igmp"
    table = lab.exec("gw", ["cat", path])
    check(table.returncode == 0, f"reading {path} in gw: {table.stderr.strip()}")
    parse = parse_igmp6 if version == 6 else parse_igmp
    groups: dict[int, Any] = parse(table.stdout)
    return set(groups.get(int(index.stdout), set()))


@directed(("mcast-v6-group-to-v4-client", V4_TO_V6), ("mcast-v4-group-to-v6-client", V6_TO_V4))
def multicast_across(lab: Lab, way: Direction) -> str:
    """{client} (IPv{client_version}-only) receives {server}'s {group} stream through gw's
    MULTICAST JOIN.

    The client joins the group through gw, the server sends to it on its link; the
    membership shows in gw while joined and is gone once the association has ended.
    """
    require_services(lab, GATEWAY)
    client, sender, group = way.client, way.server, way.group
    version = ipaddress.ip_address(group).version
    ifname = _multicast_interface(lab, version, sender)
    wanted = ipaddress.ip_address(group)
    check(wanted not in _gw_groups(lab, version, ifname), f"gw is in {group} before any join")
    source = lab.address(sender, version)
    stream = ["--group", group, "--port", str(GROUP_PORT), "--count", str(STREAM_LENGTH)]
    stream += ["--line", f"stream from {sender}"]
    argv = probe_argv("mcast-recv", "--proxy", proxy(lab, client), *stream, "--timeout", "10")
    with lab.popen(client, argv) as child:
        joined = read_json_line(child, 10)
        check(joined.get("event") == "joined", f"MULTICAST JOIN {group} failed: {joined}")
        check(wanted in _gw_groups(lab, version, ifname), f"gw shows no {group} on {ifname}")
        sent = expect_ok(
            run_probe(
                lab,
                sender,
                "mcast-send",
                *stream,
                "--ifname",
                lab.topology.link_between(sender, "gw").end(sender).ifname,
                "--source",
                source,
                "--hops",
                "1",
            ),
            f"{sender} sending to {group}",
        )
        final = expect_ok(read_json_line(child, 15), f"{client} receiving {group}")
    received = final["received"]
    check(len(received) == STREAM_LENGTH, f"{client} got {len(received)}/{STREAM_LENGTH}")
    sender_port = sent["local"][1]
    for index, got in enumerate(received):
        check(got["data"] == f"stream from {sender} {index}", f"datagram {index}: {got}")
        check(got["source"] == _ip(source) and got["port"] == sender_port, f"source of {got}")
    left = poll_until(lambda: wanted not in _gw_groups(lab, version, ifname), timeout=3.0)
    check(left, f"gw still joined to {group} on {ifname} after the association ended")
    return f"{STREAM_LENGTH}/{STREAM_LENGTH} from {source}; joined on {ifname}, then left"


# --- the gateway follows netlink ------------------------------------------------------------


def _extra_client_address(
    lab: Lab,
) -> tuple[str, ipaddress.IPv4Interface | ipaddress.IPv6Interface, str]:
    """(gw's interface toward c4, its second IPv4 address there, the listener on it)."""
    end = lab.topology.link_between("gw", "c4").end("gw")
    extras = [a for a in end.addresses if a.version == 4][1:]
    check(extras, "the topology gives gw only one address toward c4")
    listen = [str(e) for e in lab.service("gw", "gateway").options.get("listen") or []]
    endpoint = next((e for e in listen if split_endpoint(e)[0] == str(extras[0].ip)), None)
    check(endpoint is not None, f"gw does not listen on {extras[0].ip}")
    assert endpoint is not None
    return end.ifname, extras[0], endpoint


def _stuck_closes(lab: Lab, address: str) -> str:
    """What gw holds on ``address`` when a close did not reach the client (diagnosis)."""
    done = lab.exec("gw", ["ss", "-tni", "--no-header", "state", "fin-wait-1"])
    lines = done.stdout.splitlines()
    stuck: list[str] = []
    for index, line in enumerate(lines):
        if f"{address}:" in line:
            info = lines[index + 1].split() if index + 1 < len(lines) else []
            counters = [
                f for f in info if f.startswith(("bytes_sent:", "bytes_acked:", "notsent:"))
            ]
            stuck.append(" ".join([*line.split()[:4], *counters]))
    logged = [line for line in lab.log_tail("gw", "gateway", 40).splitlines() if address in line]
    return f"gw sockets in FIN-WAIT-1: {stuck}; gateway log: {logged[-1:] or 'nothing'}"


@scenario("udp-address-removed")
def udp_address_removed(lab: Lab) -> str:
    """gw loses the address an association relays on: the client's TCP connection ends."""
    require_services(lab, GATEWAY)
    ifname, extra, endpoint = _extra_client_address(lab)
    argv = probe_argv(
        "udp-hold",
        "--proxy",
        endpoint,
        "--dest",
        "v6.lab.test",
        "--port",
        str(_echo_port(lab, "s6")),
        "--timeout",
        str(CLOSE_LIMIT + 3),
    )
    diagnosis = ""
    try:
        with lab.popen("c4", argv) as child:
            held = read_json_line(child, 10)
            check(held.get("event") == "associated", f"association via {endpoint}: {held}")
            check(held["relay"] == _ip(str(extra.ip)), f"relay on {held['relay']}")
            removed_at = time.monotonic()
            done = lab.exec("gw", ["ip", "addr", "del", str(extra), "dev", ifname])
            check(done.returncode == 0, f"ip addr del {extra}: {done.stderr.strip()}")
            final = expect_ok(read_json_line(child, CLOSE_LIMIT + 8), "holding the association")
            seconds = time.monotonic() - removed_at
            if final["ended"] == "timeout":
                diagnosis = _stuck_closes(lab, str(extra.ip))  # before restoring frees them
    finally:
        _restore_address(lab, ifname, extra)
    check(
        final["ended"] != "timeout",
        f"c4's control connection still open {final['waited']:.1f}s after {extra.ip} was "
        f"removed from gw; {diagnosis}",
    )
    check(seconds <= CLOSE_LIMIT, f"the control connection ended only after {seconds:.1f}s")
    return f"control connection ended ({final['ended']}) {seconds:.1f}s after the removal"


def _restore_address(
    lab: Lab, ifname: str, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
) -> None:
    """Put the removed address back and wait until it is usable (past DAD) again."""
    netlink.configure_interface(lab.namespace("gw"), ifname, [address])
    lab.wait_node_usable("gw")
