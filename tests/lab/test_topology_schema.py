"""The topology files and their validation (pure: no root, no namespaces)."""

from __future__ import annotations

import os
from ipaddress import ip_address
from typing import Any

import pytest
import yaml
from netnslab import pytest_plugin
from netnslab.scenarios import SCENARIOS, scenarios_for
from netnslab.services import dnsmasq_argv, gateway_argv, split_endpoint
from netnslab.topology import TopologyError, find_topology, load_topology, parse_topology


def _doc(name: str) -> Any:
    return yaml.safe_load(find_topology(name).read_text(encoding="utf-8"))


def test_default_topology_has_the_issue_nodes() -> None:
    topo = load_topology("default")
    assert set(topo.nodes) == {"c4", "c6", "gw", "s4", "s6", "dns"}
    assert not topo.nodes["c4"].ipv6 and not topo.nodes["s4"].ipv6
    assert topo.addresses("c6", 4) == [] and topo.addresses("s6", 4) == []
    assert not topo.nodes["gw"].forwarding
    assert {link.end("gw").ifname for link in topo.links_of("gw")} == {
        "v-c4",
        "v-c6",
        "v-s4",
        "v-s6",
        "v-dns",
    }


def test_every_scenario_belongs_to_a_bundled_topology() -> None:
    covered = {s.name for name in ("default", "chain") for s in scenarios_for(load_topology(name))}
    assert covered == set(SCENARIOS)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        # Not a documentation range (shared address space, RFC 6598): refused.
        (("links", 0, "c4"), ["100.64.0.1/24"], "outside the documentation ranges"),
        (("links", 0, "c4"), ["192.0.2.10"], "needs a prefix length"),
        (("nodes", "c4", "colour"), "blue", "unknown keys colour"),
        (("nodes", "c4", "routes"), [{"to": "default", "via": "2001:db8:c6::1"}], "disabled"),
        (("nodes", "gw", "services"), [{"kind": "squid"}], "kind must be one of"),
        (("nodes", "c4", "routes"), [{"to": "100.64.0.0/10", "via": "192.0.2.1"}], "outside"),
    ],
)
def test_invalid_topologies_are_rejected(path: tuple[Any, ...], value: Any, message: str) -> None:
    doc = _doc("default")
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(TopologyError, match=message):
        parse_topology(doc)


def test_long_node_names_are_rejected_so_interface_names_fit() -> None:
    doc = _doc("default")
    doc["nodes"]["averyverylongname"] = {}
    with pytest.raises(TopologyError, match="node name"):
        parse_topology(doc)


def test_unknown_topology_names_the_known_ones() -> None:
    with pytest.raises(TopologyError, match="chain, default"):
        find_topology("nonesuch")


def test_dnsmasq_never_forwards_and_serves_the_zone(tmp_path: Any) -> None:
    dns = load_topology("default").nodes["dns"].services[0]
    argv = dnsmasq_argv(dns, tmp_path)
    assert "--no-resolv" in argv and "--no-hosts" in argv and "--conf-file=/dev/null" in argv
    assert "--host-record=v6.lab.test,2001:db8:5e6::10" in argv
    reverse = ip_address("198.51.100.10").reverse_pointer
    assert f"--ptr-record={reverse},v4.lab.test" in argv
    assert "--local=/lab.test/" in argv


def test_gateway_command_listens_where_the_topology_says(tmp_path: Any) -> None:
    gateway = load_topology("default").nodes["gw"].services[0]
    argv = gateway_argv(gateway, tmp_path / "gw.yaml")
    assert argv[-6:] == [
        "--listen",
        "192.0.2.1:1080",
        "--listen",
        "[2001:db8:c6::1]:1080",
        "--listen",
        "192.0.2.2:1080",  # the address the udp-address-removed scenario takes away
    ]
    assert split_endpoint("[2001:db8:c6::1]:1080") == ("2001:db8:c6::1", 1080)


def test_require_lab_fails_under_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="cannot run under CI: the lab needs root"):
        pytest_plugin.require_lab()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        pytest_plugin.require_lab()
