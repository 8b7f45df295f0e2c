"""The gateway's side of RFC 1961 sections 3 and 4: one GSS-API security context per
client, accepted with the keys of ``auth.gssapi.keytab``, and the protection level agreed.

The ``gssapi`` package is optional (it builds against the Kerberos headers): it is
imported only when a config offers the method, and its absence is a clear config error.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from translator.config import Config, ConfigError
from translator.service.privileges import PrivilegeError, readable_after_drop
from translator.wire import RemoteProtocolError
from translator.wire.gssapi import ProtectionLevel

from .protection import MessageProtection, gss_reason
from .settings import ANY_SERVICE, GssapiConfig

INSTALL_HINT = (
    "install it with `pip install 'socks64[gssapi]'` (it builds against libkrb5-dev), or"
    " use Debian's python3-gssapi with a Debian Python"
)


class GssUnavailable(RuntimeError):
    """The gssapi package cannot be imported here."""


class GssFailure(Exception):
    """The client's context could not be accepted; the reason is safe to log."""


def load_gssapi() -> ModuleType:
    try:
        return importlib.import_module("gssapi")
    except ImportError as exc:
        raise GssUnavailable(
            f"the 'gssapi' Python package is missing ({exc}): {INSTALL_HINT}"
        ) from None


_contexts: dict[ModuleType, Any] = {}


def context_class(gssapi: ModuleType) -> Any:
    """SecurityContext, but raising when a step fails: by default the package returns
    the mechanism's error token instead and raises only at the next use of the context,
    which would send a refusal out as if it were the next round."""
    made = _contexts.get(gssapi)
    if made is None:
        made = type("SecurityContext", (gssapi.SecurityContext,), {})
        made.__DEFER_STEP_ERRORS__ = False  # type: ignore[attr-defined]  # the metaclass sets it
        _contexts[gssapi] = made
    return made


class Acceptor:
    """The gateway's GSS-API credentials; ``exchange()`` serves one client."""

    def __init__(self, config: GssapiConfig) -> None:
        """Acquire acceptor credentials from the keytab. ValueError (a sentence naming the
        keytab and what is wrong with it) when it cannot serve; GssUnavailable without
        the package."""
        gssapi = load_gssapi()
        keytab = config.keytab
        if not keytab:
            raise ValueError("no keytab configured")
        if not os.path.isfile(keytab):
            raise ValueError(f"keytab {keytab} does not exist")
        if not os.access(keytab, os.R_OK):
            raise ValueError(f"keytab {keytab} is not readable by this process")
        self.config = config
        self.service = None if config.service == ANY_SERVICE else config.service
        self._gssapi = gssapi
        try:
            # Any key of the keytab: the service is checked once the context is made, so
            # the host part never depends on how the client spelt or resolved our name.
            self.credentials = gssapi.Credentials(usage="accept", store={"keytab": keytab})
            if self.service is not None:
                gssapi.Credentials(
                    name=gssapi.Name(self.service, gssapi.NameType.hostbased_service),
                    usage="accept",
                    store={"keytab": keytab},
                )
        except gssapi.exceptions.GSSError as exc:
            what = f"key for service {self.service!r}" if self.service else "key"
            raise ValueError(f"keytab {keytab} gives no {what}: {gss_reason(exc)}") from None

    def exchange(self) -> Exchange:
        return Exchange(self)


class Exchange:
    """One client's security context, from its first token to the agreed level."""

    __slots__ = ("_acceptor", "context", "principal")

    def __init__(self, acceptor: Acceptor) -> None:
        self._acceptor = acceptor
        gssapi = acceptor._gssapi
        self.context: Any = context_class(gssapi)(creds=acceptor.credentials, usage="accept")
        self.principal: str | None = None  # the client, once the context is complete

    def step(self, token: bytes) -> tuple[bytes, bool]:
        """Feed a client token: ``(our token, complete)``. Blocking (keytab, replay
        cache, decryption): run it off the event loop. GssFailure when refused."""
        gssapi = self._acceptor._gssapi
        context = self.context
        try:
            answer = context.step(token) or b""
        except gssapi.exceptions.GSSError as exc:
            raise GssFailure(gss_reason(exc)) from None
        if not context.complete:
            return answer, False
        service = self._acceptor.service
        target = str(context.target_name)
        if service is not None and target.partition("/")[0].partition("@")[0] != service:
            raise GssFailure(f"ticket is for {target}, not for service {service!r}")
        self.principal = str(context.initiator_name)
        return answer, True

    def available(self) -> frozenset[ProtectionLevel]:
        flags = self.context.actual_flags
        flag = self._acceptor._gssapi.RequirementFlag
        levels = {ProtectionLevel.NONE}
        if flag.integrity in flags:
            levels.add(ProtectionLevel.INTEGRITY)
            if flag.confidentiality in flags:
                levels.add(ProtectionLevel.CONFIDENTIALITY)
        return frozenset(levels)

    def agree(self, token: bytes) -> tuple[int, ProtectionLevel, bytes]:
        """Answer the protection-level message (section 4.3): ``(requested, agreed, our
        token)``. RemoteProtocolError for a message that does not unwrap to one level;
        GssFailure when no allowed level is offered by the context."""
        bare = len(token) == 1  # curl --socks5-gssapi-nec: the octet unwrapped
        octet = token if bare else self._unwrap(token)
        if len(octet) != 1 or octet[0] > ProtectionLevel.SELECTIVE:
            raise RemoteProtocolError(f"protection-level message holds {octet.hex() or 'nothing'}")
        requested = octet[0]
        try:
            agreed = self._acceptor.config.agree(requested, self.available())
        except ValueError as exc:
            raise GssFailure(str(exc)) from None
        answer = bytes((agreed,))
        if not bare:
            answer = self._wrap(answer)
        return requested, agreed, answer

    def protection(self, level: ProtectionLevel) -> MessageProtection | None:
        """What wraps every later message, or None at level 0 (nothing is wrapped)."""
        if level == ProtectionLevel.NONE:
            return None
        return MessageProtection(self.context, level == ProtectionLevel.CONFIDENTIALITY)

    def _unwrap(self, token: bytes) -> bytes:
        try:
            return bytes(self.context.unwrap(token).message)
        except self._acceptor._gssapi.exceptions.GSSError as exc:
            raise RemoteProtocolError(
                f"protection-level message does not unwrap: {gss_reason(exc)}"
            ) from None

    def _wrap(self, data: bytes) -> bytes:
        return bytes(self.context.wrap(data, False).message)


def acceptor_for(config: Config) -> Acceptor | None:
    """The acceptor a config asks for (None when it does not offer gssapi), built now:
    at start, on every reload and in check-config. ConfigError says why it cannot be."""
    if "gssapi" not in config.auth.methods:
        return None
    try:
        acceptor = Acceptor(config.auth.gssapi)
    except GssUnavailable as exc:
        raise ConfigError("auth.methods", f"gssapi cannot be offered: {exc}") from None
    except ValueError as exc:
        raise ConfigError("auth.gssapi.keytab", str(exc)) from None
    keytab = config.auth.gssapi.keytab
    assert keytab is not None
    # Kerberos reads the keytab at every login, long after the drop to user:.
    if config.user is not None and os.geteuid() == 0:
        try:
            readable = readable_after_drop(keytab, config.user, config.group)
        except (OSError, PrivilegeError):
            readable = True  # the drop itself will say what is wrong with the user
        if not readable:
            raise ConfigError(
                "auth.gssapi.keytab",
                f"keytab {keytab} is not readable by user {config.user}, which the gateway"
                " becomes after start: make it owned by (or group-readable to) that user",
            )
    return acceptor
