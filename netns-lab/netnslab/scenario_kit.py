"""What the scenario modules share: the registry, the two directions across gw, helpers.

A scenario is a function ``(lab) -> str`` registered with `scenario`; it returns a short
note on success and raises `ScenarioFailure` (via `check`) on failure. A scenario that is
the same in both directions across the gateway (a v4-only client to a v6-only server, and
back) is written once as ``(lab, way) -> str`` and registered per `Direction` with
`directed`. `netnslab.scenarios` imports every scenario module and runs them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from netnslab.driver import expect_ok, gateway_endpoint, run_probe
from netnslab.lab import Lab

GATEWAY = "gw/gateway"
PREF_IPV4, PREF_DOMAIN, PREF_IPV6, PREF_ID = 0x01, 0x03, 0x04, 0x08
REP_NETWORK_UNREACHABLE, REP_HOST_UNREACHABLE, REP_REFUSED, REP_TTL_EXPIRED = 3, 4, 5, 6


@dataclass(frozen=True)
class Direction:
    """One way across gw: a single-stack client reaching a server of the other family."""

    client: str  # the client's node
    server: str  # the server's node
    name: str  # the server's name in the lab zone (only the server's family resolves)
    client_version: int  # the client's only IP version
    server_version: int  # the server's only IP version
    group: str  # the multicast group the server sends to on its link to gw

    @property
    def hello(self) -> str:
        """What the server's HTTP test page says."""
        return f"hello from {self.server}"

    @property
    def record(self) -> str:
        """The DNS record type that holds the server's address."""
        return "AAAA" if self.server_version == 6 else "A"

    @property
    def pref(self) -> int:
        """The ADR.PREF that asks for the server's family."""
        return PREF_IPV6 if self.server_version == 6 else PREF_IPV4

    def fill(self, template: str) -> str:
        """``template`` with ``{client}``, ``{name}``, ``{record}``... filled in."""
        return template.format(**asdict(self), hello=self.hello, record=self.record)


# The groups are in the only group ranges the lab may use.
V4_TO_V6 = Direction("c4", "s6", "v6.lab.test", 4, 6, "ff15::5:64")
V6_TO_V4 = Direction("c6", "s4", "v4.lab.test", 6, 4, "239.64.0.1")


@dataclass(frozen=True)
class Scenario:
    """A registered scenario."""

    name: str
    topology: str
    summary: str
    func: Callable[[Lab], str]


SCENARIOS: dict[str, Scenario] = {}

Body = Callable[[Lab], str]
DirectedBody = Callable[[Lab, Direction], str]


def _summary(func: Callable[..., str], fallback: str) -> str:
    """The first paragraph of ``func``'s docstring, on one line."""
    paragraph = inspect.getdoc(func) or fallback
    return " ".join(paragraph.split("\n\n")[0].split())


def scenario(name: str, topology: str = "default") -> Callable[[Body], Body]:
    """Register a scenario under ``name`` for ``topology``; its docstring's first paragraph
    is its summary."""

    def register(func: Body) -> Body:
        SCENARIOS[name] = Scenario(name, topology, _summary(func, name), func)
        return func

    return register


def directed(
    *ways: tuple[str, Direction], topology: str = "default"
) -> Callable[[DirectedBody], DirectedBody]:
    """Register a ``(lab, way)`` scenario once per ``(name, way)``, in the order given.

    The docstring's first paragraph, filled in by `Direction.fill`, is each one's summary.
    """

    def register(func: DirectedBody) -> DirectedBody:
        for name, way in ways:

            def bound(lab: Lab, way: Direction = way) -> str:
                return func(lab, way)

            summary = way.fill(_summary(func, name))
            SCENARIOS[name] = Scenario(name, topology, summary, bound)
        return func

    return register


def body_of(result: dict[str, Any], key: str = "body") -> str:
    """The HTTP body (or another text field) a probe reported."""
    return str(result.get(key, ""))


def proxy(lab: Lab, client: str) -> str:
    """The gateway endpoint ``client`` uses."""
    return gateway_endpoint(lab, client)


def endpoint_text(address: str, port: int) -> str:
    """HOST:PORT, with an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def ask(
    lab: Lab, client: str, action: str, what: str, timeout: float = 20.0, **options: object
) -> dict[str, Any]:
    """Run a probe action in ``client`` through its gateway; fail naming ``what`` on error.

    ``options`` become probe flags: ``dest="x"`` -> ``--dest x``, ``multi=True`` -> ``--multi``.
    """
    args = ["--proxy", proxy(lab, client)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return expect_ok(run_probe(lab, client, action, *args, timeout=timeout), what)


def associate_one(lab: Lab, client: str, target: str, pref: int, what: str) -> dict[str, Any]:
    """ADDRESS ASSOCIATE ``target`` with ADR.PREF ``pref`` from ``client``: the one result."""
    result = ask(lab, client, "associate", what, pref=pref, targets=target)
    return dict(result["results"][0])


def gw_address_toward(lab: Lab, node: str, version: int) -> str:
    """gw's own address on the segment it shares with ``node``."""
    link = lab.topology.link_between("gw", node)
    return next(str(a.ip) for a in link.end("gw").addresses if a.version == version)
