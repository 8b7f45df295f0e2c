"""Who gets a connection slot: the gateway-wide bound and a fair share per client address.

One client address must not take the whole gateway: past ``limits.per_client`` open
connections, or ``limits.per_client_handshake`` connections that have not yet sent their
first request, that address's new connections are closed at once. Idle unauthenticated
connections are the cheap attack, so their bound is the tighter one. Other addresses are
served as if nothing happened.
"""

from __future__ import annotations

from dataclasses import dataclass

from translator.config import Limits

#: reasons a new connection is refused (the ``reason`` label of the rejection counter)
MAX_CLIENTS = "max_clients"
PER_CLIENT = "per_client"
PER_CLIENT_HANDSHAKE = "per_client_handshake"


@dataclass(slots=True)
class _Share:
    open: int = 0
    handshaking: int = 0


class Admission:
    """Counts connections per client address; ``admit`` says whether one more fits."""

    __slots__ = ("_shares", "limits", "total")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits  # replaced on reload; counts carry over
        self.total = 0
        self._shares: dict[str, _Share] = {}

    def admit(self, client: str) -> str | None:
        """Take a slot for a new connection from ``client``, or the reason there is none."""
        limits = self.limits
        if self.total >= limits.max_clients:
            return MAX_CLIENTS
        share = self._shares.get(client)
        if share is None:
            share = self._shares[client] = _Share()
        elif share.handshaking >= limits.per_client_handshake:
            return PER_CLIENT_HANDSHAKE
        elif share.open >= limits.per_client:
            return PER_CLIENT
        share.open += 1
        share.handshaking += 1
        self.total += 1
        return None

    def handshake_done(self, client: str) -> None:
        """The connection sent its first request: it no longer counts as handshaking."""
        share = self._shares.get(client)
        if share is not None and share.handshaking:
            share.handshaking -= 1

    def release(self, client: str, *, handshaking: bool) -> None:
        """The connection ended (``handshaking``: before its first request)."""
        share = self._shares.get(client)
        if share is None:
            return
        share.open -= 1
        if handshaking and share.handshaking:
            share.handshaking -= 1
        if share.open <= 0:
            del self._shares[client]
        self.total -= 1

    def open_from(self, client: str) -> int:
        share = self._shares.get(client)
        return 0 if share is None else share.open
