"""The kernel objects that steer fake-IP traffic into the gateway's TPROXY listeners.

Three objects, all owned by the gateway and removed by name at stop (and, after a crash, at
the next start): (1) the nftables table ``inet socks64``, whose *prerouting* chain (filter,
priority mangle) takes TCP and UDP that arrive on the client-facing interfaces for a pool
address and assigns them to the listener on ``127.0.0.1:PORT`` with ``tproxy``, marking them
with the fwmark; packets of established transparent TCP sockets take the ``socket
transparent`` shortcut (TCP only, so every UDP datagram reaches the listener, never a reply
socket bound to a pool address). Whatever no listener takes is answered rather than dropped
silently: TCP with a reset, everything else (UDP, ICMP echo, other protocols) with ICMP
host-unreachable. Its *output* chain (nat, priority -100) REDIRECTs TCP that apps on the
gateway host itself open to a pool address to the same port; UDP from local apps is not
intercepted (REDIRECT would lose the per-datagram original destination). (2) The policy
rule ``fwmark FWMARK lookup ROUTE_TABLE`` and (3) the route ``local POOL dev lo`` in that
table make marked packets local deliveries instead of forwarded ones, so IP forwarding stays
off. Local apps need an ordinary route towards the pool (normally the default route) for
REDIRECT to see their packets. No sysctl, no other table, rule or route is touched, and
nothing is flushed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import string
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

RTN_LOCAL = 2
RT_SCOPE_NOWHERE = 255
RESERVED_TABLES = frozenset({0, 253, 254, 255})  # unspec, default, main, local
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_IFNAME_FORBIDDEN = set('/:"\\*') | set(string.whitespace)
NFT_TIMEOUT = 30.0


class InterceptionError(RuntimeError):
    """Installing or removing the interception failed (the message says why)."""


@dataclass(frozen=True)
class InterceptPlan:
    """What to intercept and where to deliver it (see the module docstring)."""

    pool: IPv4Network
    interfaces: tuple[str, ...]  # client-facing interfaces (iifname match)
    port: int  # the TPROXY listeners' port (TCP and UDP, both on 127.0.0.1)
    fwmark: int
    route_table: int
    rule_priority: int = 16400
    table: str = "socks64"  # nft table name, family inet

    def __post_init__(self) -> None:
        if not isinstance(self.pool, IPv4Network):
            raise ValueError(f"pool must be an IPv4Network, not {self.pool!r}")
        for name in self.interfaces:
            if not _valid_ifname(name):
                raise ValueError(f"invalid interface name {name!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range 1-65535")
        if not 1 <= self.fwmark <= 0xFFFFFFFF:
            raise ValueError(f"fwmark {self.fwmark:#x} out of range 0x1-0xffffffff")
        if not 1 <= self.route_table <= 0xFFFFFFFF or self.route_table in RESERVED_TABLES:
            raise ValueError(f"route table {self.route_table} is reserved or out of range")
        if not 1 <= self.rule_priority <= 32764:  # and rule_priority + 1 for the second rule
            raise ValueError(f"rule priority {self.rule_priority} out of range 1-32764")
        if not _TABLE_NAME.fullmatch(self.table):
            raise ValueError(f"invalid nft table name {self.table!r}")

    @property
    def table_text(self) -> str:
        return f"nft table inet {self.table}"

    @property
    def rule_text(self) -> str:
        return (
            f"ip rule priority {self.rule_priority} fwmark {self.fwmark:#x} "
            f"lookup {self.route_table}"
        )

    @property
    def local_rule_text(self) -> str:
        return (
            f"ip rule priority {self.rule_priority + 1} to {self.pool} iif lo "
            f"lookup {self.route_table}"
        )

    @property
    def route_text(self) -> str:
        return f"ip route local {self.pool} dev lo table {self.route_table} src 127.0.0.1"


def _valid_ifname(name: str) -> bool:
    # Linux rules (1-15 octets, no '/', ':' or blanks) plus what must not reach nft's quoted
    # string; a trailing '*' is nft's interface-name wildcard.
    stem = name[:-1] if name.endswith("*") else name
    if not stem or len(name) > 15 or not (name.isascii() and name.isprintable()):
        return False
    return not _IFNAME_FORBIDDEN.intersection(stem) and stem not in (".", "..")


def render_ruleset(plan: InterceptPlan) -> str:
    """The text for ``nft -f``: create-or-replace the table in one transaction."""
    pool, port, mark, name = plan.pool, plan.port, f"{plan.fwmark:#x}", plan.table
    lines = [
        f"add table inet {name}",
        f"delete table inet {name}",
        f"table inet {name} {{",
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority mangle; policy accept;",
    ]
    if plan.interfaces:
        match = "iifname {{ {} }} ip daddr {}".format(
            ", ".join(f'"{i}"' for i in plan.interfaces), pool
        )
        lines += [
            f"\t\t{match} meta l4proto tcp socket transparent 1 socket wildcard 0"
            f" meta mark set {mark} accept",
            f"\t\t{match} meta l4proto {{ tcp, udp }} tproxy ip to 127.0.0.1:{port}"
            f" meta mark set {mark} accept",
            f"\t\t{match} meta l4proto tcp reject with tcp reset",
            f"\t\t{match} reject with icmp type host-unreachable",
        ]
    lines += [
        "\t}",
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        f"\t\tip daddr {pool} meta l4proto tcp redirect to :{port}",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nft_binary() -> str:
    """Path of the ``nft`` program; InterceptionError if it is not installed."""
    found = shutil.which("nft")
    if found:
        return found
    for candidate in ("/usr/sbin/nft", "/sbin/nft"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise InterceptionError("nft (nftables) is not installed: not in PATH nor /usr/sbin")


def _nft(args: list[str], stdin: str | None = None) -> str:
    argv = [nft_binary(), *args]
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise InterceptionError(f"could not run {' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        hint = " (needs root or CAP_NET_ADMIN)" if "not permitted" in detail.lower() else ""
        raise InterceptionError(f"{' '.join(argv)} failed{hint}: {detail}")
    return done.stdout


def _have_nft() -> bool:
    # Without nft installed there can be no table of ours (it was made with nft).
    try:
        nft_binary()
    except InterceptionError:
        return False
    return True


def _table_present(plan: InterceptPlan) -> bool:
    listing = _nft(["list", "tables", "inet"])
    return f"table inet {plan.table}" in (line.strip() for line in listing.splitlines())


def _delete_table(plan: InterceptPlan) -> None:
    # "add" first makes the delete succeed whether or not the table is there.
    _nft(["-f", "-"], f"add table inet {plan.table}\ndelete table inet {plan.table}\n")


@contextmanager
def _iproute() -> Iterator[IPRoute]:
    try:
        ipr = IPRoute()
    except (OSError, NetlinkError) as exc:
        raise InterceptionError(f"cannot open a netlink socket: {exc}") from exc
    try:
        yield ipr
    finally:
        ipr.close()


def _netlink_error(what: str, exc: Exception) -> InterceptionError:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    hint = " (needs root or CAP_NET_ADMIN)" if code == errno.EPERM else ""
    return InterceptionError(f"{what} failed{hint}: {exc}")


def _rule_specs(plan: InterceptPlan) -> list[tuple[str, dict[str, Any]]]:
    """Our two rules: intercepted packets (marked by the TPROXY rule) and packets programs
    on this host send to the pool, which need a route before the output REDIRECT sees
    them (an edge router with an IPv6-only uplink has no IPv4 default route)."""
    base: dict[str, Any] = {"family": socket.AF_INET, "table": plan.route_table}
    return [
        (plan.rule_text, {**base, "fwmark": plan.fwmark, "priority": plan.rule_priority}),
        (
            plan.local_rule_text,
            {
                **base,
                "dst": str(plan.pool.network_address),
                "dst_len": plan.pool.prefixlen,
                "iifname": "lo",
                "priority": plan.rule_priority + 1,
            },
        ),
    ]


def _is_rule(msg: Any, args: dict[str, Any]) -> bool:
    table = msg.get("FRA_TABLE") or msg["table"]
    if table != args["table"] or (msg.get("FRA_PRIORITY") or 0) != args["priority"]:
        return False
    if "fwmark" in args:
        return bool(msg.get("FRA_FWMARK") == args["fwmark"])
    return bool(
        msg.get("FRA_DST") == args["dst"]
        and msg["dst_len"] == args["dst_len"]
        and msg.get("FRA_IIFNAME") == "lo"
    )


def _our_rules(ipr: IPRoute, plan: InterceptPlan) -> list[str]:
    """The text of each of our rules present now (a rule twice: twice)."""
    messages = list(ipr.get_rules(family=socket.AF_INET))
    return [text for text, args in _rule_specs(plan) for msg in messages if _is_rule(msg, args)]


def _our_routes(ipr: IPRoute, plan: InterceptPlan) -> int:
    count = 0
    for msg in ipr.get_routes(family=socket.AF_INET, table=plan.route_table):
        table = msg.get("RTA_TABLE") or msg["table"]
        if (
            table == plan.route_table
            and msg["type"] == RTN_LOCAL
            and msg.get("RTA_DST") == str(plan.pool.network_address)
            and msg["dst_len"] == plan.pool.prefixlen
        ):
            count += 1
    return count


def _delete_rules(ipr: IPRoute, plan: InterceptPlan) -> list[str]:
    removed: list[str] = []
    present = _our_rules(ipr, plan)
    for text, args in _rule_specs(plan):
        for _ in range(present.count(text)):
            try:
                ipr.rule("del", **args)
            except NetlinkError as exc:
                if exc.code in (errno.ENOENT, errno.ESRCH):
                    break
                raise _netlink_error(f"deleting {text}", exc) from exc
            removed.append(text)
    return removed


def _delete_routes(ipr: IPRoute, plan: InterceptPlan) -> int:
    removed = 0
    for _ in range(_our_routes(ipr, plan)):
        try:
            ipr.route(
                "del",
                family=socket.AF_INET,
                dst=str(plan.pool),
                type="local",
                table=plan.route_table,
                scope=RT_SCOPE_NOWHERE,  # any scope, like iproute2's "ip route del"
            )
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH):
                break
            raise _netlink_error(f"deleting {plan.route_text}", exc) from exc
        removed += 1
    return removed


def leftovers(plan: InterceptPlan) -> list[str]:
    """Which of the plan's objects exist now (a table, rules, routes), as readable strings."""
    found: list[str] = []
    if _have_nft() and _table_present(plan):
        found.append(plan.table_text)
    with _iproute() as ipr:
        try:
            found += _our_rules(ipr, plan)
            found += [plan.route_text] * _our_routes(ipr, plan)
        except NetlinkError as exc:
            raise _netlink_error("listing rules and routes", exc) from exc
    return found


class Interception:
    """Installs and removes one plan's objects; blocking (run it in an executor)."""

    def __init__(self, plan: InterceptPlan) -> None:
        self.plan = plan

    def install(self) -> list[str]:
        """Remove leftovers of an earlier run, then install; returns the leftovers removed.

        On failure whatever this call added is removed again and InterceptionError raised.
        """
        plan = self.plan
        removed = self.remove()  # the caller logs them, once
        ruleset = render_ruleset(plan)
        nft_binary()  # a clear error before anything is added
        table_added = rule_added = False
        try:
            _nft(["-f", "-"], ruleset)
            table_added = True
            with _iproute() as ipr:
                for text, args in _rule_specs(plan):
                    try:
                        ipr.rule("add", **args)
                    except NetlinkError as exc:
                        raise _netlink_error(f"adding {text}", exc) from exc
                    rule_added = True
                try:
                    lo = ipr.link_lookup(ifname="lo")
                    if not lo:
                        raise InterceptionError("no loopback interface")
                    ipr.route(
                        "add",
                        family=socket.AF_INET,
                        dst=str(plan.pool),
                        type="local",
                        table=plan.route_table,
                        oif=lo[0],
                        scope="host",
                        # a local connect() takes the route's source; the pool address
                        # itself is on no interface, and as a source it would fail
                        prefsrc="127.0.0.1",
                    )
                except NetlinkError as exc:
                    raise _netlink_error(f"adding {plan.route_text}", exc) from exc
        except InterceptionError:
            self._undo(table_added, rule_added)
            raise
        log.info(
            "installed %s, %s, %s, %s",
            plan.table_text,
            plan.rule_text,
            plan.local_rule_text,
            plan.route_text,
        )
        return removed

    def _undo(self, table_added: bool, rule_added: bool) -> None:
        plan = self.plan
        try:
            if rule_added:
                with _iproute() as ipr:
                    _delete_rules(ipr, plan)
            if table_added:
                _delete_table(plan)
        except InterceptionError as exc:
            log.warning("could not undo a failed install completely: %s", exc)

    def remove(self) -> list[str]:
        """Remove the table, the rule and the route of this plan, only those; idempotent.

        Returns what was removed. Missing objects are not an error; without nft installed
        there can be no table of ours, so only the rule and the route are looked at.
        """
        plan = self.plan
        removed: list[str] = []
        if _have_nft() and _table_present(plan):
            _delete_table(plan)
            removed.append(plan.table_text)
        with _iproute() as ipr:
            try:
                removed += _delete_rules(ipr, plan)
                removed += [plan.route_text] * _delete_routes(ipr, plan)
            except NetlinkError as exc:
                raise _netlink_error("listing rules and routes", exc) from exc
        return removed
