"""The ``auth.gssapi`` config section (RFC 1961): where the keys are, whose they are,
and which per-message protection the gateway agrees to.

Parsed here, next to what uses it, and embedded in :class:`translator.config.AuthConfig`.
Whether the keytab holds a usable key is checked when the gateway starts (and on reload),
where the Kerberos library can answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from translator.keys import check_keys
from translator.wire.gssapi import MAX_TOKEN, ProtectionLevel

#: config names of the levels a gateway may agree to; SELECTIVE (3) is never offered
PROTECTION_NAMES = {
    "none": ProtectionLevel.NONE,
    "integrity": ProtectionLevel.INTEGRITY,
    "confidentiality": ProtectionLevel.CONFIDENTIALITY,
}
DEFAULT_SERVICE = "rcmd"  # what curl and Dante ask for unless told otherwise
ANY_SERVICE = "any"
DEFAULT_PROTECTION = (ProtectionLevel.INTEGRITY, ProtectionLevel.CONFIDENTIALITY)
# A Windows domain's tickets carry a PAC: its MaxTokenSize is 48,000 octets.
DEFAULT_MAX_TOKEN = 48_000


@dataclass(frozen=True, slots=True)
class GssapiConfig:
    keytab: str | None = None  # the acceptor's keys; required when gssapi is offered
    service: str = DEFAULT_SERVICE  # the service part of the principal; "any": any key
    protection: tuple[ProtectionLevel, ...] = DEFAULT_PROTECTION
    max_token_size: int = DEFAULT_MAX_TOKEN  # octets of one context token from a client

    def agree(self, requested: int, available: frozenset[ProtectionLevel]) -> ProtectionLevel:
        """The level to answer a client's request with (section 4.2): the one asked for
        when allowed and the context offers it, else the strongest that is (the client
        closes when that does not suit it). None allowed and offered: ValueError."""
        usable = [level for level in self.protection if level in available]
        if not usable:
            raise ValueError("no allowed protection level is offered by the context")
        if requested in usable:
            return ProtectionLevel(requested)
        return max(usable)


def parse_gssapi(raw: object, error: Callable[[str, str], Exception]) -> GssapiConfig:
    """Validate ``auth.gssapi``; ``error(key, message)`` builds the exception to raise."""
    if raw is None:
        return GssapiConfig()
    if not isinstance(raw, Mapping):
        raise error("auth.gssapi", "must be a mapping")
    check_keys(raw, ("keytab", "service", "protection", "max_token_size"), "auth.gssapi", error)
    keytab = raw.get("keytab")
    if keytab is not None and (not isinstance(keytab, str) or not keytab):
        raise error("auth.gssapi.keytab", f"must be a file name, not {keytab!r}")
    service = raw.get("service", DEFAULT_SERVICE)
    if not isinstance(service, str) or not service or "@" in service or "/" in service:
        raise error(
            "auth.gssapi.service",
            f"must be a service name such as {DEFAULT_SERVICE!r} (no '/' or '@'), or"
            f" {ANY_SERVICE!r}, not {service!r}",
        )
    return GssapiConfig(
        keytab=keytab,
        service=service,
        protection=_protection(raw.get("protection"), error),
        max_token_size=_max_token(raw.get("max_token_size", DEFAULT_MAX_TOKEN), error),
    )


def _protection(value: Any, error: Callable[[str, str], Exception]) -> tuple[ProtectionLevel, ...]:
    if value is None:
        return DEFAULT_PROTECTION
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise error("auth.gssapi.protection", "must be a level or a non-empty list of levels")
    levels: list[ProtectionLevel] = []
    for i, name in enumerate(names):
        level = PROTECTION_NAMES.get(name) if isinstance(name, str) else None
        if level is None:
            raise error(
                f"auth.gssapi.protection[{i}]",
                f"unknown level {name!r} ({', '.join(PROTECTION_NAMES)})",
            )
        if level not in levels:
            levels.append(level)
    return tuple(levels)


def _max_token(value: Any, error: Callable[[str, str], Exception]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value <= MAX_TOKEN:
        raise error(
            "auth.gssapi.max_token_size", f"must be a whole number 1024..{MAX_TOKEN}, not {value!r}"
        )
    return value


def level_names(levels: tuple[ProtectionLevel, ...]) -> list[str]:
    """The config names of ``levels``, for messages and ``check-config``."""
    by_level = {level: name for name, level in PROTECTION_NAMES.items()}
    return [by_level[level] for level in levels]
