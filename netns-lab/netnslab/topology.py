"""Declarative lab topologies: the YAML schema, its validation and the typed model.

A topology names nodes (one network namespace each), point-to-point links between them
(one veth pair each, with the addresses of both ends) and the services each node runs.
Every address must come from the documentation ranges, so a lab can never talk to a real
network even if it were wired to one by mistake. See ``netns-lab/topologies/default.yaml``
for an annotated example.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOPOLOGY_DIR = Path(__file__).resolve().parent.parent / "topologies"

# RFC 5737 and RFC 3849, plus the multicast ranges the project may use.
DOCUMENTATION_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("192.0.2.0/24"),
    ipaddress.ip_network("198.51.100.0/24"),
    ipaddress.ip_network("203.0.113.0/24"),
    ipaddress.ip_network("2001:db8::/32"),
)

NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")
SERVICE_KINDS = ("dnsmasq", "socks64", "testserver")
IFNAME_MAX = 15

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TopologyError(ValueError):
    """The topology file is malformed or asks for something the lab refuses to build."""


@dataclass(frozen=True)
class Route:
    """A static route in one node: ``to`` (a network, or ``default`` per family) via a next hop."""

    to: IPNetwork
    via: IPAddress

    @property
    def family(self) -> int:
        return self.to.version


@dataclass(frozen=True)
class Service:
    """A process the lab starts inside a node once the network is up.

    ``options`` keeps the kind-specific keys verbatim (``listen``, ``zone``, ``config``...).
    """

    kind: str
    name: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Node:
    """One network namespace."""

    name: str
    description: str = ""
    ipv4: bool = True
    ipv6: bool = True
    forwarding: bool = False
    loopback: tuple[IPInterface, ...] = ()
    routes: tuple[Route, ...] = ()
    services: tuple[Service, ...] = ()
    #: the node's resolv.conf (``ip netns exec`` mounts /etc/netns/NS/resolv.conf); () = the host's
    nameservers: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class LinkEnd:
    """One end of a veth pair: the node, the interface name inside it, and its addresses."""

    node: str
    ifname: str
    addresses: tuple[IPInterface, ...]


@dataclass(frozen=True)
class Link:
    """A veth pair joining two nodes."""

    a: LinkEnd
    b: LinkEnd

    def end(self, node: str) -> LinkEnd:
        """The end that lives in ``node``."""
        if self.a.node == node:
            return self.a
        if self.b.node == node:
            return self.b
        raise KeyError(node)

    def other(self, node: str) -> LinkEnd:
        """The end that does not live in ``node``."""
        return self.b if self.a.node == node else self.a


@dataclass(frozen=True)
class Topology:
    """A validated topology."""

    name: str
    description: str
    nodes: Mapping[str, Node]
    links: tuple[Link, ...]
    scenarios: tuple[str, ...] | None = None
    source: Path | None = field(default=None, compare=False)
    document: Any = field(default=None, compare=False, repr=False)

    def links_of(self, node: str) -> list[Link]:
        """Every link with an end in ``node``."""
        return [link for link in self.links if node in (link.a.node, link.b.node)]

    def addresses(self, node: str, version: int | None = None) -> list[IPInterface]:
        """The addresses of ``node`` on its links and loopback, optionally of one IP version."""
        found: list[IPInterface] = []
        for link in self.links_of(node):
            found.extend(link.end(node).addresses)
        found.extend(self.nodes[node].loopback)
        return [a for a in found if version is None or a.version == version]

    def address(self, node: str, version: int) -> str:
        """The first address of ``node`` of the given IP version, as text without prefix."""
        candidates = self.addresses(node, version)
        if not candidates:
            raise KeyError(f"node {node!r} has no IPv{version} address")
        return str(candidates[0].ip)

    def link_between(self, node: str, peer: str) -> Link:
        """The (first) link joining ``node`` and ``peer``."""
        for link in self.links_of(node):
            if link.other(node).node == peer:
                return link
        raise KeyError(f"no link between {node!r} and {peer!r}")

    def services(self, kind: str | None = None) -> list[tuple[str, Service]]:
        """``(node, service)`` pairs, optionally of one kind, in file order."""
        return [
            (node.name, service)
            for node in self.nodes.values()
            for service in node.services
            if kind is None or service.kind == kind
        ]


def find_topology(name_or_path: str | Path | None) -> Path:
    """Resolve a topology argument: a path to a YAML file or a name in ``netns-lab/topologies``."""
    if name_or_path is None:
        name_or_path = "default"
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise TopologyError(f"topology file {candidate} does not exist")
        return candidate
    bundled = TOPOLOGY_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        known = ", ".join(sorted(p.stem for p in TOPOLOGY_DIR.glob("*.yaml")))
        raise TopologyError(f"unknown topology {name_or_path!r} (known: {known})")
    return bundled


def load_topology(name_or_path: str | Path | None = None) -> Topology:
    """Load and validate a topology by name (``default``, ``chain``) or path."""
    path = find_topology(name_or_path)
    with path.open(encoding="utf-8") as stream:
        document = yaml.safe_load(stream)
    return dataclasses.replace(parse_topology(document, default_name=path.stem), source=path)


def parse_topology(document: Any, default_name: str = "custom") -> Topology:
    """Validate a parsed YAML document and build the model. Raises `TopologyError`."""
    doc = _mapping(document, "topology")
    _reject_unknown(doc, {"name", "description", "nodes", "links", "scenarios"}, "topology")
    nodes_doc = _mapping(doc.get("nodes"), "nodes")
    if not nodes_doc:
        raise TopologyError("a topology needs at least one node")
    nodes = {str(name): _parse_node(str(name), spec) for name, spec in nodes_doc.items()}
    links = tuple(
        _parse_link(index, spec, nodes) for index, spec in enumerate(doc.get("links") or [])
    )
    _assign_ifnames_unique(links)
    scenarios = doc.get("scenarios")
    if scenarios is not None and not (
        isinstance(scenarios, list) and all(isinstance(s, str) for s in scenarios)
    ):
        raise TopologyError("scenarios: expected a list of scenario names")
    topology = Topology(
        name=str(doc.get("name") or default_name),
        description=str(doc.get("description") or "").strip(),
        nodes=nodes,
        links=links,
        scenarios=tuple(scenarios) if scenarios is not None else None,
        document=document,
    )
    _check_families(topology)
    return topology


def _parse_node(name: str, spec: Any) -> Node:
    if not NODE_NAME.match(name):
        raise TopologyError(
            f"node name {name!r}: use 1-10 lower-case letters or digits, starting with a letter"
        )
    doc = _mapping(spec if spec is not None else {}, f"node {name}")
    allowed = {
        "description",
        "ipv4",
        "ipv6",
        "forwarding",
        "loopback",
        "routes",
        "services",
        "nameservers",
    }
    _reject_unknown(doc, allowed, f"node {name}")
    routes = tuple(_parse_route(name, r) for r in doc.get("routes") or [])
    services = tuple(
        _parse_service(name, index, s) for index, s in enumerate(doc.get("services") or [])
    )
    seen: set[str] = set()
    for service in services:
        if service.name in seen:
            raise TopologyError(f"node {name}: two services named {service.name!r}")
        seen.add(service.name)
    return Node(
        name=name,
        description=str(doc.get("description") or ""),
        ipv4=_bool(doc.get("ipv4", True), f"node {name}: ipv4"),
        ipv6=_bool(doc.get("ipv6", True), f"node {name}: ipv6"),
        forwarding=_bool(doc.get("forwarding", False), f"node {name}: forwarding"),
        loopback=tuple(_interface(a, f"node {name}: loopback") for a in doc.get("loopback") or []),
        routes=routes,
        services=services,
        nameservers=tuple(
            _address(a, f"node {name}: nameservers") for a in doc.get("nameservers") or []
        ),
    )


def _parse_route(node: str, spec: Any) -> Route:
    doc = _mapping(spec, f"node {node}: route")
    _reject_unknown(doc, {"to", "via"}, f"node {node}: route")
    via = _address(doc.get("via"), f"node {node}: route via")
    to_text = str(doc.get("to", ""))
    if to_text == "default":
        to: IPNetwork = ipaddress.ip_network("0.0.0.0/0" if via.version == 4 else "::/0")
    else:
        try:
            to = ipaddress.ip_network(to_text)
        except ValueError as exc:
            raise TopologyError(f"node {node}: route to {to_text!r}: {exc}") from None
        _check_documentation(to, f"node {node}: route to")
    if to.version != via.version:
        raise TopologyError(f"node {node}: route to {to} via {via} mixes IP versions")
    return Route(to=to, via=via)


def _parse_service(node: str, index: int, spec: Any) -> Service:
    doc = _mapping(spec, f"node {node}: service {index}")
    kind = doc.get("kind")
    if kind not in SERVICE_KINDS:
        raise TopologyError(
            f"node {node}: service {index}: kind must be one of {', '.join(SERVICE_KINDS)}"
        )
    name = str(doc.get("name") or kind)
    options = {k: v for k, v in doc.items() if k not in ("kind", "name")}
    return Service(kind=str(kind), name=name, options=options)


def _parse_link(index: int, spec: Any, nodes: Mapping[str, Node]) -> Link:
    doc = _mapping(spec, f"link {index}")
    if len(doc) != 2:
        raise TopologyError(f"link {index}: name exactly two nodes, each with its addresses")
    ends: list[LinkEnd] = []
    names = [str(n) for n in doc]
    if names[0] == names[1]:
        raise TopologyError(f"link {index}: a node cannot be linked to itself")
    for node_name, peer_name in (names, names[::-1]):
        if node_name not in nodes:
            raise TopologyError(f"link {index}: unknown node {node_name!r}")
        raw = doc[node_name] or []
        if not isinstance(raw, list):
            raise TopologyError(f"link {index}: addresses of {node_name} must be a list")
        addresses = tuple(_interface(a, f"link {index}: {node_name}") for a in raw)
        ends.append(LinkEnd(node=node_name, ifname=f"v-{peer_name}", addresses=addresses))
    return Link(a=ends[0], b=ends[1])


def _assign_ifnames_unique(links: Sequence[Link]) -> None:
    # Two links between the same pair would give two interfaces the same name in one node.
    seen: set[tuple[str, str]] = set()
    for link in links:
        for end in (link.a, link.b):
            key = (end.node, end.ifname)
            if key in seen:
                raise TopologyError(f"two links between {link.a.node} and {link.b.node}")
            if len(end.ifname) > IFNAME_MAX:
                raise TopologyError(f"interface name {end.ifname!r} is over {IFNAME_MAX} chars")
            seen.add(key)


def _check_families(topology: Topology) -> None:
    for node in topology.nodes.values():
        for address in topology.addresses(node.name):
            if address.version == 4 and not node.ipv4:
                raise TopologyError(f"node {node.name} has ipv4: false but address {address}")
            if address.version == 6 and not node.ipv6:
                raise TopologyError(f"node {node.name} has ipv6: false but address {address}")
        for route in node.routes:
            if (route.family == 6 and not node.ipv6) or (route.family == 4 and not node.ipv4):
                raise TopologyError(f"node {node.name}: route {route.to} of a disabled family")


def _interface(value: Any, where: str) -> IPInterface:
    try:
        interface = ipaddress.ip_interface(str(value))
    except ValueError as exc:
        raise TopologyError(f"{where}: {exc}") from None
    if "/" not in str(value):
        raise TopologyError(f"{where}: {value} needs a prefix length")
    _check_documentation(interface.network, where)
    return interface


def _address(value: Any, where: str) -> IPAddress:
    try:
        address = ipaddress.ip_address(str(value))
    except ValueError as exc:
        raise TopologyError(f"{where}: {exc}") from None
    _check_documentation(ipaddress.ip_network(address), where)
    return address


def _check_documentation(network: IPNetwork, where: str) -> None:
    if not any(
        network.version == doc.version and network.subnet_of(doc)  # type: ignore[arg-type]
        for doc in DOCUMENTATION_NETWORKS
    ):
        raise TopologyError(f"{where}: {network} is outside the documentation ranges")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TopologyError(f"{where}: expected a mapping")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise TopologyError(f"{where}: expected true or false")
    return value


def _reject_unknown(doc: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(doc) - allowed
    if unknown:
        raise TopologyError(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")
