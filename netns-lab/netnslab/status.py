"""A readable picture of a running lab, read live from the kernel and the process table."""

from __future__ import annotations

import ipaddress

from netnslab import netlink, procs
from netnslab.lab import Lab
from netnslab.services import describe_options


def _family_note(sysctls: dict[str, str]) -> str:
    fwd4 = sysctls.get("net.ipv4.ip_forward", "?")
    if sysctls.get("net.ipv6.conf.all.disable_ipv6") == "1":
        v6 = "ipv6 disabled"
    else:
        v6 = f"ipv6 forwarding={sysctls.get('net.ipv6.conf.all.forwarding', '?')}"
    return f"ipv4 forwarding={fwd4}, {v6}"


def render_status(lab: Lab, verbose: bool = False) -> str:
    """Namespaces, their interfaces (with the peer each veth leads to), addresses, routes and
    services of one lab. Link-local addresses are shown only with ``verbose``."""
    topo = lab.topology
    lines = [
        f"lab {lab.run_id}  topology {topo.name}  phase {lab.state.phase}",
        f"  state {lab.directory}",
    ]
    for node in topo.nodes.values():
        ns = lab.namespace(node.name)
        lines.append("")
        if not netlink.namespace_exists(ns):
            lines.append(f"{node.name:<5} {ns}  (namespace missing)")
            continue
        sysctls = netlink.read_sysctls(
            ns,
            [
                "net.ipv4.ip_forward",
                "net.ipv6.conf.all.forwarding",
                "net.ipv6.conf.all.disable_ipv6",
            ],
        )
        title = f"{node.name:<5} {node.description or ''}".rstrip()
        lines.append(f"{title}  [netns {ns}; {_family_note(sysctls)}]")
        peers = {
            link.end(node.name).ifname: link.other(node.name) for link in topo.links_of(node.name)
        }
        addresses = netlink.list_addresses(ns)
        for link in sorted(netlink.list_links(ns), key=lambda item: item.index):
            shown = [
                f"{a.address}/{a.prefixlen}" + (" (tentative)" if a.tentative else "")
                for a in addresses
                if a.ifname == link.ifname
                and (verbose or not ipaddress.ip_address(a.address).is_link_local)
            ]
            peer = peers.get(link.ifname)
            toward = f"-> {peer.node}:{peer.ifname}" if peer else ""
            lines.append(
                f"    {link.ifname:<10} {link.operstate:<8} {' '.join(shown) or '-':<40} {toward}"
            )
        for route in netlink.list_routes(ns):
            if route.gateway is None and route.kind == "unicast" and not verbose:
                continue  # connected routes: implied by the addresses above
            via = f" via {route.gateway}" if route.gateway else ""
            kind = "" if route.kind == "unicast" else f"{route.kind} "
            lines.append(f"    route      {kind}{route.dst}{via}")
        for service in node.services:
            proc = lab.service_process(node.name, service.name)
            failure = lab.service_failures.get(f"{node.name}/{service.name}")
            if proc is None:
                state = "not started" + (f": {failure.splitlines()[0]}" if failure else "")
            elif procs.is_running(proc):
                state = f"pid {proc.pid} running"
            else:
                state = f"pid {proc.pid} EXITED (log {proc.log})"
            detail = describe_options(service.options)
            lines.append(f"    service    {service.name} ({service.kind}) {state}; {detail}")
    return "\n".join(lines)
