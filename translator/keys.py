"""The unknown-key check shared by the config and policy parsers.

A typo in a YAML mapping must be an error, not a silent fall-back to a default. Each
caller passes its own error class, so config raises ConfigError and policy PolicyError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any


def check_keys(
    mapping: Mapping[Any, Any],
    known: Iterable[str],
    where: str,
    error: Callable[[str, str], Exception],
) -> None:
    """Raise ``error(path, message)`` for the first key of ``mapping`` not in ``known``.

    ``path`` is ``where.KEY``, or just ``KEY`` when ``where`` is empty (the top level).
    """
    names = tuple(known)
    for key in mapping:
        if key not in names:
            path = f"{where}.{key}" if where else str(key)
            raise error(path, f"unknown key (known: {', '.join(names)})")
