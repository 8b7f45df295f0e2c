"""``workers: N``: a supervisor process and N workers serving the same listeners.

The supervisor binds every listener once per worker with SO_REUSEPORT (the kernel spreads
new connections over the copies), passes each worker its copies and systemd's sockets,
and keeps them all open: a worker that dies is started again on the same sockets, and
connections that arrived meanwhile wait in the backlog. Only that worker's clients lose
their sessions.

The supervisor also holds the ADDRESS ID table for the memory backend (workers ask it
over their control links, see ``translator.idtable.supervised``), serves the metrics of
all workers merged, speaks to systemd (READY=1 once every worker is ready), forwards
SIGHUP (reload) and SIGTERM (drain) to every worker, and writes the pid file. Like
nginx's master it keeps root (when started so): it starts workers that are exactly like
the first ones, and each worker drops to ``user:`` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from addrmap import AddressTable
from translator.config import Config, ConfigError, Endpoint, load_config
from translator.gateway.listening import endpoint_of, listening_socket
from translator.idtable import GRACE, LocalIds
from translator.idtable.supervised import serve_request
from translator.metrics import table_metrics

from . import fdlimit, metricsmerge
from .control import ControlLink
from .notify import Notifier, listen_fds
from .worker import ENVIRONMENT, Handover

log = logging.getLogger("socks64")

_READY_TIMEOUT = 60.0  # seconds for every worker to start
_SCRAPE_WAIT = 2.0  # seconds a scrape waits for a worker's families
_QUICK_DEATH = 5.0  # a worker that dies sooner after its start is restarted with a backoff
_MAX_BACKOFF = 30.0
_STATUS_INTERVAL = 10.0


class _Worker:
    """One slot: its sockets, and the process serving them now."""

    def __init__(self, slot: int, sockets: list[socket.socket]) -> None:
        self.slot = slot
        self.sockets = sockets
        self.process: asyncio.subprocess.Process | None = None
        self.link: ControlLink | None = None
        self.ready = asyncio.Event()
        self.started = 0.0
        self.quick_deaths = 0
        self.last_status = ""

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


class Supervisor:
    """``socks64 serve`` with ``workers`` above 1."""

    def __init__(
        self,
        config: Config,
        count: int,
        *,
        config_path: str | None,
        listen: list[Endpoint] | None = None,
        pid_file: str | None = None,
        log_options: list[str] | None = None,
    ) -> None:
        self.config = config
        self.count = count
        self.config_path = config_path
        self.listen = listen
        self.pid_file = Path(pid_file) if pid_file else None
        self.log_options = log_options or []
        self.notifier = Notifier.from_env()
        self.workers: list[_Worker] = []
        self.shared: list[socket.socket] = []  # systemd's: every worker serves them
        self.ids: LocalIds | None = None
        self.restarts = 0
        self.stopping = False
        self.starting = True
        self._stop = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []
        self.metrics_server: Any = None
        self._reload_lock = asyncio.Lock()

    # -- start ------------------------------------------------------------------------------

    async def run(self) -> None:
        soft, _ = fdlimit.raise_nofile_limit()
        warning = fdlimit.capacity_warning(self.config.limits.max_clients * self.count, soft)
        if warning:
            log.warning("%s", warning)
        loop = asyncio.get_running_loop()
        try:
            self.shared = listen_fds()
            self._open_listeners()
            await self._start_table()
            await self._start_metrics()
            if self.pid_file is not None:
                self.pid_file.write_text(f"{os.getpid()}\n", encoding="ascii")
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._request_reload)
            for worker in self.workers:
                await self._spawn(worker)
                self._watchers.append(asyncio.create_task(self._watch(worker)))
            await self._wait_ready()
            self.starting = False
            endpoints = sorted({str(endpoint_of(s)) for w in self.workers for s in w.sockets})
            endpoints += [str(endpoint_of(s)) for s in self.shared]
            log.info(
                "%d workers ready (pids %s); listening on %s",
                self.count,
                ", ".join(str(w.pid) for w in self.workers),
                ", ".join(endpoints),
            )
            self.notifier.ready(self.status_line())
            await self._serve_until_stopped()
        finally:
            await self._shutdown()

    def _open_listeners(self) -> None:
        wanted = list(dict.fromkeys(self.listen or self.config.listen))
        adopted = {endpoint_of(s) for s in self.shared}
        wanted = [e for e in wanted if e not in adopted]
        for slot in range(self.count):
            self.workers.append(_Worker(slot, []))
        for endpoint in wanted:
            first = listening_socket(endpoint, reuse_port=True)
            self.workers[0].sockets.append(first)
            bound = Endpoint(endpoint.host, endpoint_of(first).port)  # port 0: the same port
            for worker in self.workers[1:]:
                worker.sockets.append(listening_socket(bound, reuse_port=True))

    async def _start_table(self) -> None:
        settings = self.config.addrmap
        if settings.redis_url is not None:
            return  # every worker talks to Redis itself
        table = AddressTable(
            clock=time.monotonic,
            ttl=settings.ttl + GRACE,  # see translator.idtable.cache
            quarantine=settings.quarantine,
            per_owner_quota=settings.per_owner,
            capacity=settings.capacity,
        )
        self.ids = LocalIds(table, state_file=settings.state_file)
        await self.ids.start()

    async def _start_metrics(self) -> None:
        endpoint = self.config.metrics.listen
        if endpoint is None:
            return
        from translator.net.exporter import MetricsServer

        self.metrics_server = MetricsServer(self, endpoint.host, endpoint.port)
        await self.metrics_server.start()
        log.info("metrics at http://%s/metrics", self.metrics_server.endpoint)

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listeners = [s.fileno() for s in [*worker.sockets, *self.shared]]
        handover = Handover(worker.slot, theirs.fileno(), tuple(listeners))
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        environ[ENVIRONMENT] = handover.encode()
        argv = [sys.executable, "-m", "translator.cli", *self.log_options, "worker"]
        if self.config_path is not None:
            argv += ["--config", self.config_path]
        worker.ready.clear()
        worker.link = ControlLink(ours, partial(self._on_message, worker))
        try:
            # A session of its own: Ctrl-C in a terminal reaches the supervisor only, which
            # stops the workers once (a second signal would cut their grace short).
            worker.process = await asyncio.create_subprocess_exec(
                *argv,
                env=environ,
                pass_fds=(theirs.fileno(), *listeners),
                start_new_session=True,
            )
        finally:
            theirs.close()
        worker.started = time.monotonic()
        await worker.link.start()

    async def _on_message(self, worker: _Worker, kind: str, payload: Any) -> Any:
        if kind.startswith("table."):
            if self.ids is None:
                raise ValueError("no table here: addrmap.backend is Redis")
            return serve_request(self.ids.table, kind, payload)
        if kind == "notify":
            for line in payload:
                if line == "READY=1":
                    worker.ready.set()
                elif line.startswith("STATUS="):
                    worker.last_status = line[len("STATUS=") :]
            return None
        raise ValueError(f"unknown message {kind!r}")

    async def _wait_ready(self) -> None:
        everyone: asyncio.Future[list[bool]] = asyncio.gather(
            *(w.ready.wait() for w in self.workers)
        )
        stopped: asyncio.Future[bool] = asyncio.ensure_future(self._stop.wait())
        try:
            either: list[asyncio.Future[Any]] = [everyone, stopped]
            await asyncio.wait(either, timeout=_READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            everyone.cancel()
        if not all(w.ready.is_set() for w in self.workers):
            late = [str(w.slot) for w in self.workers if not w.ready.is_set()]
            raise RuntimeError(f"worker(s) {', '.join(late)} did not start (see above)")

    # -- running ----------------------------------------------------------------------------

    async def _watch(self, worker: _Worker) -> None:
        """Restart the worker whenever it dies, until the supervisor stops."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if worker.link is not None:
                await worker.link.close()
            if self.stopping:
                return
            if self.starting:  # a worker that cannot start will not start on a retry
                log.error(
                    "worker %d (pid %d) exited with %s while starting",
                    worker.slot,
                    worker.process.pid,
                    _exit_text(code),
                )
                self._stop.set()
                return
            lived = time.monotonic() - worker.started
            worker.quick_deaths = worker.quick_deaths + 1 if lived < _QUICK_DEATH else 0
            delay = min(_MAX_BACKOFF, 0.5 * 2 ** worker.quick_deaths) if worker.quick_deaths else 0
            log.error(
                "worker %d (pid %d) exited with %s after %.1f s; its clients lost their "
                "sessions; starting it again%s",
                worker.slot,
                worker.process.pid,
                _exit_text(code),
                lived,
                f" in {delay:.1f} s" if delay else "",
            )
            self.restarts += 1
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self.stopping or self._stop.is_set():
                    return
            await self._spawn(worker)

    async def _serve_until_stopped(self) -> None:
        next_status = time.monotonic() + _STATUS_INTERVAL
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)
            if self.ids is not None:
                try:
                    await self.ids.maintain()
                except Exception:
                    log.exception("ID table maintenance failed")
            if time.monotonic() >= next_status:
                next_status += _STATUS_INTERVAL
                self.notifier.status(self.status_line())

    def status_line(self) -> str:
        alive = sum(1 for w in self.workers if w.ready.is_set())
        ids = len(self.ids) if self.ids is not None else "shared"
        return f"{alive}/{self.count} workers; {ids} ADDRESS IDs"

    def _request_reload(self) -> None:
        asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        """SIGHUP: every worker re-reads the config; READY=1 when all have answered."""
        async with self._reload_lock:
            log.info("SIGHUP: reloading %d workers", self.count)
            self._warn_fixed_settings()
            self.notifier.reloading()
            for worker in self.workers:
                worker.ready.clear()
                self._signal(worker, signal.SIGHUP)
            waits = [w.ready.wait() for w in self.workers if w.process is not None]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), _READY_TIMEOUT)
            self.notifier.ready(self.status_line())

    def _warn_fixed_settings(self) -> None:
        """What only the supervisor reads (its sockets, its table, its metrics endpoint)
        changes at a restart; the workers apply the rest of a reload."""
        try:
            new = load_config(self.config_path)
        except ConfigError:
            return  # each worker logs the error and keeps its config
        for section in ("listen", "workers", "metrics", "addrmap"):
            if getattr(new, section) != getattr(self.config, section):
                log.warning("reload: %s changes apply after a restart", section)

    @staticmethod
    def _signal(worker: _Worker, signum: int) -> None:
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    # -- metrics ----------------------------------------------------------------------------

    content_type = metricsmerge.CONTENT_TYPE

    async def render(self) -> bytes:
        """Every worker's families merged, plus the supervisor's own."""

        async def families(worker: _Worker) -> list[Metric]:
            if worker.link is None or not worker.ready.is_set():
                return []
            try:
                got: list[Metric] = await worker.link.call("metrics", wait=_SCRAPE_WAIT)
            except (ConnectionError, TimeoutError):
                return []
            return got

        gathered = await asyncio.gather(*(families(w) for w in self.workers))
        merged = metricsmerge.merge(gathered)
        if self.ids is not None:  # the table is here: its counters now, not as last flushed
            merged = self._with_table(merged)
        return metricsmerge.render([*merged, *self._own_metrics()])

    def _with_table(self, merged: list[Metric]) -> list[Metric]:
        assert self.ids is not None
        pinned = sum(  # pins are the workers' (a pin is a worker keeping an ID alive)
            sample.value
            for family in merged
            if family.name == "socks64_address_ids_pinned"
            for sample in family.samples
        )
        stats = self.ids.stats
        table = table_metrics(
            live=stats.live,
            pinned=int(pinned),
            quarantined=stats.quarantined,
            issued=stats.issued,
            freed=stats.freed,
            quota_refusals=stats.quota_refusals,
            capacity_refusals=stats.capacity_refusals,
        )
        names = {family.name for family in table}
        return [*(f for f in merged if f.name not in names), *table]

    def _own_metrics(self) -> list[Metric]:
        running = GaugeMetricFamily("socks64_workers", "Worker processes serving clients.")
        running.add_metric([], sum(1 for w in self.workers if w.ready.is_set()))
        restarts = CounterMetricFamily(
            "socks64_worker_restarts", "Workers started again after they died."
        )
        restarts.add_metric([], self.restarts)
        return [running, restarts]

    # -- stopping ---------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopping = True
        self.notifier.stopping()
        running = [w for w in self.workers if w.process is not None]
        if running:
            log.info("stopping %d workers", len(running))
        def hurry() -> None:  # a second stop signal ends the workers' grace at once
            for worker in running:
                self._signal(worker, signal.SIGTERM)

        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.add_signal_handler(signum, hurry)
        with contextlib.suppress(ValueError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: None)
        for worker in running:
            self._signal(worker, signal.SIGTERM)
        waits = [w.process.wait() for w in running if w.process is not None]
        try:
            await asyncio.wait_for(
                asyncio.gather(*waits), self.config.shutdown_grace + 10.0
            )
        except TimeoutError:
            for worker in running:
                self._signal(worker, signal.SIGKILL)
            await asyncio.gather(*(w.process.wait() for w in running if w.process))
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for worker in self.workers:
            if worker.link is not None:
                await worker.link.close()
            for sock in worker.sockets:
                sock.close()
        for sock in self.shared:
            sock.close()
        if self.ids is not None:
            await self.ids.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if self.pid_file is not None:
            with contextlib.suppress(OSError):
                self.pid_file.unlink()
        self.notifier.close()
        log.info("stopped")


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


