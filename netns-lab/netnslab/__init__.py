"""socks64's network-namespace lab: topologies, a builder on pyroute2, scenarios, a CLI.

Public entry points: `Lab` (build / attach / tear down), `load_topology`, and
`netnslab.cli.main` (``socks64 lab ...``).

The names below are imported lazily: probes and test servers run ``python -m netnslab.X``
inside namespaces, and should not pay for importing pyroute2 at every start.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Lab": "netnslab.lab",
    "LabError": "netnslab.lab",
    "TeardownReport": "netnslab.lab",
    "teardown_all": "netnslab.lab",
    "Topology": "netnslab.topology",
    "TopologyError": "netnslab.topology",
    "load_topology": "netnslab.topology",
    "parse_topology": "netnslab.topology",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'netnslab' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
