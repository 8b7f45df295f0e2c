"""socks64 address table: ADDRESS ID (ATYP X'08') associations, per wire profile section 4.

Pure Python, no I/O: the gateway passes a clock and calls :meth:`AddressTable.expire`
now and then. See :mod:`addrmap.table` for how it works, and :mod:`addrmap.snapshot` for
how its IDs and quarantine survive a restart (exported here as ``snapshot_table`` and
``restore_table``: a package attribute named ``snapshot`` would hide that module).
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
from addrmap.snapshot import SavedEntry, TableSnapshot
from addrmap.snapshot import restore as restore_table
from addrmap.snapshot import snapshot as snapshot_table
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
    "SavedEntry",
    "TableSnapshot",
    "TableStats",
    "Target",
    "restore_table",
    "snapshot_table",
]
