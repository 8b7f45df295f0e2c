"""Lab scenarios: each acts as a user in a running lab and checks what that user would see.

Scenarios are registered with `scenario` or, when written once for both directions across
the gateway, `directed` (see `netnslab.scenario_kit`); `run_scenario` turns one into an
`Outcome`. Scenarios are tagged with the topology they are written for; a topology file may
list the scenarios that apply to it instead. Importing this module registers them all.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from netnslab.driver import (
    ScenarioFailure,
    check,
    curl,
    curl_fails,
    established_sockets,
    expect_ok,
    gateway_config,
    gateway_endpoint,
    ncat_http,
    probe_argv,
    read_json_line,
    require_services,
    run_probe,
)
from netnslab.lab import Lab
from netnslab.scenario_kit import (
    GATEWAY,
    PREF_DOMAIN,
    PREF_IPV4,
    PREF_IPV6,
    REP_HOST_UNREACHABLE,
    REP_NETWORK_UNREACHABLE,
    REP_REFUSED,
    REP_TTL_EXPIRED,
    SCENARIOS,
    V4_TO_V6,
    V6_TO_V4,
    Direction,
    Scenario,
    ask,
    associate_one,
    body_of,
    directed,
    endpoint_text,
    gw_address_toward,
    proxy,
    scenario,
)
from netnslab.services import reverse_name
from netnslab.topology import Topology

__all__ = ["SCENARIOS", "Outcome", "Scenario", "run_all", "run_scenario", "scenarios_for"]

S4_HELLO, S6_HELLO = "hello from s4", "hello from s6"


@dataclass(frozen=True)
class Outcome:
    """The result of running one scenario."""

    name: str
    passed: bool
    detail: str
    seconds: float


def scenarios_for(topology: Topology) -> list[Scenario]:
    """The scenarios that apply to a topology: its ``scenarios`` list, or those tagged with it."""
    if topology.scenarios is not None:
        return [SCENARIOS[n] for n in topology.scenarios if n in SCENARIOS]
    return [s for s in SCENARIOS.values() if s.topology == topology.name]


def run_scenario(lab: Lab, name: str, clock: Callable[[], float] = time.monotonic) -> Outcome:
    """Run one scenario; never raises for a scenario failure."""
    started = clock()
    try:
        detail = SCENARIOS[name].func(lab)
        passed = True
    except ScenarioFailure as exc:
        detail, passed = str(exc), False
    except Exception as exc:  # a broken scenario or lab must show up in the table, not crash it
        detail, passed = f"{type(exc).__name__}: {exc}", False
    return Outcome(name, passed, detail, clock() - started)


def run_all(lab: Lab, names: Iterable[str] | None = None) -> list[Outcome]:
    """Run the named scenarios (default: those for the lab's topology) in order."""
    chosen = list(names) if names else [s.name for s in scenarios_for(lab.topology)]
    return [run_scenario(lab, name) for name in chosen]


# --- the network itself (no gateway needed) ----------------------------------------------


@scenario("net-forwarding-off")
def forwarding_off(lab: Lab) -> str:
    """gw does not forward: c4 cannot reach s4 directly although gw itself can."""
    s4 = lab.address("s4", 4)
    check(S4_HELLO in curl(lab, "gw", f"http://{s4}:8080/"), "gw cannot reach s4's server")
    message = curl_fails(lab, "c4", f"http://{s4}:8080/")
    s6 = lab.address("s6", 6)
    check(S6_HELLO in curl(lab, "gw", f"http://[{s6}]:8080/"), "gw cannot reach s6's server")
    curl_fails(lab, "c6", f"http://[{s6}]:8080/")
    return f"c4 -> s4 direct: {message}"


@scenario("net-single-stack")
def single_stack(lab: Lab) -> str:
    """c4 and s4 have no IPv6 at all; c6 and s6 have no IPv4 beyond loopback."""
    for node in ("c4", "s4"):
        done = lab.exec(node, ["ip", "-6", "-o", "addr", "show"])
        check(not done.stdout.strip(), f"{node} has IPv6 addresses: {done.stdout.strip()}")
    for node in ("c6", "s6"):
        done = lab.exec(node, ["ip", "-4", "-o", "addr", "show"])
        non_lo = [line for line in done.stdout.splitlines() if " lo " not in line]
        check(not non_lo, f"{node} has IPv4 addresses: {non_lo}")
    return "v4-only and v6-only nodes are single-stack"


@scenario("dns-zone")
def dns_zone(lab: Lab) -> str:
    """dnsmasq serves the lab zone: A only, AAAA only, both, PTR, NXDOMAIN."""
    require_services(lab, "dns/dnsmasq")
    server = lab.address("dns", 6)

    def answers(name: str, qtype: str) -> list[str]:
        result = expect_ok(
            run_probe(lab, "gw", "dns", "--server", server, "--name", name, "--type", qtype),
            f"DNS {qtype} {name}",
        )
        return list(result["answers"])

    s4, s6 = lab.address("s4", 4), lab.address("s6", 6)
    check(answers("v4.lab.test", "A") == [s4], "v4.lab.test A")
    check(answers("v4.lab.test", "AAAA") == [], "v4.lab.test must have no AAAA")
    check(answers("v6.lab.test", "AAAA") == [s6], "v6.lab.test AAAA")
    check(answers("v6.lab.test", "A") == [], "v6.lab.test must have no A")
    check(answers("dual.lab.test", "A") == [s4], "dual.lab.test A")
    check(answers("dual.lab.test", "AAAA") == [s6], "dual.lab.test AAAA")
    check(answers(reverse_name(s6), "PTR") == ["v6.lab.test"], "PTR of s6")
    check(answers(reverse_name(s4), "PTR") == ["v4.lab.test"], "PTR of s4")
    return "A, AAAA, PTR as declared"


# --- v4-only client to v6-only server, and back --------------------------------------------


@directed(("v4-to-v6-curl", V4_TO_V6))
def curl_across(lab: Lab, way: Direction) -> str:
    """{client} fetches http://{name} with curl over socks5h:// (name resolved by gw)."""
    require_services(lab, GATEWAY)
    url = f"http://{way.name}:8080/"
    body = curl(lab, way.client, url, proxy=f"socks5h://{proxy(lab, way.client)}")
    check(way.hello in body, f"unexpected body {body!r}")
    seen_as = gw_address_toward(lab, way.server, way.server_version)
    check(f"client {seen_as}" in body, f"{way.server} should see the gateway ({seen_as}): {body!r}")
    return f"{way.server} saw the connection come from {seen_as}"


@scenario("v4-to-v6-ncat")
def v4_to_v6_ncat(lab: Lab) -> str:
    """c4 talks HTTP to v6.lab.test with ncat --proxy-type socks5 --proxy-dns remote."""
    require_services(lab, GATEWAY)
    body = ncat_http(lab, "c4", proxy(lab, "c4"), "v6.lab.test", 8080)
    check(S6_HELLO in body, f"unexpected reply {body!r}")
    return "ncat got s6's page"


@scenario("v4-to-v6-python-socks")
def v4_to_v6_python_socks(lab: Lab) -> str:
    """c4 fetches v6.lab.test through python-socks (rdns)."""
    require_services(lab, GATEWAY)
    result = ask(lab, "c4", "pysocks", "python-socks", dest="v6.lab.test", port=8080)
    check(S6_HELLO in body_of(result), f"unexpected body {body_of(result)!r}")
    return "python-socks got s6's page"


@directed(("v4-to-v6-address-id", V4_TO_V6))
def address_id_across(lab: Lab, way: Direction) -> str:
    """{client} gets {server}'s {record}, then an ADDRESS ID for it, and CONNECTs by that ID
    (twice); python-socks works too."""
    require_services(lab, GATEWAY)
    what = f"ADDRESS ASSOCIATE {way.name} as IPv{way.server_version}"
    first = associate_one(lab, way.client, way.name, way.pref, what)
    check(first["ok"], f"forward DNS through gw failed: {first}")
    address = first["bound"]["text"]
    check(
        address == lab.address(way.server, way.server_version), f"{way.name} resolved to {address}"
    )
    result = ask(lab, way.client, "id-http", "CONNECT by ADDRESS ID", dest=address, port=8080)
    check(result["id"]["kind"] == "id", f"ADDRESS ASSOCIATE gave {result['id']}, not an ID")
    check(way.hello in body_of(result), "CONNECT by ID on the associating connection")
    check(way.hello in body_of(result, "body_again"), "CONNECT by the same ID on a new connection")
    pysocks = ask(lab, way.client, "pysocks", "python-socks", dest=way.name, port=8080)
    check(way.hello in body_of(pysocks), "python-socks body")
    return f"{address} is {result['id']['text']}"


@scenario("v4-to-v6-connect-aa")
def v4_to_v6_connect_aa(lab: Lab) -> str:
    """c4 CONNECT+AA to v6.lab.test: the reply carries an ID that works on a new connection."""
    require_services(lab, GATEWAY)
    result = ask(lab, "c4", "connect-aa", "CONNECT+AA", dest="v6.lab.test", port=8080)
    check(result["bound"]["kind"] == "id", f"CONNECT+AA reply BND is {result['bound']}")
    check(S6_HELLO in body_of(result) and S6_HELLO in body_of(result, "body_again"), "bodies")
    return f"BND {result['bound']['text']}"


# The reverse direction, from the same bodies (registered here to keep the listing order).
directed(("v6-to-v4-curl", V6_TO_V4))(curl_across)
directed(("v6-to-v4-address-id", V6_TO_V4))(address_id_across)


# --- DNS delegation through ADR.PREF -----------------------------------------------------


@scenario("dns-forward-delegation")
def dns_forward(lab: Lab) -> str:
    """ADDRESS ASSOCIATE with ADR.PREF X'01'/X'04' returns the A/AAAA records; none: REP 4."""
    require_services(lab, GATEWAY)
    s4, s6 = lab.address("s4", 4), lab.address("s6", 6)
    wanted = [
        ("v6.lab.test", PREF_IPV6, s6),
        ("v4.lab.test", PREF_IPV4, s4),
        ("dual.lab.test", PREF_IPV4, s4),
        ("dual.lab.test", PREF_IPV6, s6),
    ]
    for name, pref, expected in wanted:
        got = associate_one(lab, "c4", name, pref, f"associate {name}")
        check(got["ok"] and got["bound"]["text"] == expected, f"{name} pref {pref}: {got}")
    missing = associate_one(lab, "c4", "v6.lab.test", PREF_IPV4, "associate v6.lab.test as IPv4")
    check(
        not missing["ok"] and missing["rep"] == REP_HOST_UNREACHABLE,
        f"a name without A asked as IPv4 must be REP 4, got {missing}",
    )
    return "A/AAAA by ADR.PREF; no A -> REP 4"


@scenario("dns-reverse-delegation")
def dns_reverse(lab: Lab) -> str:
    """ADDRESS ASSOCIATE with ADR.PREF X'03' returns the PTR name, from either family."""
    require_services(lab, GATEWAY)
    for client in ("c4", "c6"):
        for server, version, name in (("s6", 6, "v6.lab.test"), ("s4", 4, "v4.lab.test")):
            what = f"reverse of {server} from {client}"
            got = associate_one(lab, client, lab.address(server, version), PREF_DOMAIN, what)
            check(
                got["ok"] and got["bound"] == {"kind": "domain", "text": name},
                f"{client}: PTR of {server}: {got}",
            )
    return "PTR names for s4 and s6 from both clients"


# --- BIND -------------------------------------------------------------------------------


def _peer_talk(lab: Lab, peer: str, endpoint: str, line: str) -> dict[str, Any]:
    return expect_ok(run_probe(lab, peer, "talk", "--to", endpoint, "--line", line), f"{peer}")


def _gw_endpoint_for(lab: Lab, peer: str, version: int, port: int) -> str:
    # The peer connects to the gateway's address on the peer's own segment.
    return endpoint_text(gw_address_toward(lab, peer, version), port)


@scenario("bind-v6-peer")
def bind_v6_peer(lab: Lab) -> str:
    """c4 BINDs expecting s6; s6 (IPv6-only) connects back to the gateway and they talk."""
    require_services(lab, GATEWAY)
    argv = probe_argv(
        "bind", "--proxy", proxy(lab, "c4"), "--dest", lab.address("s6", 6), "--timeout", "15"
    )
    with lab.popen("c4", argv) as child:
        bound = read_json_line(child, 10)
        check(bound.get("event") == "bound", f"BIND failed: {bound}")
        talk = _peer_talk(lab, "s6", _gw_endpoint_for(lab, "s6", 6, bound["port"]), "hi from s6")
        check(talk["reply"] == "welcome 0", f"s6 got {talk['reply']!r}")
        final = read_json_line(child, 10)
    expect_ok(final, "BIND")
    peer = final["peers"][0]
    check(peer["line"] == "hi from s6", f"c4 received {peer['line']!r}")
    check(peer["peer_port"] == talk["local"][1], f"second reply port {peer['peer_port']}")
    return f"bound {bound['bound']['text']}:{bound['port']}, peer {peer['peer']['text']}"


@scenario("bind-multi")
def bind_multi(lab: Lab) -> str:
    """c4 BIND MULTI: one listener, two peers (s4 over IPv4, s6 over IPv6), each relayed."""
    require_services(lab, GATEWAY)
    argv = probe_argv(
        "bind",
        "--proxy",
        proxy(lab, "c4"),
        "--dest",
        "0.0.0.0",
        "--multi",
        "--peers",
        "2",
        "--timeout",
        "15",
    )
    with lab.popen("c4", argv) as child:
        bound = read_json_line(child, 10)
        check(bound.get("event") == "bound", f"BIND MULTI failed: {bound}")
        port = bound["port"]
        for peer, version in (("s4", 4), ("s6", 6)):
            endpoint = _gw_endpoint_for(lab, peer, version, port)
            talk = _peer_talk(lab, peer, endpoint, f"hi from {peer}")
            check(talk["reply"].startswith("welcome"), f"{peer} got {talk['reply']!r}")
        final = read_json_line(child, 15)
    expect_ok(final, "BIND MULTI")
    lines = sorted(p["line"] for p in final["peers"])
    check(lines == ["hi from s4", "hi from s6"], f"c4 received {lines}")
    return f"two peers on port {port}"


# --- faults -----------------------------------------------------------------------------


@scenario("fault-link-down")
def fault_link_down(lab: Lab) -> str:
    """s6's link goes down mid-transfer: c4 sees the end, gw frees the session, then recovers."""
    require_services(lab, GATEWAY)
    idle = float(gateway_config(lab).get("timeouts", {}).get("idle", 600.0))
    check(idle <= 30, f"timeouts.idle is {idle}s; the lab config should keep it short")
    s6 = lab.address("s6", 6)
    argv = probe_argv(
        "hold-stream",
        "--proxy",
        proxy(lab, "c4"),
        "--dest",
        "v6.lab.test",
        "--port",
        "8081",
        "--timeout",
        str(idle + 15),
    )
    try:
        with lab.popen("c4", argv) as child:
            streaming = read_json_line(child, 10)
            check(streaming.get("event") == "streaming", f"no transfer: {streaming}")
            lab.set_link("s6", "gw", up=False)
            final = read_json_line(child, idle + 20)
        expect_ok(final, "transfer")
        check(final["ended"] in ("eof", "reset"), f"client never saw the end: {final}")
        after = float(final["seconds_after_streaming"])
        check(after <= idle + 5, f"connection ended {after:.1f}s after the link went down")
        leftover = [p for p in established_sockets(lab, "gw") if s6 in p[1] or ":8081" in p[1]]
        check(not leftover, f"gw still holds sessions toward s6: {leftover}")
    finally:
        lab.set_link("s6", "gw", up=True)
    body = curl(lab, "c4", "http://v6.lab.test:8080/", proxy=f"socks5h://{proxy(lab, 'c4')}")
    check(S6_HELLO in body, "gw does not serve s6 again after the link came back")
    return f"{final['ended']} {after:.1f}s after link down; served again after link up"


@scenario("fault-route-removed")
def fault_route_removed(lab: Lab) -> str:
    """gw loses its route to far.lab.test's network: REP 3; the route returns: served again."""
    require_services(lab, GATEWAY)
    curl_proxy = f"socks5h://{proxy(lab, 'c4')}"
    check(S6_HELLO in curl(lab, "c4", "http://far.lab.test:8080/", proxy=curl_proxy), "before")
    route = next(str(r.to) for r in lab.topology.nodes["gw"].routes if r.to.prefixlen == 64)
    lab.delete_route("gw", route)
    try:
        result = ask(
            lab, "c4", "expect-failure", "CONNECT far.lab.test", dest="far.lab.test", port=8080
        )
    finally:
        lab.restore_routes("gw")
    check(
        result["failed"] and result["rep"] == REP_NETWORK_UNREACHABLE,
        f"expected REP 3 without a route, got {result}",
    )
    check(S6_HELLO in curl(lab, "c4", "http://far.lab.test:8080/", proxy=curl_proxy), "after")
    return f"REP 3 in {result['elapsed']:.2f}s"


@scenario("fault-dns-stopped")
def fault_dns_stopped(lab: Lab) -> str:
    """dnsmasq frozen: REP 4 within the resolver timeout, literals still work, then names too."""
    require_services(lab, GATEWAY, "dns/dnsmasq")
    resolver = gateway_config(lab).get("resolver", {})
    timeout, tries = float(resolver.get("timeout", 3.0)), int(resolver.get("tries", 2))
    budget = timeout * tries + 1.0  # the gateway's hard resolver deadline, plus start-up slack
    fresh = f"n{secrets.token_hex(4)}.any.lab.test"  # never cached by the gateway
    lab.signal_service("dns", "dnsmasq", signal.SIGSTOP)
    try:
        result = ask(
            lab,
            "c4",
            "expect-failure",
            f"CONNECT {fresh}",
            dest=fresh,
            port=8080,
            timeout=budget + 10,
        )
        literal = ask(
            lab,
            "c4",
            "http",
            "CONNECT to a literal while DNS is down",
            dest=lab.address("s6", 6),
            port=8080,
        )
    finally:
        lab.signal_service("dns", "dnsmasq", signal.SIGCONT)
    check(
        result["failed"] and result["rep"] == REP_HOST_UNREACHABLE,
        f"expected REP 4 with DNS down, got {result}",
    )
    check(result["elapsed"] <= budget, f"REP 4 took {result['elapsed']:.1f}s (budget {budget}s)")
    check(S6_HELLO in body_of(literal), "literal CONNECT body")
    again = ask(
        lab,
        "c4",
        "http",
        "CONNECT by name after DNS came back",
        dest=f"n{secrets.token_hex(4)}.any.lab.test",
        port=8080,
    )
    check("hello from" in body_of(again), "body after DNS came back")
    return f"REP 4 after {result['elapsed']:.1f}s (budget {budget:.1f}s); recovered"


@scenario("fault-closed-port")
def fault_closed_port(lab: Lab) -> str:
    """CONNECT to a closed port on s6: REP 5 (connection refused), at once."""
    require_services(lab, GATEWAY)
    result = ask(lab, "c4", "expect-failure", "CONNECT v6.lab.test:9", dest="v6.lab.test", port=9)
    check(result["failed"] and result["rep"] == REP_REFUSED, f"expected REP 5, got {result}")
    check(result["elapsed"] < 2.0, f"REP 5 took {result['elapsed']:.1f}s")
    return f"REP 5 in {result['elapsed']:.2f}s"


@scenario("fault-blackhole")
def fault_blackhole(lab: Lab) -> str:
    """CONNECT to hole.lab.test, whose packets vanish: REP 6 after the connect timeout."""
    require_services(lab, GATEWAY)
    limit = float(gateway_config(lab).get("timeouts", {}).get("connect", 10.0))
    result = ask(
        lab,
        "c4",
        "expect-failure",
        "CONNECT hole.lab.test",
        dest="hole.lab.test",
        port=8080,
        timeout=limit + 15,
    )
    check(result["failed"] and result["rep"] == REP_TTL_EXPIRED, f"expected REP 6, got {result}")
    elapsed = float(result["elapsed"])
    check(limit - 0.5 <= elapsed <= limit + 3, f"REP 6 after {elapsed:.1f}s, timeout {limit}s")
    return f"REP 6 after {elapsed:.1f}s (connect timeout {limit}s)"


# --- chain topology ---------------------------------------------------------------------


@scenario("chain-two-hops", topology="chain")
def chain_two_hops(lab: Lab) -> str:
    """c4 reaches s4 through gw1 then gw2 (SOCKS over SOCKS), across an IPv6-only middle."""
    require_services(lab, "gw1/gateway", "gw2/gateway")
    first = gateway_endpoint(lab, "c4", "gw1")
    second = next(str(e) for e in lab.service("gw2", "gateway").options["listen"])
    port = second.rsplit(":", 1)[1]
    curl_fails(lab, "c4", f"http://{lab.address('s4', 4)}:8080/")
    result = expect_ok(
        run_probe(
            lab,
            "c4",
            "pysocks",
            "--via",
            f"socks5://{first}",
            "--proxy",
            f"gw2.lab.test:{port}",
            "--dest",
            "s4.lab.test",
            "--port",
            "8080",
        ),
        "two-hop python-socks chain",
    )
    body = body_of(result)
    check(S4_HELLO in body, f"unexpected body {body!r}")
    gw2_v4 = lab.address("gw2", 4)
    check(f"client {gw2_v4}" in body, f"s4 should see gw2 ({gw2_v4}) as the client: {body!r}")
    return "c4 -> gw1 -> [IPv6] -> gw2 -> s4"


# After the scenarios above, so that `lab run` lists the UDP and multicast ones after them.
from netnslab import scenarios_udp  # noqa: E402,F401
