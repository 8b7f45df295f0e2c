"""Descriptor limits: every relayed client costs two descriptors, and the usual soft limit
of 1024 would make the gateway refuse clients (EMFILE) long before limits.max_clients."""

from __future__ import annotations

import contextlib
import resource

FDS_PER_CLIENT = 2  # the client's socket and the destination socket
RESERVED_FDS = 64  # listeners, resolver, netlink, logs, headroom for UDP relays
_NR_OPEN_FALLBACK = 1048576  # the kernel's default fs.nr_open


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (an unprivileged process may); returns
    (soft, hard) afterwards. The gateway uses epoll, so descriptors above 1024 are safe.
    An unlimited hard limit is capped at fs.nr_open, the most the kernel accepts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        # On failure keep the limit we have; capacity_warning() reports what it means.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def clients_servable(soft_limit: int) -> int:
    """How many concurrent clients a descriptor limit serves."""
    return max(0, (soft_limit - RESERVED_FDS) // FDS_PER_CLIENT)


def capacity_warning(max_clients: int, soft_limit: int | None = None) -> str | None:
    """A message for the log when the descriptor limit cannot serve max_clients clients
    (the current soft limit when none is given), else None."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return None
    if max_clients * FDS_PER_CLIENT + RESERVED_FDS <= soft_limit:
        return None
    return (
        f"limits.max_clients is {max_clients} but the descriptor limit (RLIMIT_NOFILE "
        f"{soft_limit}) serves about {clients_servable(soft_limit)} clients; "
        "raise LimitNOFILE / ulimit -n or lower limits.max_clients"
    )


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _NR_OPEN_FALLBACK
