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
    QuotaExceeded,
)
from addrmap.ids import MAX_REALID
from addrmap.owner import Owner, Target
from addrmap.table import AddressTable, TableStats

__all__ = [
    "MAX_REALID",
    "AddrMapError",
    "AddressTable",
    "CapacityExceeded",
    "InvalidTarget",
    "LimitExceeded",
    "LimitName",
    "Owner",
    "QuotaExceeded",
    "TableStats",
    "Target",
]
