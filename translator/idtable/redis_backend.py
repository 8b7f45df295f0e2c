"""The ADDRESS ID table in Redis: one table shared by every gateway using the same URL.

:class:`RedisAuthority` implements :class:`~translator.idtable.base.Authority` with the
semantics of :class:`addrmap.AddressTable` (see its docstring), minus pins: callers keep
the IDs their sessions use alive by touching them.

Data model
----------
Every key starts with ``prefix`` (``P`` below), so tables with different prefixes share a
database without interfering. An owner is encoded as its IP, plus ``NUL`` and the user
name when there is one; a target as ``4:ADDR``, ``6:ADDR[%ZONE]`` or ``n:name`` (names
lower-cased), so it comes back as the same type, zone id included.

``P id``  hash   REALID -> owner            (the live entries: one field each)
``P tg``  hash   REALID -> target
``P lu``  zset   REALID scored by last use  (global expiry order; ZCARD = live entries)
``P q``   zset   REALID scored by the end of its quarantine
``P st``  hash   counters: owners, freed, quota_refusals, capacity_refusals
``P o:OWNER``   hash  target -> REALID      (idempotent associate; HLEN = quota count)
``P ou:OWNER``  zset  REALID by last use    (the owner's expiry order, for its quota)

Times are seconds from the caller's ``clock`` (wall clock in production, so gateways on
several NTP-synced hosts share one time base), passed to every script as ``now``: never
Redis ``TIME``, so tests drive a fake clock. Scores travel as ``repr`` of a float and come
back as Redis' round-trip formatting, and computed ones are written with ``%.17g``, so
``now - last_use >= ttl`` is evaluated on exactly the doubles the memory table would
use. A use moves ``last_use`` forward only (``ZADD GT``): a gateway whose clock lags a
little never shortens another's entry.

Atomicity
---------
Each operation is one Lua script, and Redis runs a script with nothing interleaved, so
every gateway sees the table move from one consistent state to the next:

* **associate** checks for the owner's live entry, frees it if it has expired, checks the
  quota (freeing the owner's expired entries first) and the capacity (freeing a bounded
  batch of expired entries, then counting expired ones out), picks the first candidate ID
  that is neither live nor quarantined and writes the entry. Two gateways associating the
  same target for one owner at once therefore get the same ID, never two, and no two
  entries ever get one ID. The candidates are drawn in Python with :mod:`secrets`
  (unpredictable, never 0); when none of them is free the script says so and Python
  draws again (a new script run, atomic on its own).
* **lookup** and **touch** check owner and expiry and refresh ``last_use`` in one step,
  so an entry cannot expire between the check and the refresh (nor be freed by
  another gateway's sweep in between).
* **expire** frees at most a budget of due entries and ends at most a budget of due
  quarantines per call, so no call holds Redis for long.
* **stats** reads every counter in one script: one consistent snapshot.

Freeing an entry (in any script) removes it from every structure above, puts its ID in
the global quarantine until ``min(now, last_use + ttl) + quarantine`` and counts it. An ID
whose quarantine has ended is reusable even before ``expire`` removes it from ``P q``.

The scripts touch keys they compute from ``P`` (other owners' keys, while freeing), so
this works on a standalone Redis (or behind Sentinel), not on Redis Cluster. Redis 6.2+
(``ZADD GT``).

Connection errors and timeouts (``timeout`` bounds connecting and each reply) raise
:class:`~translator.idtable.base.TableUnavailable`; the next call simply tries again, so
the table works again as soon as Redis is back.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from addrmap import (
    MAX_REALID,
    CapacityExceeded,
    InvalidTarget,
    Owner,
    QuotaExceeded,
    TableStats,
    Target,
)

from .base import TableUnavailable

_MAX_NAME = 255  # as addrmap.table: a name must fit ATYP X'03' (1..255 octets)
_MAX_CAPACITY = (MAX_REALID + 1) // 2  # as addrmap.table: random draws stay cheap
_ENCODING = ("utf-8", "surrogatepass")  # injective for every str, and reversible

# associate's answers other than a REALID
_QUOTA = -1
_CAPACITY = -2
_ID_SPACE = -3
_DRAW_AGAIN = -4

# ------------------------------------------------------------------------- Lua scripts
# KEYS: id, tg, lu, q, st.  ARGV[1..4]: prefix, now, ttl, quarantine; then per script.
_PRELUDE = """
local K_ID, K_TG, K_LU, K_Q, K_ST = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local PREFIX = ARGV[1]
local NOW_S = ARGV[2]
local NOW = tonumber(ARGV[2])
local TTL = tonumber(ARGV[3])
local QUAR = tonumber(ARGV[4])
-- Scores within SLACK of now - ttl are checked one by one with the exact test below.
local SLACK = (math.abs(NOW) + math.abs(TTL)) * 1e-12

local function fmt(x) return string.format('%.17g', x) end
local function expired(last) return NOW - last >= TTL end

local function free(id, last)
  local owner = redis.call('HGET', K_ID, id)
  local target = redis.call('HGET', K_TG, id)
  redis.call('HDEL', K_ID, id)
  redis.call('HDEL', K_TG, id)
  redis.call('ZREM', K_LU, id)
  local by_target = PREFIX .. 'o:' .. owner
  redis.call('HDEL', by_target, target)
  redis.call('ZREM', PREFIX .. 'ou:' .. owner, id)
  if redis.call('HLEN', by_target) == 0 then
    redis.call('HINCRBY', K_ST, 'owners', -1)
  end
  if QUAR > 0 then
    -- Counted from the moment the entry expired, not from when it was noticed.
    redis.call('ZADD', K_Q, fmt(math.min(NOW, last + TTL) + QUAR), id)
  end
  redis.call('HINCRBY', K_ST, 'freed', 1)
end

-- Up to `limit` entries of zset `key` (scored by last use) that have expired, oldest
-- first: {id, last, id, last, ...}. NOW - last is monotone in last, so stop at the
-- first live one.
local function due(key, limit)
  local found = redis.call('ZRANGEBYSCORE', key, '-inf', fmt(NOW - TTL + SLACK),
                           'WITHSCORES', 'LIMIT', 0, limit)
  local out = {}
  for i = 1, #found, 2 do
    local last = tonumber(found[i + 1])
    if not expired(last) then break end
    out[#out + 1] = found[i]
    out[#out + 1] = last
  end
  return out
end

local function free_due(key, limit)
  local entries = due(key, limit)
  for i = 1, #entries, 2 do free(entries[i], entries[i + 1]) end
  return #entries / 2
end

-- How many entries of zset `key` have expired (without freeing them).
local function due_count(key)
  local edge = NOW - TTL
  local n = redis.call('ZCOUNT', key, '-inf', '(' .. fmt(edge - SLACK))
  local near = redis.call('ZRANGEBYSCORE', key, fmt(edge - SLACK), fmt(edge + SLACK),
                          'WITHSCORES')
  for i = 2, #near, 2 do
    if expired(tonumber(near[i])) then n = n + 1 end
  end
  return n
end

local function use(owner, id)
  redis.call('ZADD', K_LU, 'GT', NOW_S, id)
  redis.call('ZADD', PREFIX .. 'ou:' .. owner, 'GT', NOW_S, id)
end

-- The owner's use of `id`: true if it is the owner's and live (then refreshed); an
-- expired entry of the owner's is freed, as AddressTable.lookup does.
local function lookup(owner, id)
  local holder = redis.call('HGET', K_ID, id)
  if holder ~= owner then return false end
  local last = tonumber(redis.call('ZSCORE', K_LU, id))
  if expired(last) then
    free(id, last)
    return false
  end
  use(owner, id)
  return true
end
"""

# ARGV[5..]: owner, target, quota, capacity, sweep budget, final draw (0/1), candidates...
_ASSOCIATE = """
local owner, target = ARGV[5], ARGV[6]
local quota, capacity = tonumber(ARGV[7]), tonumber(ARGV[8])
local budget, final = tonumber(ARGV[9]), ARGV[10] == '1'
local by_target = PREFIX .. 'o:' .. owner
local owner_lu = PREFIX .. 'ou:' .. owner

local current = redis.call('HGET', by_target, target)
if current then
  local last = tonumber(redis.call('ZSCORE', K_LU, current))
  if not expired(last) then
    use(owner, current)
    return tonumber(current)
  end
  free(current, last)
end
-- Limits count live entries only: reclaim what has expired before refusing.
if redis.call('HLEN', by_target) >= quota then
  free_due(owner_lu, -1)
  if redis.call('HLEN', by_target) >= quota then
    redis.call('HINCRBY', K_ST, 'quota_refusals', 1)
    return -1
  end
end
if redis.call('ZCARD', K_LU) >= capacity then
  free_due(K_LU, budget)
  if redis.call('ZCARD', K_LU) - due_count(K_LU) >= capacity then
    redis.call('HINCRBY', K_ST, 'capacity_refusals', 1)
    return -2
  end
end
local chosen = nil
for i = 11, #ARGV do
  local candidate = ARGV[i]
  if redis.call('HEXISTS', K_ID, candidate) == 0 then
    local release = redis.call('ZSCORE', K_Q, candidate)
    if not release or tonumber(release) <= NOW then
      chosen = candidate
      break
    end
  end
end
if not chosen then
  if final then
    redis.call('HINCRBY', K_ST, 'capacity_refusals', 1)
    return -3
  end
  return -4
end
redis.call('ZREM', K_Q, chosen)
if redis.call('HLEN', by_target) == 0 then
  redis.call('HINCRBY', K_ST, 'owners', 1)
end
redis.call('HSET', K_ID, chosen, owner)
redis.call('HSET', K_TG, chosen, target)
redis.call('HSET', by_target, target, chosen)
redis.call('ZADD', K_LU, NOW_S, chosen)
redis.call('ZADD', owner_lu, NOW_S, chosen)
return tonumber(chosen)
"""

# ARGV[5..6]: owner, REALID.  Returns the target, or nil.
_LOOKUP = """
local id = ARGV[6]
if lookup(ARGV[5], id) then return redis.call('HGET', K_TG, id) end
return false
"""

# ARGV[5..]: owner, REALID, owner, REALID, ...
_TOUCH = """
for i = 5, #ARGV - 1, 2 do lookup(ARGV[i], ARGV[i + 1]) end
return 0
"""

# ARGV[5]: budget.  Returns how many entries were freed.
_EXPIRE = """
local budget = tonumber(ARGV[5])
local freed = free_due(K_LU, budget)
local ended = redis.call('ZCOUNT', K_Q, '-inf', NOW_S)
if ended > 0 then
  redis.call('ZREMRANGEBYRANK', K_Q, 0, math.min(ended, budget) - 1)
end
return freed
"""

_STATS = """
local st = redis.call('HMGET', K_ST, 'owners', 'freed', 'quota_refusals', 'capacity_refusals')
return {redis.call('ZCARD', K_LU), tonumber(st[1] or 0), redis.call('ZCARD', K_Q),
        tonumber(st[2] or 0), tonumber(st[3] or 0), tonumber(st[4] or 0)}
"""


# ----------------------------------------------------------------------- encodings


def _encode_owner(owner: Owner) -> bytes:
    ip = owner.ip.encode(*_ENCODING)
    if owner.user is None:
        return ip
    return ip + b"\0" + owner.user.encode(*_ENCODING)


def _encode_target(target: Target) -> bytes:
    """The stored form of ``target``; the same checks as ``addrmap.table._normalize``."""
    if isinstance(target, IPv4Address):
        return b"4:" + str(target).encode()
    if isinstance(target, IPv6Address):
        return b"6:" + str(target).encode(*_ENCODING)  # the zone id, if any, included
    if isinstance(target, str):
        name = target if target.islower() else target.lower()
        if not 0 < len(name) <= _MAX_NAME:
            raise InvalidTarget(f"domain name must be 1..{_MAX_NAME} characters: {target!r}")
        return b"n:" + name.encode(*_ENCODING)
    raise InvalidTarget(f"target must be an IP address or a domain name, not {target!r}")


def _decode_target(stored: bytes) -> Target:
    kind, text = stored[:2], stored[2:].decode(*_ENCODING)
    if kind == b"4:":
        return IPv4Address(text)
    if kind == b"6:":
        return IPv6Address(text)
    return text


def redact(url: str) -> str:
    """``url`` without its password (in the authority part or the query), for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = netloc.rpartition("@")[2]
        netloc = f"{user}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# ------------------------------------------------------------------------ authority


class RedisAuthority:
    """The ADDRESS ID table kept in Redis (an :class:`~translator.idtable.base.Authority`).

    Every call is one script run (associate: more only in a crowded ID space) and may
    raise :class:`TableUnavailable`; limits and errors are those of AddressTable.
    """

    #: entries examined (and quarantines ended) by one :meth:`expire`, and freed by an
    #: associate that finds the table at capacity
    SWEEP_BUDGET = 1000
    #: candidate IDs sent with each associate, and how many sets before giving up
    CANDIDATES = 8
    DRAW_ROUNDS = 8
    #: connections to Redis per authority (callers beyond wait up to ``timeout``)
    MAX_CONNECTIONS = 32
    #: seconds an idle pooled connection may sit before a PING checks it on next use
    HEALTH_CHECK_INTERVAL = 10

    def __init__(
        self,
        url: str,
        *,
        ttl: float,
        quarantine: float,
        per_owner_quota: int,
        capacity: int,
        clock: Callable[[], float] = time.time,
        prefix: str = "socks64:ids:",
        timeout: float = 0.5,
    ) -> None:
        """Prepare the client (no I/O: the first call connects).

        ``ttl`` is the idle lifetime, ``quarantine`` how long a freed REALID stays
        unusable (0 disables it), ``clock`` the shared time base in seconds, ``prefix``
        what every key starts with, ``timeout`` the bound on connecting and on each reply.
        """
        if not ttl > 0:
            raise ValueError("ttl must be positive")
        if not quarantine >= 0:
            raise ValueError("quarantine must be >= 0")
        if per_owner_quota < 1:
            raise ValueError("per_owner_quota must be >= 1")
        if not 1 <= capacity <= _MAX_CAPACITY:
            raise ValueError(f"capacity must be in 1..{_MAX_CAPACITY}")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.url = redact(url)
        self._password = urlsplit(url).password or None
        self.prefix = prefix
        self._clock = clock
        self._ttl = repr(float(ttl))
        self._quarantine = repr(float(quarantine))
        self._quota = per_owner_quota
        self._capacity = capacity
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=self.MAX_CONNECTIONS,
            timeout=timeout,  # waiting for a free connection
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=self.HEALTH_CHECK_INTERVAL,
            # One immediate retry on a broken connection (Redis restarted since it was
            # opened); a timeout is not retried, so a call fails within ``timeout``.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis = Redis.from_pool(pool)
        prefixed = prefix.encode(*_ENCODING)
        self._keys = [prefixed + name for name in (b"id", b"tg", b"lu", b"q", b"st")]
        self._prefix = prefixed
        register = self._redis.register_script
        self._associate = register(_PRELUDE + _ASSOCIATE)
        self._lookup = register(_PRELUDE + _LOOKUP)
        self._touch = register(_PRELUDE + _TOUCH)
        self._expire = register(_PRELUDE + _EXPIRE)
        self._stats = register(_PRELUDE + _STATS)

    async def associate(self, owner: Owner, target: Target) -> int:
        """The owner's REALID for ``target``, created if needed (a use).

        Raises :class:`~addrmap.QuotaExceeded`, :class:`~addrmap.CapacityExceeded`,
        :class:`~addrmap.InvalidTarget`, :class:`TableUnavailable`.
        """
        stored = _encode_target(target)
        who = _encode_owner(owner)
        now = self._clock()
        fixed: list[bytes | str | int] = [who, stored, self._quota, self._capacity]
        fixed.append(self.SWEEP_BUDGET)
        for draw in range(self.DRAW_ROUNDS):
            final = 1 if draw == self.DRAW_ROUNDS - 1 else 0
            candidates = [c for c in self._candidates(self.CANDIDATES) if 0 < c <= MAX_REALID]
            answer = int(await self._run(self._associate, now, *fixed, final, *candidates))
            if answer > 0:
                return answer
            if answer == _QUOTA:
                raise QuotaExceeded(self._quota, owner)
            if answer == _CAPACITY:
                raise CapacityExceeded(self._capacity, owner)
            if answer == _ID_SPACE:
                raise CapacityExceeded(MAX_REALID, owner, limit="id_space")
        raise AssertionError("the last draw either succeeds or reports id_space")

    async def lookup(self, owner: Owner, realid: int) -> Target | None:
        """What ``realid`` names for ``owner`` (a use), or None: unknown, expired, foreign."""
        if not 0 < realid <= MAX_REALID:
            return None
        found = await self._run(self._lookup, self._clock(), _encode_owner(owner), realid)
        return None if found is None else _decode_target(found)

    async def touch(self, uses: Sequence[tuple[Owner, int]]) -> None:
        """Record a batch of uses in one script run; unknown and foreign IDs are ignored."""
        args: list[bytes | int] = []
        for owner, realid in uses:
            if 0 < realid <= MAX_REALID:
                args += (_encode_owner(owner), realid)
        if args:
            await self._run(self._touch, self._clock(), *args)

    async def expire(self) -> int:
        """Free up to :attr:`SWEEP_BUDGET` entries idle for ``ttl`` or more, and end as
        many due quarantines; returns how many entries were freed."""
        return int(await self._run(self._expire, self._clock(), self.SWEEP_BUDGET))

    async def stats(self) -> TableStats:
        """The whole table's counters, as one snapshot."""
        live, owners, quarantined, freed, quota, capacity = await self._run(
            self._stats, self._clock()
        )
        return TableStats(
            live=int(live),
            owners=int(owners),
            pinned=0,
            quarantined=int(quarantined),
            freed=int(freed),
            quota_refusals=int(quota),
            capacity_refusals=int(capacity),
        )

    async def close(self) -> None:
        """Close the connections (later calls would open new ones)."""
        await self._redis.aclose()

    # ---------------------------------------------------------------- internals

    def _candidates(self, count: int) -> list[int]:
        """``count`` random REALIDs for associate to choose from (a seam for tests)."""
        return [secrets.randbelow(MAX_REALID) + 1 for _ in range(count)]

    async def _run(self, script: AsyncScript, now: float, *args: bytes | str | int) -> Any:
        head = (self._prefix, repr(float(now)), self._ttl, self._quarantine)
        try:
            return await script(keys=self._keys, args=head + args)
        except (RedisError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            if self._password:
                detail = detail.replace(self._password, "***")
            raise TableUnavailable(f"Redis table at {self.url} unavailable: {detail}") from exc
