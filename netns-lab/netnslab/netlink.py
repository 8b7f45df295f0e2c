"""Thin, typed wrappers over pyroute2 for what the lab does to namespaces.

Everything here takes a namespace *name* and opens a short-lived netlink socket inside it
(``IPRoute(netns=...)``), so the calling process never changes its own namespace. Sysctls
live under ``/proc/sys/net`` of the namespace that *opens* the file, so they are written by
a forked pyroute2 child that joins the namespace first.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.process import ChildProcess

from netnslab.timing import Clock, poll_until

IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
NETNS_DIR = "/run/netns"


class NetlinkSetupError(RuntimeError):
    """A namespace could not be configured as asked."""


@dataclass(frozen=True)
class AddressState:
    """One address as the kernel reports it."""

    ifname: str
    address: str
    prefixlen: int
    tentative: bool
    dad_failed: bool


@dataclass(frozen=True)
class LinkState:
    """One interface as the kernel reports it."""

    ifname: str
    index: int
    kind: str
    operstate: str
    peer_index: int | None


@dataclass(frozen=True)
class RouteState:
    """One route of the main table."""

    family: int
    dst: str
    gateway: str | None
    ifname: str | None
    kind: str


def create_namespace(name: str) -> int:
    """Create a named network namespace and return its inode (its identity for checks)."""
    netns.create(name)
    inode = namespace_inode(name)
    if inode is None:
        raise NetlinkSetupError(f"namespace {name} was created but is not visible")
    return inode


def remove_namespace(name: str) -> bool:
    """Remove a named namespace. Returns False if it did not exist."""
    if name not in netns.listnetns():
        return False
    netns.remove(name)
    return True


def namespace_exists(name: str) -> bool:
    """Whether ``/run/netns/NAME`` exists."""
    return name in netns.listnetns()


def namespace_inode(name: str) -> int | None:
    """The nsfs inode behind ``/run/netns/NAME``, or None if it does not exist."""
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except FileNotFoundError:
        return None


def pids_in_namespace(inode: int) -> list[int]:
    """Every process whose network namespace is the one with this inode."""
    wanted = f"net:[{inode}]"
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == wanted:
                found.append(int(entry))
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return found


def _sysctl_child(name: str, items: list[tuple[str, str]]) -> bytes:
    # Runs in a forked child: join the namespace, then write.
    netns.setns(name, flags=0, fork=False)
    for key, value in items:
        with open("/proc/sys/" + key.replace(".", "/"), "w", encoding="ascii") as handle:
            handle.write(value)
    return b""


def _sysctl_read_child(name: str, keys: list[str]) -> bytes:
    netns.setns(name, flags=0, fork=False)
    values: list[str] = []
    for key in keys:
        try:
            with open("/proc/sys/" + key.replace(".", "/"), encoding="ascii") as handle:
                values.append(handle.read().strip())
        except OSError:
            values.append("")
    return "\n".join(values).encode("ascii")


def write_sysctls(name: str, values: Mapping[str, str | int]) -> None:
    """Write ``net.*`` sysctls (dotted keys) inside namespace ``name``."""
    items = [(key, str(value)) for key, value in values.items()]
    with ChildProcess(target=_sysctl_child, args=[name, items]) as child:
        child.communicate(timeout=10)


def read_sysctls(name: str, keys: Iterable[str]) -> dict[str, str]:
    """Read sysctls inside namespace ``name``; a missing key reads as ``""``."""
    key_list = list(keys)
    with ChildProcess(target=_sysctl_read_child, args=[name, key_list]) as child:
        data = child.get_data(timeout=10)
    return dict(zip(key_list, data.decode("ascii").split("\n"), strict=True))


def add_veth(ns_a: str, ifname_a: str, ns_b: str, ifname_b: str) -> None:
    """Create a veth pair with one end in each namespace; it never touches the host's."""
    with IPRoute(netns=ns_a) as ipr:
        ipr.link(
            "add",
            ifname=ifname_a,
            kind="veth",
            peer={"ifname": ifname_b, "net_ns_fd": ns_b},
        )


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetlinkSetupError(f"no interface {ifname}")
    return int(found[0])


def configure_interface(
    name: str,
    ifname: str,
    addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
) -> None:
    """Add addresses to an interface (idempotently) and bring it up."""
    with IPRoute(netns=name) as ipr:
        index = _index(ipr, ifname)
        for address in addresses:
            try:
                ipr.addr(
                    "add",
                    index=index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                )
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        ipr.link("set", index=index, state="up")


def set_link_state(name: str, ifname: str, up: bool) -> None:
    """Set an interface up or down."""
    with IPRoute(netns=name) as ipr:
        ipr.link("set", index=_index(ipr, ifname), state="up" if up else "down")


def replace_route(name: str, dst: str, gateway: str) -> None:
    """Add or replace a route ``dst`` (CIDR) via ``gateway``."""
    with IPRoute(netns=name) as ipr:
        ipr.route("replace", dst=dst, gateway=gateway)


def delete_route(name: str, dst: str) -> bool:
    """Delete the route to ``dst`` (CIDR). Returns False if there was none."""
    with IPRoute(netns=name) as ipr:
        try:
            ipr.route("del", dst=dst)
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise
    return True


def list_links(name: str) -> list[LinkState]:
    """Interfaces in namespace ``name``."""
    with IPRoute(netns=name) as ipr:
        result: list[LinkState] = []
        for msg in ipr.get_links():
            info = msg.get("IFLA_LINKINFO")
            kind = info.get("IFLA_INFO_KIND") if info is not None else None
            link = msg.get("IFLA_LINK")
            result.append(
                LinkState(
                    ifname=str(msg.get("IFLA_IFNAME")),
                    index=int(msg["index"]),
                    kind=str(kind or ("loopback" if msg.get("IFLA_IFNAME") == "lo" else "?")),
                    operstate=str(msg.get("IFLA_OPERSTATE")),
                    peer_index=int(link) if link else None,
                )
            )
        return result


def list_addresses(name: str) -> list[AddressState]:
    """Addresses in namespace ``name`` (both families, link-local included)."""
    with IPRoute(netns=name) as ipr:
        names = {int(m["index"]): str(m.get("IFLA_IFNAME")) for m in ipr.get_links()}
        result: list[AddressState] = []
        for msg in ipr.get_addr():
            flags = _address_flags(msg)
            result.append(
                AddressState(
                    ifname=names.get(int(msg["index"]), "?"),
                    address=str(msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL")),
                    prefixlen=int(msg["prefixlen"]),
                    tentative=bool(flags & IFA_F_TENTATIVE),
                    dad_failed=bool(flags & IFA_F_DADFAILED),
                )
            )
        return result


def list_routes(name: str) -> list[RouteState]:
    """Routes of the main table in namespace ``name``, both families."""
    with IPRoute(netns=name) as ipr:
        names = {int(m["index"]): str(m.get("IFLA_IFNAME")) for m in ipr.get_links()}
        result: list[RouteState] = []
        for msg in ipr.get_routes(table=254):
            dst = msg.get("RTA_DST")
            family = int(msg["family"])
            oif = msg.get("RTA_OIF")
            kinds = {1: "unicast", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
            dst_text = "default" if dst is None else f"{dst}/{msg['dst_len']}"
            result.append(
                RouteState(
                    family=4 if family == 2 else 6,
                    dst=dst_text,
                    gateway=msg.get("RTA_GATEWAY"),
                    ifname=names.get(int(oif)) if oif is not None else None,
                    kind=kinds.get(int(msg["type"]), str(msg["type"])),
                )
            )
        return result


def _address_flags(msg: Any) -> int:
    # IFA_FLAGS (32 bit) supersedes the 8-bit header field when present.
    extended = msg.get("IFA_FLAGS")
    return int(extended if extended is not None else msg["flags"])


def wait_addresses_usable(
    name: str,
    wanted: Iterable[str],
    *,
    timeout: float = 10.0,
    clock: Clock | None = None,
    sleep: Callable[[float], None] | None = None,
) -> None:
    """Poll until every address in ``wanted`` is present and past duplicate address detection.

    Raises `NetlinkSetupError` if DAD failed or the addresses are not usable in time.
    """
    wanted_set = {str(ipaddress.ip_address(a)) for a in wanted}

    def pending() -> set[str]:
        usable: set[str] = set()
        for state in list_addresses(name):
            if state.dad_failed:
                raise NetlinkSetupError(f"{name}: duplicate address detection failed on {state}")
            if not state.tentative:
                usable.add(str(ipaddress.ip_address(state.address)))
        return wanted_set - usable

    if not poll_until(lambda: not pending(), timeout=timeout, clock=clock, sleep=sleep):
        raise NetlinkSetupError(f"{name}: addresses not usable after {timeout}s: {pending()}")


def wait_links_up(
    name: str,
    ifnames: Iterable[str],
    *,
    timeout: float = 10.0,
    clock: Clock | None = None,
    sleep: Callable[[float], None] | None = None,
) -> None:
    """Poll until every named interface reports operstate UP (carrier on both veth ends)."""
    wanted = set(ifnames)

    def down() -> set[str]:
        up = {link.ifname for link in list_links(name) if link.operstate == "UP"}
        return wanted - up

    if not poll_until(lambda: not down(), timeout=timeout, clock=clock, sleep=sleep):
        raise NetlinkSetupError(f"{name}: interfaces not up after {timeout}s: {down()}")
