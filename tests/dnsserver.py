"""A throwaway dnsmasq on loopback for tests that need real DNS answers.

    with DnsServer(a={"v4.test": ["127.0.0.1"]}, aaaa={"v6.test": ["::1"]},
                   ptr={"127.0.0.1": "v4.test"}, ttl=300) as dns:
        resolver = Resolver(nameservers=[dns.address])   # "127.0.0.1:PORT"

dnsmasq answers only from the records given here: names under the "local" domains (by
default the last label of every name given, plus in-addr.arpa and ip6.arpa) that it does
not know are NXDOMAIN, a known name without the asked type is NODATA, and anything else is
REFUSED (there is no upstream). It never reads /etc/hosts or /etc/resolv.conf.

Records: ``a`` / ``aaaa`` become ``--host-record`` (which also answers PTR for those
addresses, unless ``ptr`` names them otherwise), ``ptr`` becomes ``--ptr-record``, ``cname``
becomes ``--cname``. ``ttl`` is the TTL of every record (dnsmasq's default is 0, which
no cache keeps); ``ttls`` overrides it per name. ``extra_args`` are passed through raw.

For pytest, import the fixture into a conftest: ``from tests.dnsserver import
dns_server_factory``; then ``dns = dns_server_factory(a={...})`` in a test, stopped at
teardown. Skips the test when dnsmasq is not installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from ipaddress import ip_address
from types import TracebackType
from typing import Any

import pytest

__all__ = ["DnsServer", "DnsServerError", "dns_server_factory", "ipv6_loopback_available"]

_START_ATTEMPTS = 5
_READY_TIMEOUT = 5.0
_QUERY_LINE = re.compile(r"query\[(\w+)\] (\S+) from")

Records = Mapping[str, Sequence[str] | str]


class DnsServerError(RuntimeError):
    """dnsmasq is missing or would not start."""


def ipv6_loopback_available() -> bool:
    """True when ::1 can be bound (some containers have no IPv6 loopback)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _as_list(values: Sequence[str] | str) -> list[str]:
    return [values] if isinstance(values, str) else list(values)


def _free_port(hosts: Sequence[tuple[socket.AddressFamily, str]]) -> int:
    """A port that is free for both UDP and TCP on every host (racy, so callers retry)."""
    for _ in range(50):
        with socket.socket(hosts[0][0], socket.SOCK_DGRAM) as first:
            first.bind((hosts[0][1], 0))
            port: int = first.getsockname()[1]
            try:
                with contextlib.ExitStack() as stack:
                    for family, host in hosts:
                        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                            if (family, host, kind) == (*hosts[0], socket.SOCK_DGRAM):
                                continue
                            probe = stack.enter_context(socket.socket(family, kind))
                            probe.bind((host, port))
            except OSError:
                continue
            return port
    raise DnsServerError("no free port found on loopback")


class DnsServer:
    """dnsmasq serving fixed records on 127.0.0.1 (and ::1) at a free port."""

    def __init__(
        self,
        *,
        a: Records | None = None,
        aaaa: Records | None = None,
        ptr: Mapping[str, str] | None = None,
        cname: Mapping[str, str] | None = None,
        ttl: int = 0,
        ttls: Mapping[str, int] | None = None,
        local_domains: Sequence[str] | None = None,
        ipv6: bool | None = None,
        extra_args: Sequence[str] = (),
        executable: str = "dnsmasq",
    ) -> None:
        """``ipv6``: also listen on ::1 (None: when ::1 is available)."""
        self.a = {name: _as_list(v) for name, v in (a or {}).items()}
        self.aaaa = {name: _as_list(v) for name, v in (aaaa or {}).items()}
        self.ptr = dict(ptr or {})
        self.cname = dict(cname or {})
        self.ttl = ttl
        self.ttls = dict(ttls or {})
        self.local_domains = list(local_domains) if local_domains is not None else None
        self.ipv6 = ipv6_loopback_available() if ipv6 is None else ipv6
        self.extra_args = list(extra_args)
        self.executable = executable
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: str | None = None

    # -- addresses -------------------------------------------------------------------
    @property
    def address(self) -> str:
        """ "127.0.0.1:PORT", the form Resolver(nameservers=...) takes."""
        return f"{self.host}:{self._require_port()}"

    @property
    def address6(self) -> str:
        """ "[::1]:PORT" (only when listening on IPv6)."""
        if not self.ipv6:
            raise DnsServerError("this DnsServer does not listen on ::1")
        return f"[::1]:{self._require_port()}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _require_port(self) -> int:
        if self.port is None:
            raise DnsServerError("DnsServer not started")
        return self.port

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> DnsServer:
        """Start dnsmasq; after a stop(), it comes back on the same port."""
        if self.running:
            return self
        if shutil.which(self.executable) is None:
            raise DnsServerError(f"{self.executable} not found")
        hosts = [(socket.AF_INET, "127.0.0.1")]
        if self.ipv6:
            hosts.append((socket.AF_INET6, "::1"))
        keep_port = self.port is not None
        failure = ""
        for _ in range(_START_ATTEMPTS):
            if not keep_port:
                self.port = _free_port(hosts)
            failure = self._spawn()
            if not failure:
                return self
        raise DnsServerError(f"dnsmasq did not start: {failure}")

    def stop(self) -> None:
        """Stop dnsmasq (idempotent). The port is kept for a later start()."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def close(self) -> None:
        """Stop and remove the log file."""
        self.stop()
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._log_path)
            self._log_path = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- observation -----------------------------------------------------------------
    def log(self) -> str:
        """Everything dnsmasq logged so far (queries included)."""
        if self._log_path is None:
            return ""
        with open(self._log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def queries(self) -> list[tuple[str, str]]:
        """(type, name) of every query received, in order, e.g. ("AAAA", "v6.test")."""
        return [(m.group(1), m.group(2)) for m in _QUERY_LINE.finditer(self.log())]

    # -- internals -------------------------------------------------------------------
    def arguments(self) -> list[str]:
        """The dnsmasq command line (without the executable)."""
        port = self._require_port()
        args = [
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--pid-file=",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            f"--port={port}",
            "--cache-size=0",
            f"--local-ttl={self.ttl}",
            "--log-facility=-",
            "--log-queries",
        ]
        if self.ipv6:
            args.append("--listen-address=::1")
        for domain in self._local_domains():
            args.append(f"--local=/{domain}/")
        for records in (self.a, self.aaaa):
            for name, addresses in records.items():
                suffix = f",{self.ttls[name]}" if name in self.ttls else ""
                args.extend(f"--host-record={name},{address}{suffix}" for address in addresses)
        for address, name in self.ptr.items():
            pointer = address if address.endswith(".arpa") else ip_address(address).reverse_pointer
            args.append(f"--ptr-record={pointer},{name}")
        for alias, target in self.cname.items():
            suffix = f",{self.ttls[alias]}" if alias in self.ttls else ""
            args.append(f"--cname={alias},{target}{suffix}")
        return args + self.extra_args

    def _local_domains(self) -> list[str]:
        if self.local_domains is not None:
            return self.local_domains
        names = [*self.a, *self.aaaa, *self.cname]
        tlds = sorted({name.rstrip(".").rsplit(".", 1)[-1] for name in names} | {"test"})
        return [*tlds, "in-addr.arpa", "ip6.arpa"]

    def _spawn(self) -> str:
        """Start one dnsmasq; "" when it answers, else why it did not."""
        if self._log_path is None:
            handle, self._log_path = tempfile.mkstemp(prefix="dnsmasq-", suffix=".log")
            os.close(handle)
        with open(self._log_path, "ab") as log:
            process = subprocess.Popen(
                [self.executable, *self.arguments()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._process = process
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                return f"exit status {process.returncode}: {self.log()[-500:]}"
            try:
                with socket.create_connection((self.host, self._require_port()), timeout=0.5):
                    return ""
            except OSError:
                time.sleep(0.02)
        self.stop()
        return "not answering on TCP after 5 s"


@pytest.fixture
def dns_server_factory() -> Iterator[Callable[..., DnsServer]]:
    """Factory fixture: ``dns_server_factory(**DnsServer kwargs)`` -> a started DnsServer."""
    servers: list[DnsServer] = []

    def make(**kwargs: Any) -> DnsServer:
        server = DnsServer(**kwargs)
        servers.append(server)
        try:
            return server.start()
        except DnsServerError as exc:
            if shutil.which(server.executable) is None and os.environ.get("CI") != "true":
                pytest.skip(str(exc))
            raise

    yield make
    for server in servers:
        server.close()
