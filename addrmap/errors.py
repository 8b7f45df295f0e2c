"""Errors raised by the address table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from addrmap.owner import Owner

#: Which limit refused an association: the owner's quota, the table's capacity, or the
#: 24-bit REALID space (live plus quarantined IDs leave no free ID to draw).
LimitName = Literal["per_owner_quota", "capacity", "id_space", "pool"]


class AddrMapError(Exception):
    """Base class of every error the address table raises."""


class InvalidTarget(AddrMapError, ValueError):
    """The target is not an IP address or a usable domain name (empty or too long)."""


class LimitExceeded(AddrMapError):
    """An association was refused because a configured limit was reached.

    The gateway answers REP X'01' and logs ``limit``, ``value`` and ``owner``.
    """

    def __init__(self, limit: LimitName, value: int, owner: Owner) -> None:
        self.limit: LimitName = limit
        self.value = value
        self.owner = owner
        who = owner.ip if owner.user is None else f"{owner.user}@{owner.ip}"
        super().__init__(f"address table {limit.replace('_', ' ')} of {value} reached ({who})")


class QuotaExceeded(LimitExceeded):
    """The owner already holds ``per_owner_quota`` live IDs."""

    def __init__(self, value: int, owner: Owner) -> None:
        super().__init__("per_owner_quota", value, owner)


class CapacityExceeded(LimitExceeded):
    """The table holds ``capacity`` live IDs, or no REALID is free (``limit == "id_space"``)."""

    def __init__(self, value: int, owner: Owner, *, limit: LimitName = "capacity") -> None:
        super().__init__(limit, value, owner)


class PoolExhausted(LimitExceeded):
    """Every address of a fake-IP pool is bound or still in quarantine."""

    def __init__(self, value: int, owner: Owner) -> None:
        super().__init__("pool", value, owner)
