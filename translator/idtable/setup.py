"""Which table a gateway process uses, from ``addrmap.backend``."""

from __future__ import annotations

import time

from translator.config import AddrmapConfig

from .base import GRACE
from .cache import CachedIds


def redis_ids(settings: AddrmapConfig) -> CachedIds:
    """A cache in front of the table in Redis, shared by every gateway using that URL.

    Wall-clock time: gateways on several machines (NTP-synced) share the entries' times.
    """
    from .redis_backend import RedisAuthority  # the redis package only where it is used

    authority = RedisAuthority(
        settings.backend,
        ttl=settings.ttl + GRACE,
        quarantine=settings.quarantine,
        per_owner_quota=settings.per_owner,
        capacity=settings.capacity,
        clock=time.time,
    )
    return CachedIds(authority, ttl=settings.ttl, clock=time.time)
