"""RFC 1929 username/password credentials, stored as scrypt hashes.

The users file holds one ``user:scrypt$N$r$p$salt_b64$hash_b64`` line per user; ``#``
comment lines and blank lines are ignored. The hash is split off at the *last* colon, so a
user name may contain colons; surrounding whitespace is not part of a user name. Plaintext
passwords are refused, and error messages never quote a line, since it may hold one.
Create a line with ``socks64 hash-password USER``.

scrypt is deliberately slow (about 50 ms and 16 MiB at the default N=2**14, r=8): the
server calls :meth:`Credentials.verify_async`, which runs it in a worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import getpass
import hashlib
import hmac
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

__all__ = [
    "Credentials",
    "CredentialsError",
    "hash_password",
    "main_hash_password",
    "verify_password",
]

SCHEME = "scrypt"
DEFAULT_N = 2**14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_FIELD_OCTETS = 255  # RFC 1929: ULEN and PLEN are one octet, 1..255
# Bounds a hash line's cost, so a typo in N cannot make every login take minutes.
MAX_SCRYPT_MEMORY = 256 * 2**20
_MIN_SALT_BYTES = 8
_MIN_HASH_BYTES = 16


class CredentialsError(ValueError):
    """A bad users file; the message starts with ``path:line:``."""


class _ScryptHash(NamedTuple):
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _scrypt_memory(n: int, r: int, p: int) -> int:
    """Bytes OpenSSL needs for these parameters (128*r*(N+p+2)), plus slack."""
    return 128 * r * (n + p + 2) + 2**20


def _check_parameters(n: int, r: int, p: int) -> None:
    if n < 2 or n & (n - 1):
        raise ValueError(f"scrypt N must be a power of two >= 2, not {n}")
    if r < 1 or p < 1:
        raise ValueError(f"scrypt r and p must be >= 1, not r={r} p={p}")
    if _scrypt_memory(n, r, p) > MAX_SCRYPT_MEMORY:
        raise ValueError(f"scrypt N={n} r={r} p={p} needs more than {MAX_SCRYPT_MEMORY} bytes")


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _parse_hash(encoded: str) -> _ScryptHash:
    """Parse ``scrypt$N$r$p$salt$hash``; ValueError (naming no secret) when malformed."""
    parts = encoded.split("$")
    if parts[0] != SCHEME:
        raise ValueError("not an scrypt hash (expected 'scrypt$N$r$p$salt$hash')")
    if len(parts) != 6:
        raise ValueError("malformed scrypt hash: expected 6 '$'-separated fields")
    numbers = parts[1:4]
    if not all(part.isascii() and part.isdigit() for part in numbers):
        raise ValueError("malformed scrypt hash: N, r and p must be decimal numbers")
    n, r, p = (int(part) for part in numbers)
    _check_parameters(n, r, p)
    try:
        salt = _b64decode(parts[4])
        digest = _b64decode(parts[5])
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("malformed scrypt hash: salt and hash must be base64") from None
    if len(salt) < _MIN_SALT_BYTES or len(digest) < _MIN_HASH_BYTES:
        raise ValueError("malformed scrypt hash: salt or hash too short")
    return _ScryptHash(n, r, p, salt, digest)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, maxmem=_scrypt_memory(n, r, p), dklen=length
    )


def _check_field(value: str, what: str) -> bytes:
    encoded = value.encode("utf-8")
    if not 1 <= len(encoded) <= MAX_FIELD_OCTETS:
        raise ValueError(f"{what} must be 1..{MAX_FIELD_OCTETS} octets in UTF-8 (RFC 1929)")
    return encoded


def hash_password(
    password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """Hash a password for the users file: ``scrypt$N$r$p$salt_b64$hash_b64``.

    Raises ValueError for a password outside RFC 1929's 1..255 octets or bad parameters.
    """
    secret = _check_field(password, "password")
    _check_parameters(n, r, p)
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(secret, salt, n, r, p, HASH_BYTES)
    return f"{SCHEME}${n}${r}${p}${_b64encode(salt)}${_b64encode(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches the ``encoded`` hash (compared in constant time).

    Raises ValueError when ``encoded`` is malformed; a password RFC 1929 cannot carry
    (empty, over 255 octets) is simply wrong.
    """
    return _verify(password, _parse_hash(encoded))


def _verify(password: str, stored: _ScryptHash) -> bool:
    secret = password.encode("utf-8")
    if not 1 <= len(secret) <= MAX_FIELD_OCTETS:
        return False
    digest = _scrypt(secret, stored.salt, stored.n, stored.r, stored.p, len(stored.digest))
    return hmac.compare_digest(digest, stored.digest)


def _parse_line(raw: bytes) -> tuple[str, str] | None:
    """One users-file line: (user, encoded hash), or None for a blank or comment line."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    if not line or line.startswith("#"):
        return None
    user, colon, encoded = line.rpartition(":")
    user, encoded = user.strip(), encoded.strip()
    if not colon or not user:
        raise ValueError("expected 'user:scrypt$N$r$p$salt$hash'")
    _check_field(user, "user name")
    if not encoded.startswith(SCHEME + "$"):
        # Name the user only up to the first colon: a plaintext password may hold colons.
        shown = line.partition(":")[0].strip()
        raise ValueError(
            f"password of user {shown!r} is not an scrypt hash; plaintext passwords are not"
            " accepted (create a line with 'socks64 hash-password USER')"
        )
    try:
        _parse_hash(encoded)
    except ValueError as error:
        raise ValueError(f"user {user!r}: {error}") from None
    return user, encoded


class Credentials:
    """User names and their scrypt hashes, as loaded from a users file."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        """Build from ``{user: encoded_hash}``; ValueError on a bad name or hash."""
        self._hashes: dict[str, _ScryptHash] = {}
        for user, encoded in hashes.items():
            _check_field(user, "user name")
            self._hashes[user] = _parse_hash(encoded)
        # An unknown user is checked against a random hash with the first user's cost, so
        # the answer takes as long as a wrong password for a real user and reveals nothing.
        model = next(iter(self._hashes.values()), None)
        n, r, p = (model.n, model.r, model.p) if model else (DEFAULT_N, DEFAULT_R, DEFAULT_P)
        self._dummy = _ScryptHash(
            n, r, p, secrets.token_bytes(SALT_BYTES), secrets.token_bytes(HASH_BYTES)
        )

    @classmethod
    def load(cls, path: str | Path) -> Credentials:
        """Read a users file. Raises :class:`CredentialsError` (``path:line: ...``) for a
        malformed line, a plaintext password or a duplicate user; OSError if unreadable."""
        path = Path(path)
        hashes: dict[str, str] = {}
        first_seen: dict[str, int] = {}
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                entry = _parse_line(raw)
            except ValueError as error:
                raise CredentialsError(f"{path}:{number}: {error}") from None
            if entry is None:
                continue
            user, encoded = entry
            if user in hashes:
                raise CredentialsError(
                    f"{path}:{number}: duplicate user {user!r} (first on line {first_seen[user]})"
                )
            hashes[user] = encoded
            first_seen[user] = number
        return cls(hashes)

    def verify(self, user: str, password: str) -> bool:
        """Whether ``user`` exists and ``password`` is theirs. CPU-heavy: in the event
        loop use :meth:`verify_async`."""
        stored = self._hashes.get(user)
        if stored is None:
            _verify(password, self._dummy)  # same cost as a real check; result meaningless
            return False
        return _verify(password, stored)

    async def verify_async(self, user: str, password: str) -> bool:
        """:meth:`verify` in a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.verify, user, password)

    def __contains__(self, user: object) -> bool:
        return user in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def __repr__(self) -> str:
        return f"Credentials({len(self._hashes)} users)"


def main_hash_password(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``socks64 hash-password [USER]``: print a hash, or a ``user:hash`` users-file line.

    The password is the first line of standard input when that is not a terminal, else
    asked for twice with getpass. Returns the exit status.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = argparse.ArgumentParser(
        prog="socks64 hash-password",
        description="Hash a password with scrypt for the socks64 users file.",
    )
    parser.add_argument("user", nargs="?", help="print a complete 'user:hash' line")
    parser.add_argument("--scrypt-n", type=int, default=DEFAULT_N, metavar="N")
    parser.add_argument("--scrypt-r", type=int, default=DEFAULT_R, metavar="R")
    parser.add_argument("--scrypt-p", type=int, default=DEFAULT_P, metavar="P")
    args = parser.parse_args(argv)

    def error(message: str) -> int:
        print(f"socks64 hash-password: {message}", file=stderr)
        return 1

    user: str | None = args.user
    if user is not None:
        if user != user.strip() or user.startswith("#") or "\n" in user or "\r" in user:
            return error(
                "a user name cannot start with '#' or space, end with space, or hold a line break"
            )
        try:
            _check_field(user, "user name")
        except ValueError as exc:
            return error(str(exc))
    if stdin.isatty():
        password = getpass.getpass("Password: ", stream=stderr)
        if getpass.getpass("Again: ", stream=stderr) != password:
            return error("the passwords differ")
    else:
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
    try:
        encoded = hash_password(password, n=args.scrypt_n, r=args.scrypt_r, p=args.scrypt_p)
    except ValueError as exc:
        return error(str(exc))
    print(encoded if user is None else f"{user}:{encoded}", file=stdout)
    return 0
