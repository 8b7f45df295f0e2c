"""One worker process of ``workers: N``: a whole gateway on the supervisor's sockets.

The supervisor starts ``socks64 worker`` with, in ``SOCKS64_WORKER``, its slot number, the
descriptor of its control link and those of the listening sockets it serves (its own
SO_REUSEPORT copy of each listener, plus systemd's sockets, which all workers share).
The worker runs the same service as a single process (privilege drop, reload on SIGHUP,
drain on SIGTERM), except that it opens no listener and no metrics endpoint of its own,
tells the supervisor (not systemd) when it is ready, and uses the supervisor's ID table
(or Redis) through a cache. It stops when the supervisor goes away.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from translator.config import Config, ConfigError, MetricsConfig, load_config
from translator.gateway.server import Gateway
from translator.idtable import CachedIds, Ids
from translator.idtable.setup import redis_ids
from translator.idtable.supervised import LinkAuthority

from .control import ControlLink
from .notify import Notifier
from .runner import Service

log = logging.getLogger("socks64")

ENVIRONMENT = "SOCKS64_WORKER"
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class Handover:
    """What the supervisor hands a worker: ``slot:control_fd:fd,fd,...``."""

    slot: int
    control: int
    listeners: tuple[int, ...]

    def encode(self) -> str:
        return f"{self.slot}:{self.control}:{','.join(map(str, self.listeners))}"

    @classmethod
    def decode(cls, text: str) -> Handover:
        slot, control, fds = text.split(":")
        return cls(int(slot), int(control), tuple(int(f) for f in fds.split(",") if f))


def worker_config(config: Config) -> Config:
    """A worker serves no metrics endpoint: the supervisor serves everyone's."""
    return dataclasses.replace(config, metrics=MetricsConfig(None))


class LinkNotifier(Notifier):
    """sd_notify lines go to the supervisor, which speaks to systemd for everyone."""

    def __init__(self, link: ControlLink) -> None:
        super().__init__(None)
        self.link = link

    @property
    def enabled(self) -> bool:
        return True

    def send(self, *lines: str) -> bool:
        self.link.notify("notify", list(lines))
        return True

    def close(self) -> None:
        return None


class WorkerService(Service):
    """The service of one worker: a gateway serving handed-over sockets."""

    def __init__(
        self,
        config: Config,
        load: Callable[[], Config],
        handover: Handover,
    ) -> None:
        self.handover = handover
        self.link = ControlLink(socket.socket(fileno=handover.control), self._on_request)
        sockets = [socket.socket(fileno=fd) for fd in handover.listeners]
        super().__init__(
            config,
            load,
            gateway=Gateway(config, ids=self._ids(config), own_listeners=False),
            notifier=LinkNotifier(self.link),
            adopted=sockets,
        )

    def _ids(self, config: Config) -> Ids:
        if config.addrmap.redis_url is not None:
            return redis_ids(config.addrmap)
        return CachedIds(LinkAuthority(self.link), ttl=config.addrmap.ttl, clock=time.monotonic)

    async def _on_request(self, kind: str, payload: Any) -> Any:
        if kind == "metrics":
            return list(self.gateway.metrics.registry.collect())
        raise ValueError(f"unknown request {kind!r}")

    async def run(self) -> None:
        await self.link.start()
        watcher = asyncio.get_running_loop().create_task(self._stop_with_supervisor())
        try:
            await super().run()
        finally:
            watcher.cancel()
            await self.link.close()

    async def _stop_with_supervisor(self) -> None:
        await self.link.closed.wait()
        log.warning("worker %d: the supervisor has gone; stopping", self.handover.slot)
        os.kill(os.getpid(), signal.SIGTERM)  # the same path as a stop signal


def _name_the_worker(slot: int) -> None:
    """Each log line says which worker wrote it: ``socks64.access[1]``."""

    def named(record: logging.LogRecord) -> bool:
        record.name = f"{record.name}[{slot}]"
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(named)


def worker_main(config_path: str | None, run_event_loop: Callable[[Any], None]) -> int:
    """``socks64 worker``: only ever started by the supervisor."""
    text = os.environ.pop(ENVIRONMENT, None)
    if text is None:
        log.error("socks64 worker is started by socks64 serve (workers: N), not by hand")
        return 2
    handover = Handover.decode(text)
    _name_the_worker(handover.slot)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)  # the supervisor killed: stop too

    def load() -> Config:
        return worker_config(load_config(config_path))

    try:
        config = load()
    except ConfigError as exc:
        log.error("worker %d: config %s: %s", handover.slot, config_path or "<default>", exc)
        return 2
    try:
        run_event_loop(WorkerService(config, load, handover).run())
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        log.error("worker %d cannot start: %s", handover.slot, exc)
        return 1
    return 0
