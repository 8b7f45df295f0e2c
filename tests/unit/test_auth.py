"""translator.auth: scrypt hashes, the users file, verification, hash-password."""

from __future__ import annotations

import base64
import getpass
import hashlib
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from translator.auth import (
    Credentials,
    CredentialsError,
    hash_password,
    main_hash_password,
    verify_password,
)

FAST = {"n": 2**10, "r": 8, "p": 1}  # cheap parameters; defaults are tested once


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return hash_password("correct horse", **FAST)


@pytest.fixture(scope="module")
def bob_hash() -> str:
    return hash_password("pässwörd", n=2**11, r=4, p=2)


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every scrypt call (its parameters and thread) while still computing it."""
    calls: list[dict[str, Any]] = []
    real: Callable[..., bytes] = hashlib.scrypt

    def spy(password: bytes, **kwargs: Any) -> bytes:
        calls.append({**kwargs, "thread": threading.get_ident()})
        return real(password, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", spy)
    return calls


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "users"
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


# --- hash_password / verify_password --------------------------------------------------


def test_default_parameters_round_trip() -> None:
    encoded = hash_password("s3cret")
    scheme, n, r, p, salt, digest = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) == 32
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)


def test_custom_parameters_round_trip(bob_hash: str) -> None:
    assert bob_hash.startswith("scrypt$2048$4$2$")
    assert verify_password("pässwörd", bob_hash)
    assert not verify_password("passwort", bob_hash)


def test_same_password_gets_a_fresh_salt() -> None:
    first, second = hash_password("x", **FAST), hash_password("x", **FAST)
    assert first != second
    assert verify_password("x", first) and verify_password("x", second)


def test_rfc1929_password_length_limits() -> None:
    assert verify_password("é" * 127, hash_password("é" * 127, **FAST))  # 254 octets
    assert verify_password("a" * 255, hash_password("a" * 255, **FAST))
    for bad in ["", "a" * 256, "é" * 128]:
        with pytest.raises(ValueError, match=r"1\.\.255 octets"):
            hash_password(bad, **FAST)


def test_verify_rejects_passwords_rfc1929_cannot_carry(alice_hash: str) -> None:
    assert not verify_password("", alice_hash)
    assert not verify_password("a" * 256, alice_hash)


@pytest.mark.parametrize(
    "params", [{"n": 1000}, {"n": 1}, {"r": 0}, {"p": 0}, {"n": 2**20, "r": 8}]
)
def test_bad_scrypt_parameters(params: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="scrypt"):
        hash_password("x", **{**FAST, **params})


def valid_parts() -> list[str]:
    return hash_password("x", **FAST).split("$")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda parts: ["bcrypt", *parts[1:]],
        lambda parts: parts[:5],
        lambda parts: [*parts, "extra"],
        lambda parts: [parts[0], "1000", *parts[2:]],  # N not a power of two
        lambda parts: [parts[0], "-1024", *parts[2:]],
        lambda parts: [parts[0], parts[1], "8x", *parts[3:]],
        lambda parts: [*parts[:4], "!!notbase64", parts[5]],
        lambda parts: [*parts[:5], "c2hvcnQ="],  # hash of 5 bytes
        lambda parts: [*parts[:4], "", parts[5]],
    ],
)
def test_malformed_hash_is_an_error(mutate: Callable[[list[str]], list[str]]) -> None:
    with pytest.raises(ValueError):
        verify_password("x", "$".join(mutate(valid_parts())))


# --- Credentials ----------------------------------------------------------------------


def test_load_and_verify(tmp_path: Path, alice_hash: str, bob_hash: str) -> None:
    path = write(
        tmp_path,
        f"# socks64 users\n\nalice:{alice_hash}\r\n   # indented comment\n  b:o:b : {bob_hash}  \n",
    )
    credentials = Credentials.load(path)
    assert len(credentials) == 2
    assert "alice" in credentials and "b:o:b" in credentials
    assert "bob" not in credentials
    assert credentials.verify("alice", "correct horse")
    assert not credentials.verify("alice", "wrong horse")
    assert credentials.verify("b:o:b", "pässwörd")
    assert not credentials.verify("alice", "pässwörd")  # another user's password
    assert not credentials.verify("nobody", "correct horse")
    assert "correct" not in repr(credentials) and alice_hash not in repr(credentials)


def test_load_accepts_str_path_and_empty_file(tmp_path: Path) -> None:
    credentials = Credentials.load(str(write(tmp_path, "# nobody yet\n")))
    assert len(credentials) == 0
    assert not credentials.verify("alice", "x")


def test_unknown_user_costs_a_full_scrypt(
    tmp_path: Path, alice_hash: str, scrypt_calls: list[dict[str, Any]]
) -> None:
    credentials = Credentials.load(write(tmp_path, f"alice:{alice_hash}\n"))
    assert not credentials.verify("alice", "wrong")
    assert not credentials.verify("mallory", "wrong")
    known, unknown = scrypt_calls
    assert (unknown["n"], unknown["r"], unknown["p"]) == (known["n"], known["r"], known["p"])
    assert unknown["dklen"] == known["dklen"]


async def test_verify_async_runs_in_a_worker_thread(
    tmp_path: Path, alice_hash: str, scrypt_calls: list[dict[str, Any]]
) -> None:
    credentials = Credentials.load(write(tmp_path, f"alice:{alice_hash}\n"))
    assert await credentials.verify_async("alice", "correct horse")
    assert not await credentials.verify_async("alice", "nope")
    assert not await credentials.verify_async("eve", "correct horse")
    assert len(scrypt_calls) == 3
    assert all(call["thread"] != threading.get_ident() for call in scrypt_calls)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        Credentials({"alice": "plaintext"})
    with pytest.raises(ValueError):
        Credentials({"": hash_password("x", **FAST)})


@pytest.mark.parametrize(
    ("lines", "line_number", "message"),
    [
        (["# ok", "", "alice:hunter2"], 3, "plaintext"),
        (["alice:{alice}", "bob:{alice}", "alice:{alice}"], 3, "duplicate user 'alice'"),
        (["alice {alice}"], 1, "expected 'user:scrypt"),
        (["alice:{alice}", ":{alice}"], 2, "expected 'user:scrypt"),
        (["x" * 256 + ":{alice}"], 1, "1..255 octets"),
        (["alice:scrypt$1024$8$1$c2FsdA=="], 1, "6 '$'-separated fields"),
        (["alice:scrypt$1000$8$1$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA=="], 1, "power of two"),
        (["alice:scrypt$1024$8$1$***$aGFzaGhhc2hoYXNoaGFzaA=="], 1, "base64"),
        (["alice:{alice}", "", "", "bob:"], 4, "plaintext"),
    ],
)
def test_bad_file_reports_path_and_line(
    tmp_path: Path, alice_hash: str, lines: list[str], line_number: int, message: str
) -> None:
    path = write(tmp_path, "\n".join(lines).replace("{alice}", alice_hash) + "\n")
    with pytest.raises(CredentialsError) as caught:
        Credentials.load(path)
    assert str(caught.value).startswith(f"{path}:{line_number}: ")
    assert message in str(caught.value)


def test_bad_utf8_reports_line(tmp_path: Path, alice_hash: str) -> None:
    path = write(tmp_path, f"alice:{alice_hash}\n".encode() + b"b\xffb:" + alice_hash.encode())
    with pytest.raises(CredentialsError, match=rf"^{path}:2: not valid UTF-8"):
        Credentials.load(path)


@pytest.mark.parametrize(
    ("secret", "fragments"),
    [
        ("hunter2", ["hunter2"]),
        ("pa55:w0rd:zz", ["pa55", "w0rd"]),
        ("scrypt-ish$s3kr1t", ["s3kr1t"]),
    ],
)
def test_plaintext_error_does_not_echo_the_password(
    tmp_path: Path, secret: str, fragments: list[str]
) -> None:
    path = write(tmp_path, f"alice:{secret}\n")
    with pytest.raises(CredentialsError) as caught:
        Credentials.load(path)
    message = str(caught.value).removeprefix(f"{path}:1: ")
    assert "plaintext" in message and "'alice'" in message
    for fragment in fragments:
        assert fragment not in message


def test_missing_file_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Credentials.load(tmp_path / "absent")


# --- socks64 hash-password ------------------------------------------------------------


class TtyInput(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_main(argv: list[str], stdin: io.StringIO) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    status = main_hash_password(argv, stdin=stdin, stdout=stdout, stderr=stderr)
    return status, stdout.getvalue(), stderr.getvalue()


def test_hash_password_cli_prints_a_users_file_line(tmp_path: Path) -> None:
    status, out, err = run_main(["alice", "--scrypt-n", "1024"], io.StringIO("open sesame\n"))
    assert (status, err) == (0, "")
    assert out.startswith("alice:scrypt$1024$8$1$") and out.endswith("\n")
    credentials = Credentials.load(write(tmp_path, out))
    assert credentials.verify("alice", "open sesame")
    assert not credentials.verify("alice", "open sesame\n")


def test_hash_password_cli_without_user_prints_the_hash() -> None:
    status, out, _ = run_main(
        ["--scrypt-n", "2048", "--scrypt-r", "2", "--scrypt-p", "3"], io.StringIO("pw\r\n")
    )
    assert status == 0
    encoded = out.strip()
    assert encoded.startswith("scrypt$2048$2$3$")
    assert verify_password("pw", encoded)


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["alice"], "", "1..255 octets"),
        (["alice"], "\n", "1..255 octets"),
        (["#alice"], "pw\n", "cannot start with '#'"),
        ([" alice"], "pw\n", "cannot start with '#' or space"),
        (["x" * 256], "pw\n", "1..255 octets"),
        (["alice", "--scrypt-n", "1000"], "pw\n", "power of two"),
    ],
)
def test_hash_password_cli_errors(argv: list[str], stdin: str, message: str) -> None:
    status, out, err = run_main(argv, io.StringIO(stdin))
    assert status == 1 and out == ""
    assert message in err


def test_hash_password_cli_asks_twice_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["tty pw", "tty pw"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt, stream=None: next(answers))
    status, out, _ = run_main(["alice", "--scrypt-n", "1024"], TtyInput())
    assert status == 0
    assert verify_password("tty pw", out.strip().split(":", 1)[1])


def test_hash_password_cli_terminal_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["one", "two"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt, stream=None: next(answers))
    status, out, err = run_main(["alice"], TtyInput())
    assert (status, out) == (1, "")
    assert "differ" in err
