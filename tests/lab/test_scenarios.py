"""Every lab scenario, as a user would see it, against the session's labs."""

from __future__ import annotations

import pytest
from netnslab.lab import Lab
from netnslab.pytest_plugin import run_lab_scenario
from netnslab.scenarios import SCENARIOS

pytestmark = pytest.mark.lab

DEFAULT = [name for name, s in SCENARIOS.items() if s.topology == "default"]
CHAIN = [name for name, s in SCENARIOS.items() if s.topology == "chain"]


@pytest.mark.parametrize("name", DEFAULT)
def test_default_topology(lab: Lab, name: str) -> None:
    run_lab_scenario(lab, name)


@pytest.mark.parametrize("name", CHAIN)
def test_chain_topology(chain_lab: Lab, name: str) -> None:
    run_lab_scenario(chain_lab, name)
