"""The interface manager on a thread of its own.

pyroute2's asyncio netlink sockets need asyncio's own event loop: uvloop cannot open a
datagram endpoint on an AF_NETLINK socket. So the manager runs on a plain asyncio loop
in a daemon thread; queries read its table (plain dict look-ups, safe under the GIL) and
events are handed to the gateway's loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future

from .addresses import IPAddress
from .interfaces import Callback, Interface, InterfaceAddress, InterfaceManager


class InterfaceWatcher:
    """InterfaceManager's query API, with the netlink work on a background thread."""

    def __init__(self, manager: InterfaceManager | None = None) -> None:
        self.manager = manager or InterfaceManager()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        started: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="socks64-netlink", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(started)

    def _run(self, started: Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.manager.start())
        except BaseException as exc:
            started.set_exception(exc)
            loop.close()
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.manager.close())
            loop.close()

    async def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, 5.0)

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Events arrive on the caller's loop, never on the netlink thread."""
        target = asyncio.get_running_loop()

        def relay(event: str, subject: Interface | InterfaceAddress) -> None:
            with contextlib.suppress(RuntimeError):  # the gateway's loop is closing
                target.call_soon_threadsafe(callback, event, subject)

        return self.manager.subscribe(relay)

    # Queries read the manager's table directly.

    def interfaces(self) -> list[Interface]:
        return self.manager.interfaces()

    def by_name(self, name: str) -> Interface | None:
        return self.manager.by_name(name)

    def default_interface(self, family: int) -> Interface | None:
        return self.manager.default_interface(family)

    def multicast_interface(self, family: int, name: str | None) -> Interface:
        return self.manager.multicast_interface(family, name)

    def source_address(self, family: int, interface: str | None = None) -> IPAddress | None:
        return self.manager.source_address(family, interface)

    def has_address(self, address: str | IPAddress) -> bool:
        return self.manager.has_address(address)
