"""Services a topology can run in its nodes: how to start each, and how to tell it is ready.

Kinds:

``dnsmasq``
    A DNS server for the lab zone. Keys: ``listen`` (addresses), ``domain`` (answered
    locally, NXDOMAIN for unknown names), ``hosts`` (name -> addresses: A/AAAA records),
    ``ptr`` (address -> name), ``wildcard`` (domain -> addresses, for it and every
    subdomain).
``socks64``
    The gateway. Keys: ``listen`` ("HOST:PORT", IPv6 in brackets), ``config`` (merged into
    the gateway's YAML config, schema as ``config/socks64.yaml``).
``testserver``
    `netnslab.testserver`: ``http`` and ``stream`` listen addresses ("HOST:PORT"), and
    ``udp`` for a UDP echo.

Readiness is checked from inside the node through a socket created in its namespace, so
the check sees exactly what a lab client would see.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pyroute2 import netns

from netnslab.topology import Service, TopologyError

REPO_ROOT = Path(__file__).resolve().parents[2]
LAB_PACKAGE_ROOT = Path(__file__).resolve().parents[1]

REVERSE_ZONES = (
    "2.0.192.in-addr.arpa",
    "100.51.198.in-addr.arpa",
    "113.0.203.in-addr.arpa",
    "8.b.d.0.1.0.0.2.ip6.arpa",
)


def child_environment() -> dict[str, str]:
    """Environment for Python processes in the lab: they import translator and netnslab."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(LAB_PACKAGE_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def split_endpoint(text: str) -> tuple[str, int]:
    """``"192.0.2.1:1080"`` or ``"[2001:db8::1]:1080"`` -> (host, port)."""
    text = str(text)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise TopologyError(f"endpoint {text!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise TopologyError(f"endpoint {text!r}: expected ADDRESS:PORT or [ADDRESS]:PORT")
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError as exc:
        raise TopologyError(f"endpoint {text!r}: {exc}") from None
    if not 0 < port < 65536:
        raise TopologyError(f"endpoint {text!r}: port out of range")
    return host, port


def _listen_list(service: Service, key: str = "listen") -> list[str]:
    value = service.options.get(key) or []
    if not isinstance(value, list):
        raise TopologyError(f"service {service.name}: {key} must be a list")
    return [str(v) for v in value]


def reverse_name(address: str) -> str:
    """The in-addr.arpa / ip6.arpa name of an address."""
    return ipaddress.ip_address(address).reverse_pointer


def dnsmasq_argv(service: Service, state_dir: Path) -> list[str]:
    """The dnsmasq command line for a ``dnsmasq`` service: local zone only, never upstream."""
    opts = service.options
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--conf-file=/dev/null",
        "--bind-interfaces",
        "--log-facility=-",
        "--log-queries",
        "--domain-needed",
        f"--pid-file={state_dir / (service.name + '.pid')}",
    ]
    for address in _listen_list(service):
        ipaddress.ip_address(address)
        argv.append(f"--listen-address={address}")
    domain = opts.get("domain")
    if domain:
        argv.append(f"--local=/{domain}/")
    argv.extend(f"--local=/{zone}/" for zone in REVERSE_ZONES)
    for name, addresses in (opts.get("hosts") or {}).items():
        literal = [str(ipaddress.ip_address(str(a))) for a in addresses]
        argv.append(f"--host-record={name},{','.join(literal)}")
    for address, name in (opts.get("ptr") or {}).items():
        argv.append(f"--ptr-record={reverse_name(str(address))},{name}")
    for wildcard, addresses in (opts.get("wildcard") or {}).items():
        for address in addresses:
            argv.append(f"--address=/{wildcard}/{ipaddress.ip_address(str(address))}")
    return argv


def gateway_config(service: Service) -> dict[str, Any]:
    """The YAML document given to ``socks64 serve --config`` for a ``socks64`` service."""
    config = dict(service.options.get("config") or {})
    config["listen"] = _listen_list(service)
    return config


def gateway_argv(service: Service, config_path: Path) -> list[str]:
    """The gateway command line; ``command`` in the service overrides the program part."""
    command = service.options.get("command")
    program = (
        [str(c) for c in command]
        if command
        else [sys.executable, "-m", "translator.cli", "serve", "--config", str(config_path)]
    )
    argv = list(program)
    for endpoint in _listen_list(service):
        argv.extend(["--listen", endpoint])
    return argv


def write_gateway_config(service: Service, state_dir: Path) -> Path:
    """Write the gateway's config file into the lab's state directory and return its path."""
    path = state_dir / f"{service.name}.yaml"
    config = gateway_config(service)
    transparent = config.get("transparent")
    if isinstance(transparent, dict) and "state_file" not in transparent:
        # the lab's own directory, removed with the lab (never /var/lib of the host)
        config["transparent"] = {
            **transparent,
            "state_file": str(state_dir / f"{service.name}.transparent.state"),
        }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def testserver_argv(service: Service, node: str) -> list[str]:
    """The command line of `netnslab.testserver` for a ``testserver`` service."""
    argv = [sys.executable, "-m", "netnslab.testserver", "--name", node]
    for endpoint in _listen_list(service, "http"):
        argv.extend(["--http", endpoint])
    for endpoint in _listen_list(service, "stream"):
        argv.extend(["--stream", endpoint])
    for endpoint in _listen_list(service, "udp"):
        argv.extend(["--udp", endpoint])
    return argv


def service_argv(service: Service, node: str, state_dir: Path) -> list[str]:
    """Command line for any service kind (writes the gateway config as a side effect)."""
    if service.kind == "dnsmasq":
        return dnsmasq_argv(service, state_dir)
    if service.kind == "socks64":
        return gateway_argv(service, write_gateway_config(service, state_dir))
    if service.kind == "testserver":
        return testserver_argv(service, node)
    raise TopologyError(f"unknown service kind {service.kind}")


# --- readiness -------------------------------------------------------------------------


def _socket_in(namespace: str, family: int, kind: int) -> socket.socket:
    # flags=0: never create the namespace as a side effect of a probe.
    sock: socket.socket = netns.create_socket(namespace, family, kind, flags=0)
    return sock


def _probe_target(host: str) -> tuple[str, int]:
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        return ("::1" if address.version == 6 else "127.0.0.1"), address.version
    return host, address.version


def tcp_answers(namespace: str, endpoint: str, greeting: bytes = b"", expect: bytes = b"") -> bool:
    """Whether a TCP connect to ``endpoint`` from inside ``namespace`` succeeds.

    With ``greeting``, also send it and require the reply to start with ``expect``.
    """
    host, port = split_endpoint(endpoint)
    target, version = _probe_target(host)
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    sock = _socket_in(namespace, family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(1.0)
        try:
            sock.connect((target, port))
            if greeting:
                sock.sendall(greeting)
                reply = sock.recv(len(expect) or 1)
                return reply.startswith(expect)
        except OSError:
            return False
    return True


def udp_echo_answers(namespace: str, endpoint: str) -> bool:
    """Whether the UDP echo at ``endpoint`` answers a datagram sent from inside ``namespace``."""
    host, port = split_endpoint(endpoint)
    target, version = _probe_target(host)
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    token = secrets.token_hex(4).encode()
    sock = _socket_in(namespace, family, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(0.5)
        try:
            sock.sendto(token, (target, port))
            reply = sock.recv(512)
        except OSError:
            return False
    return reply.endswith(b"\n" + token)


def dns_query_packet(name: str, qtype: int, query_id: int) -> bytes:
    """A minimal recursive-desired DNS query for ``name``."""
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(
        bytes([len(part)]) + part.encode("ascii") for part in name.rstrip(".").split(".")
    )
    return header + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def dns_answers(namespace: str, server: str, name: str) -> bool:
    """Whether the DNS server at ``server`` answers a query from inside ``namespace``."""
    address = ipaddress.ip_address(server)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    query_id = secrets.randbelow(0xFFFF)
    sock = _socket_in(namespace, family, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(0.5)
        try:
            sock.sendto(dns_query_packet(name, 1, query_id), (server, 53))
            reply = sock.recv(512)
        except OSError:
            return False
    return len(reply) >= 12 and struct.unpack("!H", reply[:2])[0] == query_id


def service_ready(namespace: str, service: Service) -> bool:
    """One readiness check for a started service."""
    if service.kind == "dnsmasq":
        domain = str(service.options.get("domain") or "lab.test")
        return all(dns_answers(namespace, a, domain) for a in _listen_list(service))
    if service.kind == "socks64":
        # A SOCKS5 greeting offering "no authentication": any method choice means it is up.
        return all(
            tcp_answers(namespace, endpoint, b"\x05\x01\x00", b"\x05")
            for endpoint in _listen_list(service)
        )
    if service.kind == "testserver":
        endpoints = _listen_list(service, "http") + _listen_list(service, "stream")
        return all(tcp_answers(namespace, endpoint) for endpoint in endpoints) and all(
            udp_echo_answers(namespace, endpoint) for endpoint in _listen_list(service, "udp")
        )
    return True


def describe_options(options: Mapping[str, Any]) -> str:
    """A one-line summary of a service's listen addresses for status output."""
    parts: list[str] = []
    for key in ("listen", "http", "stream", "udp"):
        values = options.get(key)
        if values:
            parts.append(f"{key} {' '.join(str(v) for v in values)}")
    return "; ".join(parts)
