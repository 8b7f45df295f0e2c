"""``socks64 serve`` as a service: start, tell systemd, drop root, reload, stop gracefully.

Order at start: raise the descriptor limit, open everything that needs root (listeners,
the netlink socket, the users file, the metrics endpoint), then drop to ``user:`` /
``group:`` keeping only the capabilities a feature still needs, then READY=1.
SIGHUP reloads (RELOADING=1 ... READY=1); SIGTERM and SIGINT stop: no new connections,
``shutdown_grace`` seconds for the running sessions, then the rest are closed; exit 0.
While stopping, another SIGTERM or SIGINT ends the grace at once and SIGHUP is ignored.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import gc
import importlib
import logging
import os
import pkgutil
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from translator.config import Config, Endpoint
from translator.gateway.server import Gateway

from . import fdlimit, privileges
from .notify import Notifier, listen_fds

log = logging.getLogger("socks64")

_STATUS_INTERVAL = 10.0  # seconds between STATUS= updates to systemd


def kept_capabilities(config: Config) -> set[int]:
    """What a feature still needs after the drop (and the process has to give)."""
    wanted = {
        privileges.CAP_NET_ADMIN,  # IP_TRANSPARENT: end connections of a removed address
        privileges.CAP_NET_BIND_SERVICE,  # a reload may add a listener below port 1024
    }
    if config.outbound.interface is not None:
        wanted.add(privileges.CAP_NET_RAW)  # SO_BINDTODEVICE on outbound sockets
    return wanted & privileges.current_capabilities()


def inherited_capabilities(config: Config) -> set[int]:
    """What programs the gateway runs need: nft removes the interception at stop."""
    if config.transparent.interfaces:
        return {privileges.CAP_NET_ADMIN} & privileges.current_capabilities()
    return set()


def prepare_state_directory(config: Config) -> str | None:
    """Before the drop to ``user:``: a state file (the ID table's, the pool's) is rewritten
    (a new file renamed over it) by that user, so its directory must be the user's. A
    directory named ``socks64`` (/var/lib/socks64; systemd's StateDirectory=socks64) is
    handed to the user; any other is left alone and must already be writable by it.
    Returns what was done, for the log."""
    paths = [config.addrmap.state_file]  # the ID table's, saved by this process
    if config.transparent.enabled:
        paths.append(config.transparent.state_file)
    if config.user is None:
        return None
    uid, gid = privileges.account_ids(config.user, config.group)
    for path in paths:
        if path is None:
            continue
        directory = Path(path).parent
        if directory.name != "socks64":
            continue
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)  # no StateDirectory=
        if directory.stat().st_uid != uid:
            os.chown(directory, uid, gid)
            return f"state directory {directory} handed to uid {uid}"
    return None


#: Imported only on first use, by the standard library, on paths a running gateway takes.
#: After the drop to ``user:`` the interpreter's own files may be unreadable (a Python
#: under /root), so these are imported before it (see `preload_modules`).
LAZY_MODULES = (
    "concurrent.futures.thread",  # the loop's default executor: asyncio.to_thread for a
    # password check or the netlink thread's join at stop, getaddrinfo on plain asyncio
    "importlib.readers",  # resources.files(): the embedded config, re-read on SIGHUP
    "dns.asyncquery",  # DNS46 forwarding, and the asyncio backend it picks at first use
    "dns._asyncio_backend",
)
#: Codecs looked up by name on first use (encodings.NAME, and what that imports).
LAZY_CODECS = (
    "idna",  # every getaddrinfo() of a str host: uvloop's sock_connect (each CONNECT) and
    # create_datagram_endpoint (each UDP ASSOCIATE), socket.getaddrinfo; normalize_name
)
#: Our own packages: imported whole, so no module of ours is first imported later. And
#: dnspython's record types, which it imports by name when DNS46 first meets a type.
OWN_PACKAGES = ("translator", "addrmap", "dns.rdtypes")


def preload_modules(packages: Iterable[str] = OWN_PACKAGES) -> None:
    """Import now what a running gateway would otherwise import later: every module of
    ``packages``, the lazily imported standard modules and codecs. For the privilege drop:
    afterwards an import may fail for want of read access (PermissionError, ImportError,
    or LookupError for a codec), in the middle of a session."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    names: list[str] = []
    for name in packages:
        package = importlib.import_module(name)
        names.extend(info.name for info in pkgutil.walk_packages(package.__path__, f"{name}."))
    for name in [*names, *LAZY_MODULES]:
        if main is not None and name == main.name:
            continue  # running as __main__ (python -m translator.cli): not twice
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional piece the gateway does not use
            log.warning("cannot preload %s before dropping privileges: %s", name, exc)
    for codec in LAZY_CODECS:
        codecs.lookup(codec)  # the codec registry caches it: no import on the next lookup


class LateImportWarning:
    """A meta path finder for after the drop that finds nothing: it names each module first
    imported after it (one `preload_modules` missed), which may fail where the interpreter
    is unreadable, so that it shows in the log where it is readable too."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname not in self.seen:
            self.seen.add(fullname)
            log.warning(
                "module %s imported after dropping privileges (preload it in %s)",
                fullname,
                __name__,
            )


#: Young objects between collections of the youngest generation (CPython: 700). Each
#: collection walks every live young object, which under load is the in-flight sessions'
#: (tens of thousands): at 700 that cost ~8 µs per session. Sessions rarely make cycles,
#: so collecting less often frees the same garbage for a few MB more at most.
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Once started: what start-up allocated (modules, config, metrics, the netlink
    table) lives as long as the process, so it leaves the collector's sight (a full
    collection then walks only what sessions allocate), and young collections are rarer."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def status_line(gateway: Gateway) -> str:
    endpoints = ", ".join(str(e) for e in gateway.endpoints) or "no listeners"
    return (
        f"{gateway.active_sessions} sessions, {len(gateway.ids)} ADDRESS IDs, "
        f"{len(gateway.services.udp_associations)} UDP associations; listening on {endpoints}"
    )


class Service:
    """One ``serve`` run: the gateway plus what runs it as a service."""

    def __init__(
        self,
        config: Config,
        load: Callable[[], Config],
        listen: list[Endpoint] | None = None,
        pid_file: str | None = None,
        *,
        gateway: Gateway | None = None,
        notifier: Notifier | None = None,
        adopted: list[socket.socket] | None = None,
    ) -> None:
        """``gateway``, ``notifier`` and ``adopted`` (listening sockets): a worker's, handed
        in by the worker process (see ``translator.service.worker``)."""
        self.config = config
        self.load = load
        self.listen = listen
        self.pid_file = Path(pid_file) if pid_file else None
        self.notifier = notifier or Notifier.from_env()
        self.gateway = gateway or Gateway(config)
        self.adopted = adopted
        self._stop = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False

    async def run(self) -> None:
        soft, _ = fdlimit.raise_nofile_limit()
        warning = fdlimit.capacity_warning(self.config.limits.max_clients, soft)
        if warning:
            log.warning("%s", warning)
        gateway = self.gateway
        loop = asyncio.get_running_loop()
        adopted = listen_fds() if self.adopted is None else self.adopted
        try:
            endpoints = await gateway.start(self.listen, adopted=adopted)
            for endpoint in endpoints:
                log.info("listening on %s", endpoint)
            if gateway.metrics_server is not None:
                log.info("metrics at http://%s/metrics", gateway.metrics_server.endpoint)
            if self.pid_file is not None:
                self.pid_file.write_text(f"{os.getpid()}\n", encoding="ascii")
            if self.config.user is not None:
                preload_modules()  # while the interpreter's files are still readable
                handed = prepare_state_directory(self.config)
                if handed:
                    log.info("%s", handed)
                log.info(
                    "%s",
                    privileges.drop_privileges(
                        self.config.user,
                        self.config.group,
                        kept_capabilities(self.config),
                        inherited_capabilities(self.config),
                    ),
                )
                if not any(isinstance(f, LateImportWarning) for f in sys.meta_path):
                    sys.meta_path.insert(0, LateImportWarning())
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            log.info("config %s; ready", self.config.source)
            tune_garbage_collector()
            self.notifier.ready(status_line(gateway))
            await self._serve_until_stopped()
        finally:
            # The signals keep a handler to the end: with the default action a SIGHUP
            # (`socks64 reload` from a cron job) would kill the draining gateway, and a
            # second SIGTERM would skip the cleanup. Now SIGHUP is ignored and a second
            # SIGTERM or SIGINT ends the grace at once.
            hurry = asyncio.Event()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, hurry.set)
            loop.add_signal_handler(signal.SIGHUP, _reload_ignored)
            if self._reloading is not None:  # it must not open listeners while we drain
                self._reloading.cancel()
                await asyncio.gather(self._reloading, return_exceptions=True)
            self.notifier.stopping()
            log.info("stopping")
            try:
                await self._drain(hurry)
            finally:
                await gateway.close()
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(signum)
                if self.pid_file is not None:
                    with contextlib.suppress(OSError):  # a dropped user may not remove it
                        self.pid_file.unlink()
                self.notifier.close()

    async def _drain(self, hurry: asyncio.Event) -> None:
        """``shutdown_grace`` for the running sessions, cut short by another stop signal."""
        gateway = self.gateway
        draining = asyncio.ensure_future(gateway.drain(gateway.config.shutdown_grace))
        hurried = asyncio.ensure_future(hurry.wait())
        try:
            await asyncio.wait((draining, hurried), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
            if not draining.done():
                draining.cancel()
                if hurry.is_set():
                    sessions = gateway.active_sessions
                    log.info("stop signal again: closing %d session(s) now", sessions)
            with contextlib.suppress(asyncio.CancelledError):
                await draining  # its own failure, if any, goes on to the caller

    async def _serve_until_stopped(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), _STATUS_INTERVAL)
            self.notifier.status(status_line(self.gateway))

    def request_reload(self) -> None:
        """SIGHUP: reload now, or once more after the reload that is running."""
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        while True:
            self._reload_again = False
            log.info("SIGHUP: reloading %s", self.gateway.config.source)
            self.notifier.reloading()
            try:
                await self.gateway.reload(self.load)
            except Exception:  # a bug must not leave systemd waiting for READY=1
                log.exception("reload failed, keeping the running config")
                self.gateway.metrics.config_reload(False)
            self.notifier.ready(status_line(self.gateway))
            if not self._reload_again:
                return


def _reload_ignored() -> None:
    log.info("SIGHUP while stopping: not reloading")


def send_reload(pid_file: str) -> int:
    """``socks64 reload``: SIGHUP to the pid in ``pid_file``."""
    try:
        pid = int(Path(pid_file).read_text(encoding="ascii").strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"socks64 reload: {pid_file}: {exc}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {pid}")
    return 0
