"""Dropping root once everything privileged is open (listeners, netlink), keeping only the
capabilities the gateway still needs, so a compromise of the relay does not own the box."""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import stat
from collections.abc import Iterable

CAP_SETGID = 6
CAP_SETUID = 7
CAP_NET_BIND_SERVICE = 10  # listeners on ports < 1024 (also ones added by a reload)
CAP_NET_ADMIN = 12  # IP_TRANSPARENT
CAP_NET_RAW = 13  # SO_BINDTODEVICE (outbound.interface)

NAMES: dict[int, str] = {
    CAP_SETGID: "CAP_SETGID",
    CAP_SETUID: "CAP_SETUID",
    CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE",
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_NET_RAW: "CAP_NET_RAW",
}

PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel


class PrivilegeError(RuntimeError):
    """The switch to the configured user failed or could not be verified. The process may
    be half-switched: the caller must exit rather than serve."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def cap_name(cap: int) -> str:
    return NAMES.get(cap, f"capability {cap}")


def current_capabilities() -> set[int]:
    """The calling thread's effective capabilities (CapEff)."""
    return _capability_set("CapEff")


def drop_privileges(
    user: str, group: str | None = None, keep: Iterable[int] = (), inherit: Iterable[int] = ()
) -> str:
    """Become ``user`` (and ``group``, default: the user's primary group; names or decimal
    ids) with no supplementary groups and only the ``keep`` capabilities, then check that
    root cannot be regained. Returns a one-line description for the log.

    ``inherit`` (a subset of ``keep``) are passed on to programs the gateway runs, as
    ambient capabilities: ``nft``, which removes the gateway's table at stop, needs
    CAP_NET_ADMIN of its own.

    Not running as root: nothing to drop when already ``user``, else PrivilegeError.
    Capabilities are per thread: call this before starting threads, which would otherwise
    end up with no capabilities at all (the uid change applies to every thread)."""
    kept = set(keep)
    inherited = set(inherit) & kept
    for cap in kept:
        if not 0 <= cap < 64:
            raise PrivilegeError(f"{cap} is not a capability number")
    if CAP_SETUID in kept:
        raise PrivilegeError("keeping CAP_SETUID would let the process become root again")
    uid, user_name, primary_gid = _resolve_user(user)
    gid = _resolve_group(group, user) if group is not None else primary_gid
    if gid is None:
        raise PrivilegeError(f"user {user} has no passwd entry; set the group as well")
    if os.geteuid() != 0:
        if uid == os.getuid():
            return f"running as {user_name} (uid {uid}, gid {os.getgid()}), not started as root"
        raise PrivilegeError(f"cannot switch to user {user}: not running as root")
    if uid == 0:
        raise PrivilegeError(
            f"user {user} is root: that drops nothing; omit user: to keep running as root"
        )
    missing = kept - _capability_set("CapPrm")
    if missing:
        names = ", ".join(cap_name(cap) for cap in sorted(missing))
        raise PrivilegeError(
            f"cannot keep {names}: the process does not have it (CapabilityBoundingSet=?)"
        )
    target = f"{user_name} (uid {uid}, gid {gid})"
    try:
        if kept:  # else the uid change clears all capabilities, as wanted
            _prctl(PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        _capset(kept, inherited)
        _prctl(PR_SET_KEEPCAPS, 0)
        for cap in sorted(inherited):
            _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
    except OSError as e:
        raise PrivilegeError(f"switching to {target} failed: {e}") from e
    _verify(uid, gid, kept, target, inherited)
    if kept:
        passed = "".join(f", passing {cap_name(c)} to nft" for c in sorted(inherited))
        kept_names = ", ".join(cap_name(c) for c in sorted(kept))
        return f"running as {target}, keeping {kept_names}{passed}"
    return f"running as {target}, no capabilities"


def account_ids(user: str, group: str | None = None) -> tuple[int, int]:
    """The uid and gid ``drop_privileges(user, group)`` switches to."""
    uid, _, primary_gid = _resolve_user(user)
    gid = _resolve_group(group, user) if group is not None else primary_gid
    if gid is None:
        raise PrivilegeError(f"user {user} has no passwd entry; set the group as well")
    return uid, gid


def _resolve_user(user: str) -> tuple[int, str, int | None]:
    """uid, name for the log and primary gid (None: a numeric uid with no passwd entry)."""
    if user.isdigit():
        uid = _numeric_id(user, "user")
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return uid, user, None
        return uid, entry.pw_name, entry.pw_gid
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"unknown user {user!r}: no such account on this machine") from None
    return entry.pw_uid, entry.pw_name, entry.pw_gid


def _resolve_group(group: str, user: str) -> int:
    if group.isdigit():
        return _numeric_id(group, "group")
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise PrivilegeError(
            f"unknown group {group!r} (for user {user}): no such group on this machine"
        ) from None


def _numeric_id(text: str, what: str) -> int:
    value = int(text)
    if value > _MAX_ID:
        raise PrivilegeError(f"{what} id {text} is out of range")
    return value


def _verify(
    uid: int,
    gid: int,
    kept: set[int],
    target: str,
    inherited: set[int] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Check the result instead of trusting it: a silent partial drop is the worst case."""
    problems = []
    if os.getresuid() != (uid, uid, uid):
        problems.append(f"uids (real, effective, saved) are {os.getresuid()}")
    if os.getresgid() != (gid, gid, gid):
        problems.append(f"gids (real, effective, saved) are {os.getresgid()}")
    extra_groups = set(os.getgroups()) - {gid}
    if extra_groups:
        problems.append(f"supplementary groups {sorted(extra_groups)} remain")
    for field in ("CapEff", "CapPrm"):
        have = _capability_set(field)
        if have != kept:
            names = ", ".join(cap_name(c) for c in sorted(have)) or "none"
            problems.append(f"{field} is {names}")
    for field in ("CapInh", "CapAmb"):
        have = _capability_set(field)
        if have != set(inherited):
            names = ", ".join(cap_name(c) for c in sorted(have)) or "none"
            problems.append(f"{field} is {names}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    except OSError as e:
        problems.append(f"setuid(0) failed oddly: {e}")
    else:
        problems.append("setuid(0) succeeded: root can be regained")
    if problems:
        raise PrivilegeError(f"switching to {target} did not stick: " + "; ".join(problems))


def _capability_set(field: str) -> set[int]:
    """One capability set of the calling thread from /proc (thread-self: sets are per
    thread; /proc/self would show the main thread's)."""
    path = "/proc/thread-self/status"
    if not os.path.exists(path):
        path = "/proc/self/status"
    with open(path, encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key == field:
                mask = int(value.strip(), 16)
                return {cap for cap in range(64) if mask >> cap & 1}
    raise PrivilegeError(f"{path} has no {field} line")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int, extra: int = 0) -> None:
    prctl = _libc().prctl
    prctl.restype = ctypes.c_int
    rest = (ctypes.c_ulong(value), ctypes.c_ulong(extra), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if prctl(ctypes.c_int(option), *rest) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _capset(caps: set[int], inheritable: Iterable[int] = ()) -> None:
    """Effective = permitted = ``caps``; inheritable only ``inheritable`` (which the ambient
    set needs; children get nothing else)."""
    mask = sum(1 << cap for cap in caps)
    passed = sum(1 << cap for cap in inheritable)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = word
        data[i].permitted = word
        data[i].inheritable = (passed >> (32 * i)) & 0xFFFFFFFF
    capset = _libc().capset
    capset.restype = ctypes.c_int
    capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
    if capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def readable_after_drop(path: str, user: str, group: str | None = None) -> bool:
    """Whether ``path`` stays readable once :func:`drop_privileges` has made us ``user``
    (and ``group``), with no supplementary groups: for files read after the drop."""
    uid, _, primary_gid = _resolve_user(user)
    gid = _resolve_group(group, user) if group is not None else primary_gid
    mode = os.stat(path)
    if mode.st_uid == uid:
        return bool(mode.st_mode & stat.S_IRUSR)
    if mode.st_gid == gid:
        return bool(mode.st_mode & stat.S_IRGRP)
    return bool(mode.st_mode & stat.S_IROTH)
