"""socks64 address table: ADDRESS ID (ATYP X'08') associations, per wire profile section 4.

Pure Python, no I/O: the gateway passes a clock and calls :meth:`AddressTable.expire`
now and then. See :mod:`addrmap.table` for how it works.
"""

from __future__ import annotations

from addrmap.errors import (
    AddrMapError,
    CapacityExceeded,
    InvalidTarget,
    LimitExceeded,
    LimitName,
    PoolExhausted,
    QuotaExceeded,
)
from addrmap.fakeip import POOL_OWNER, Binding, FakeIpPool, PoolSnapshot
from addrmap.ids import MAX_REALID
from addrmap.owner import Owner, Target
from addrmap.table import AddressTable, TableStats

__all__ = [
    "MAX_REALID",
    "POOL_OWNER",
    "AddrMapError",
    "AddressTable",
    "Binding",
    "CapacityExceeded",
    "FakeIpPool",
    "InvalidTarget",
    "LimitExceeded",
    "LimitName",
    "Owner",
    "PoolExhausted",
    "PoolSnapshot",
    "QuotaExceeded",
    "TableStats",
    "Target",
]
