"""``socks64 run``: one unmodified program through a socks64 gateway, by proxychains4.

The command runs under ``proxychains4 -f CONF``: its TCP connect() calls go to the gateway
as SOCKS5 CONNECTs and, with ``proxy_dns``, its name lookups become names the gateway
resolves (the program sees a placeholder address from 224.0.0.0/8), so an IPv4-only
program reaches an IPv6-only server by name. CONF is a private temporary file (mode 0600:
it may hold the SOCKS password), removed when the command exits.

What proxychains4 (4.16) does and does not accept, checked against its source:

- the first proxy must be an IP literal, IPv4 or IPv6 (``socks5 ::1 1080`` works): a
  host name given as the gateway is resolved here, once;
- the connection to the proxy itself is never subject to ``localnet``, so a gateway on
  loopback is reached although loopback destinations are excluded;
- user and password are whitespace-separated fields of at most 255 bytes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from functools import partial

__all__ = [
    "DEFAULT_GATEWAY",
    "RunError",
    "default_gateway",
    "parse_gateway",
    "render_config",
    "resolve_gateway",
    "run",
]

PROXYCHAINS = "proxychains4"
DEBIAN_PACKAGE = "proxychains4"
DEFAULT_GATEWAY = ("127.0.0.1", 1080)
GATEWAY_VAR = "SOCKS64_GATEWAY"
USER_VAR = "SOCKS64_USER"
PASSWORD_VAR = "SOCKS64_PASSWORD"
#: destinations that never go to the gateway: this machine's loopback (on the gateway,
#: 127.0.0.1 and ::1 would be the gateway itself)
LOCALNETS = ("127.0.0.0/255.0.0.0", "::1/128")
#: si_code of a signal the kernel sent, e.g. the terminal's ^C to the foreground group
_SI_KERNEL = 0x80
_FORWARDED = (signal.SIGINT, signal.SIGTERM)

log = logging.getLogger("socks64")


class RunError(Exception):
    """``socks64 run`` cannot start the command; ``status`` is the exit status to use."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def parse_gateway(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``; HOST may be a name (resolved when the config is
    written). ValueError when it is neither."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            sep = ""  # an IPv6 literal without brackets
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT ([IPv6]:PORT for an IPv6 address)")
    return host, int(port)


def default_gateway(environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """``$SOCKS64_GATEWAY`` when set, else 127.0.0.1:1080 (the default ``socks64 serve``)."""
    text = (os.environ if environ is None else environ).get(GATEWAY_VAR, "").strip()
    if not text:
        return DEFAULT_GATEWAY
    try:
        return parse_gateway(text)
    except ValueError as exc:
        raise RunError(f"{GATEWAY_VAR}: {exc}") from None


def resolve_gateway(gateway: tuple[str, int]) -> tuple[str, int]:
    """The gateway as the IP literal proxychains4 needs (it takes no name for the first
    proxy); a name is resolved with getaddrinfo, the first address is used."""
    host, port = gateway
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, socket.gaierror) else exc
            raise RunError(f"gateway {host!r} does not resolve: {reason}") from None
        address = ipaddress.ip_address(str(infos[0][4][0]))
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise RunError(f"gateway {address}: proxychains4 cannot use an address with a zone")
    return address.compressed, port


def _field(value: str, what: str) -> str:
    """A user or password as proxychains4 reads it: 1..255 bytes, no blanks."""
    if not 0 < len(value.encode()) <= 255 or any(c.isspace() or c == "\0" for c in value):
        raise RunError(f"{what}: 1..255 bytes without spaces (proxychains4 cannot use it)")
    return value


def render_config(
    gateway: tuple[str, int],
    *,
    user: str | None = None,
    password: str | None = None,
    quiet: bool = True,
    tcp_read_timeout_ms: int = 15000,
    tcp_connect_timeout_ms: int = 8000,
) -> str:
    """The proxychains4 config: one SOCKS5 proxy (the gateway), names resolved there."""
    host, port = resolve_gateway(gateway)
    if (user is None) != (password is None):
        raise RunError(f"{USER_VAR} and {PASSWORD_VAR} go together: set both or neither")
    if tcp_read_timeout_ms <= 0 or tcp_connect_timeout_ms <= 0:
        raise RunError("proxychains4 timeouts must be positive")
    proxy = f"socks5 {host} {port}"
    if user is not None and password is not None:
        proxy += f" {_field(user, USER_VAR)} {_field(password, PASSWORD_VAR)}"
    lines = [
        "# proxychains4 config written by socks64 run; removed when the command exits",
        "strict_chain",
        *(["quiet_mode"] if quiet else []),
        "proxy_dns",
        "remote_dns_subnet 224",
        f"tcp_read_time_out {tcp_read_timeout_ms}",
        f"tcp_connect_time_out {tcp_connect_timeout_ms}",
        *(f"localnet {network}" for network in LOCALNETS),
        "[ProxyList]",
        proxy,
    ]
    return "\n".join(lines) + "\n"


def run(
    gateway: tuple[str, int],
    argv: Sequence[str],
    *,
    user: str | None = None,
    password: str | None = None,
    verbose: bool = False,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run ``argv`` under proxychains4 through ``gateway``; its exit status (128 + the
    signal when a signal ended it). Credentials default to $SOCKS64_USER and
    $SOCKS64_PASSWORD. RunError when the command cannot be started."""
    env = dict(os.environ if environ is None else environ)
    if user is None and password is None:
        user, password = env.get(USER_VAR) or None, env.get(PASSWORD_VAR) or None
    env.pop(PASSWORD_VAR, None)  # the program has no use for it
    if not argv:
        raise RunError("no command given: socks64 run [--gateway HOST:PORT] -- COMMAND ...")
    search = env.get("PATH", os.defpath)
    wrapper = shutil.which(PROXYCHAINS, path=search)
    if wrapper is None:
        raise RunError(
            f"{PROXYCHAINS} is not installed (Debian package {DEBIAN_PACKAGE}: "
            f"apt-get install {DEBIAN_PACKAGE})",
            127,
        )
    if argv[0].startswith("-"):  # proxychains4 would read it as one of its own options
        raise RunError(f"{argv[0]!r} is not a command")
    if shutil.which(argv[0], path=search) is None:
        raise RunError(f"{argv[0]}: command not found", 127)
    text = render_config(gateway, user=user, password=password, quiet=not verbose)
    if verbose:
        env.pop("PROXYCHAINS_QUIET_MODE", None)
    fd, path = tempfile.mkstemp(prefix="socks64-run-", suffix=".conf")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        log.debug("gateway %s:%d, proxychains4 config %s", *gateway, path)
        flags = ["-f", path] if verbose else ["-q", "-f", path]
        return _supervise([wrapper, *flags, *argv], env)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _supervise(command: list[str], env: Mapping[str, str]) -> int:
    """Run ``command`` in this process group (it keeps the terminal) and wait for it.

    SIGINT and SIGTERM sent to this process are passed on to the child; a ^C from the
    terminal is not, since the terminal sent it to the child as well. The signals are
    blocked here and collected with sigtimedwait, which says who sent them.
    """
    watched = {*_FORWARDED, signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        try:
            child = subprocess.Popen(
                command,
                env=env,
                preexec_fn=partial(signal.pthread_sigmask, signal.SIG_SETMASK, previous),
            )
        except OSError as exc:
            raise RunError(f"cannot start {command[0]}: {exc}", 126) from None
        while child.poll() is None:
            info = signal.sigtimedwait(watched, 0.5)
            if info is None or info.si_signo not in _FORWARDED or info.si_code == _SI_KERNEL:
                continue
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(info.si_signo)
    finally:
        # the signals that came too late for the child must not hit this process later
        while signal.sigtimedwait(watched, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    status = child.returncode
    return 128 - status if status < 0 else status
