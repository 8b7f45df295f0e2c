"""A throwaway MIT Kerberos realm on loopback for the GSS-API (RFC 1961) tests: its own
directory, database, krb5.conf and KDC on a free 127.0.0.1 port, never the host's realm.

    with running_realm() as realm:               # KDC started, answering kinit
        realm.add_principal("rcmd/localhost")    # random key
        realm.add_principal("alice", "pw")
        realm.keytab(path, "rcmd/localhost")     # the gateway's keytab
        realm.kinit("alice", "pw", ccache)       # FILE ccache
        env = {**os.environ, **realm.env}        # for anything that uses Kerberos

Nothing may read /etc/krb5.conf (it names a real KDC): every process, and this process
while it uses the ``gssapi`` package, runs with ``realm.env`` (``KRB5_CONFIG`` etc.).
:func:`kerberos_lab` sets that in ``os.environ`` for its lifetime.

The krb5.conf has ``clockskew = 3`` so that expiry shows within seconds (the default
300 s skew would hide it) while a token still has seconds to spare on a loaded machine;
one accepted more than 3 s after it was built is refused ("Clock skew too great"), and
the replay cache (in the realm directory) refuses a token accepted twice ("Request is a
replay").

An expired ticket, for a client test:

    start = time.monotonic()
    ccache = realm.short_lived_ccache("alice", "pw", path, seconds=2)
    token = <gss init_sec_context with that ccache, at once>
    time.sleep(start + 2 + EXPIRY_MARGIN - time.monotonic())
    <send token>                  # the acceptor refuses it: "Ticket expired"

MIT's initiator refuses an expired credential locally ("Ticket expired" from
init_sec_context), so the token has to be built before expiry and sent after. The
acceptor says "Ticket expired" once now > end + clockskew; in between (from ~3 s after
the token was built) it says "Clock skew too great".

The KDC is killed and the directory removed on leaving, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT = 10.0  # seconds for krb5kdc to answer a kinit
STOP_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
# Seconds after a short_lived_ccache(seconds=s) ends before a token built from it is
# refused as "Ticket expired": clockskew (3 s), whole-second ticket times (1 s), slack.
EXPIRY_MARGIN = 4.5

TOOLS = ("krb5kdc", "kdb5_util", "kadmin.local", "kinit")
# Debian packages that provide TOOLS, for skip and fail messages.
DEBIAN_PACKAGES = "krb5-kdc, krb5-admin-server, krb5-user"
# Variables that would point Kerberos at the host's caches, keytabs or config.
_HOST_VARIABLES = (
    "KRB5_CONFIG",
    "KRB5_KDC_PROFILE",
    "KRB5CCNAME",
    "KRB5_KTNAME",
    "KRB5_CLIENT_KTNAME",
    "KRB5RCACHEDIR",
    "KRB5RCACHETYPE",
    "KRB5RCACHENAME",
    "KRB5_TRACE",
)


def krb5_tool(name: str) -> str | None:
    """Where a Kerberos program is (PATH, or /usr/sbin and /usr/bin for a non-root PATH)."""
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in ("/usr/sbin", "/usr/bin"):
        if Path(directory, name).is_file():
            return str(Path(directory, name))
    return None


def missing_tools() -> list[str]:
    return [name for name in TOOLS if krb5_tool(name) is None]


def _free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (the KDC listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def _tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Realm:
    """One MIT realm in ``directory``; its KDC listens on 127.0.0.1:``port`` only."""

    def __init__(self, directory: Path, name: str, port: int) -> None:
        self.directory = directory
        self.name = name
        self.port = port
        self.krb5_conf = directory / "krb5.conf"
        self.kdc_conf = directory / "kdc.conf"
        self.rcache_dir = directory / "rcache"
        self._process: subprocess.Popen[bytes] | None = None
        self._counter = 0

    @property
    def env(self) -> dict[str, str]:
        """The variables every Kerberos user must run with (no KRB5CCNAME: pass one)."""
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            "KRB5RCACHEDIR": str(self.rcache_dir),
        }

    @property
    def log(self) -> Path:
        return self.directory / "kdc.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def principal(self, name: str) -> str:
        return name if "@" in name else f"{name}@{self.name}"

    def write_config(self) -> None:
        """kdc.conf and krb5.conf: loopback only, no DNS, no reverse lookups."""
        self.rcache_dir.mkdir(exist_ok=True)
        d, kdc = self.directory, f"127.0.0.1:{self.port}"
        self.kdc_conf.write_text(
            f"[kdcdefaults]\n kdc_listen = {kdc}\n kdc_tcp_listen = {kdc}\n\n"
            f"[realms]\n {self.name} = {{\n"
            f"  database_name = {d}/principal\n"
            f"  key_stash_file = {d}/stash\n"
            f"  acl_file = {d}/kadm5.acl\n"
            f"  kdc_listen = {kdc}\n  kdc_tcp_listen = {kdc}\n"
            f"  kadmind_listen = 127.0.0.1:{self.port}\n"  # never started
            "  max_life = 10h\n  max_renewable_life = 0\n }\n\n"
            f"[logging]\n kdc = FILE:{d}/kdc.log\n"
            f" admin_server = FILE:{d}/kadmind.log\n default = FILE:{d}/others.log\n"
        )
        (d / "kadm5.acl").write_text("")
        self.krb5_conf.write_text(
            "[libdefaults]\n"
            f" default_realm = {self.name}\n"
            " dns_lookup_kdc = false\n dns_lookup_realm = false\n"
            " dns_canonicalize_hostname = false\n rdns = false\n"
            ' qualify_shortname = ""\n'  # never append the resolver's search domain
            " clockskew = 3\n ticket_lifetime = 1h\n forwardable = true\n"
            f" default_ccache_name = FILE:{d}/default.ccache\n"
            f" default_keytab_name = FILE:{d}/default.keytab\n"
            f" default_client_keytab_name = FILE:{d}/client.keytab\n\n"
            f"[realms]\n {self.name} = {{\n  kdc = {kdc}\n"
            f"  admin_server = 127.0.0.1:{self.port}\n }}\n\n"
            f"[domain_realm]\n localhost = {self.name}\n .localhost = {self.name}\n"
        )

    def run(self, *args: str, input: str | None = None, ccache: Path | None = None) -> str:
        """Run a Kerberos program in this realm's environment; its output, or raise."""
        env = {k: v for k, v in os.environ.items() if k not in _HOST_VARIABLES}
        env.update(self.env)
        env["KRB5CCNAME"] = f"FILE:{ccache or self.directory / 'default.ccache'}"
        program = krb5_tool(args[0]) or args[0]
        done = subprocess.run(
            [program, *args[1:]],
            input=input,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def create_database(self) -> None:
        self.run("kdb5_util", "create", "-W", "-s", "-r", self.name, "-P", secrets.token_hex(16))

    def add_principal(self, name: str, password: str | None = None) -> str:
        """Add ``name`` (random key when no password); its full name."""
        key = ["-pw", password] if password is not None else ["-randkey"]
        self.run("kadmin.local", "-r", self.name, "-q", " ".join(["addprinc", *key, name]))
        return self.principal(name)

    def keytab(self, path: Path, *principals: str) -> Path:
        """Write the principals' current keys (not new ones) to the keytab ``path``."""
        for name in principals:
            query = f"ktadd -k {path} -norandkey {self.principal(name)}"
            self.run("kadmin.local", "-r", self.name, "-q", query)
        return path

    def kinit(
        self, principal: str, password: str, ccache: Path, lifetime: str | None = None
    ) -> Path:
        """Initial tickets for ``principal`` into the FILE ccache ``ccache``."""
        args = ["kinit", "-c", f"FILE:{ccache}"]
        if lifetime is not None:
            args += ["-l", lifetime]
        self.run(*args, self.principal(principal), input=password + "\n", ccache=ccache)
        return ccache

    def short_lived_ccache(
        self, principal: str, password: str, ccache: Path, seconds: int = 2
    ) -> Path:
        """A ccache whose TGT (and so every service ticket) ends ``seconds`` from now:
        build a token from it at once, send it ``seconds + EXPIRY_MARGIN`` later."""
        return self.kinit(principal, password, ccache, lifetime=f"{seconds}s")

    def new_path(self, stem: str) -> Path:
        """A fresh file name inside the realm directory (not created)."""
        self._counter += 1
        return self.directory / f"{stem}-{self._counter}"

    def start(self) -> None:
        """Start krb5kdc in the foreground (its own process) and wait until kinit works."""
        if self.running:
            raise RuntimeError("krb5kdc is already running")
        env = {k: v for k, v in os.environ.items() if k not in _HOST_VARIABLES}
        env.update(self.env)
        self._process = subprocess.Popen(
            [krb5_tool("krb5kdc") or "krb5kdc", "-n", "-r", self.name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        probe_password = secrets.token_hex(12)
        self.add_principal("socks64-probe", probe_password)
        deadline = time.monotonic() + START_TIMEOUT
        while not _tcp_answers(self.port):
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"krb5kdc exited on start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"krb5kdc did not listen in {START_TIMEOUT} s")
            time.sleep(0.01)
        try:
            self.kinit("socks64-probe", probe_password, self.directory / "probe.ccache")
        except RuntimeError as error:
            self.stop()
            raise RuntimeError(f"{error}\n{self._log_tail()}") from error

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(STOP_TIMEOUT)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running_realm(base: Path | None = None, realm: str = "SOCKS64.TEST") -> Iterator[Realm]:
    """A realm with its database made and its KDC answering; killed and removed after."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed ({DEBIAN_PACKAGES})")
    directory = Path(tempfile.mkdtemp(prefix="socks64-krb5-", dir=base))
    started: Realm | None = None
    try:
        for attempt in range(5):
            # The probe's port is free now; another process may take it before the
            # KDC binds it, so a failed start is retried on another port (and database).
            started = Realm(directory / f"r{attempt}", realm, _free_port())
            started.directory.mkdir()
            started.write_config()
            started.create_database()
            try:
                started.start()
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        assert started is not None
        yield started
    finally:
        if started is not None:
            started.stop()
        shutil.rmtree(directory, ignore_errors=True)


GATEWAY_SERVICE = "rcmd/localhost"
OTHER_SERVICE = "HTTP/localhost"
USERS = ("alice", "bob")


class KerberosLab:
    """The session's realm with the gateway's service, a foreign service, two users
    with tickets, the gateway's keytab (rcmd/localhost only) and an empty ccache."""

    def __init__(self, realm: Realm) -> None:
        self.realm = realm
        self.passwords = {user: secrets.token_hex(12) for user in USERS}
        for service in (GATEWAY_SERVICE, OTHER_SERVICE):
            realm.add_principal(service)
        for user, password in self.passwords.items():
            realm.add_principal(user, password)
        self.keytab = realm.keytab(realm.directory / "gateway.keytab", GATEWAY_SERVICE)
        self.other_keytab = realm.keytab(realm.directory / "http.keytab", OTHER_SERVICE)
        self._ccaches = {user: self.fresh_ccache(user) for user in USERS}
        self.no_ticket_ccache = realm.directory / "no-ticket.ccache"  # never created

    def ccache(self, user: str) -> Path:
        """The session's shared FILE ccache of ``user`` (use as ``FILE:{path}``)."""
        return self._ccaches[user]

    def fresh_ccache(self, user: str, lifetime: str | None = None) -> Path:
        """A new ccache of ``user``'s own, for a test that changes or expires it."""
        path = self.realm.new_path(f"{user}.ccache")
        return self.realm.kinit(user, self.passwords[user], path, lifetime)

    def short_lived_ccache(self, user: str, seconds: int = 2) -> Path:
        path = self.realm.new_path(f"{user}-short.ccache")
        return self.realm.short_lived_ccache(user, self.passwords[user], path, seconds)

    def principal(self, name: str) -> str:
        return self.realm.principal(name)


@contextlib.contextmanager
def kerberos_lab(base: Path | None = None) -> Iterator[KerberosLab]:
    """A :class:`KerberosLab`, with this process's environment pointing at its realm
    (so the in-process gssapi package never reads /etc/krb5.conf or a host ccache);
    the environment is restored on leaving."""
    saved = {name: os.environ.get(name) for name in _HOST_VARIABLES}
    with running_realm(base) as realm:
        try:
            for name in _HOST_VARIABLES:
                os.environ.pop(name, None)
            os.environ.update(realm.env)
            yield KerberosLab(realm)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
