"""The ADDRESS ID table as the gateway uses it: local, served by the supervisor to its
workers, or shared through Redis. See :mod:`translator.idtable.base`."""

from .base import FLUSH_INTERVAL, GRACE, Authority, Ids, TableUnavailable
from .cache import CachedIds
from .local import LocalIds

__all__ = [
    "FLUSH_INTERVAL",
    "GRACE",
    "Authority",
    "CachedIds",
    "Ids",
    "LocalIds",
    "TableUnavailable",
]
