"""Lab fixtures come from netnslab.pytest_plugin (see its docstring)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("netnslab") is None:  # not pip-installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "netns-lab"))

from netnslab.pytest_plugin import *  # noqa: F403
