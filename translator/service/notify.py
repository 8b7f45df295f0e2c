"""The systemd service protocol, spoken by the gateway itself (no libsystemd): sd_notify
state messages over NOTIFY_SOCKET, and sd_listen_fds socket activation."""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("socks64.service")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first descriptor systemd passes
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class Notifier:
    """Sends state changes to the service manager. Disabled (every send a no-op returning
    False) when the gateway was not started by systemd with Type=notify, so callers never
    need to check. Delivery failures are logged once and never raised: a lost status
    message must not take the gateway down."""

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._closed = False
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier for NOTIFY_SOCKET: a path, or an abstract socket when it starts with
        "@". The variable is left set: children never speak the protocol, and systemd only
        accepts the main process's messages (NotifyAccess=main) anyway."""
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return cls(None)
        if value.startswith("@"):
            value = "\0" + value[1:]
        return cls(value)

    @property
    def enabled(self) -> bool:
        return self._address is not None and not self._closed

    def send(self, *lines: str) -> bool:
        """Send the KEY=VALUE lines as one datagram; True when the datagram was sent."""
        for line in lines:
            if "=" not in line or "\n" in line:
                raise ValueError(f"not a KEY=VALUE line: {line!r}")
        if not self.enabled or not lines:
            return False
        assert self._address is not None
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                shown = self._address.replace("\0", "@", 1)
                log.warning("cannot notify the service manager at %s: %s", shown, e)
            return False
        return True

    def ready(self, status: str) -> bool:
        """Startup (or a reload) is complete: systemd considers the service started."""
        return self.send("READY=1", "STATUS=" + _one_line(status))

    def reloading(self) -> bool:
        """A reload began; systemd waits for the next ready(). The timestamp is required by
        Type=notify-reload and lets systemd tell this reload from an earlier one."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Shutdown began, so systemd reports "deactivating" instead of a crash."""
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """Free-form status shown by `systemctl status`; newlines would end the message."""
        return self.send("STATUS=" + _one_line(text))

    def close(self) -> None:
        """Release the socket; later sends are no-ops returning False."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def listen_fds(
    environ: MutableMapping[str, str] = os.environ, pid: int | None = None
) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (sd_listen_fds semantics):
    descriptors 3.. when LISTEN_PID is this process, else []. Like sd_listen_fds(1),
    LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed whenever LISTEN_PID is set, so
    that processes started later do not take them for theirs. The sockets come back
    close-on-exec and non-blocking. ValueError when a passed descriptor is not a listening
    TCP socket (IPv4 or IPv6): the gateway cannot serve on it, and ignoring it would leave
    clients connecting to a socket nobody accepts on."""
    if "LISTEN_PID" not in environ:
        return []
    listen_pid = environ["LISTEN_PID"]
    count_text = environ.get("LISTEN_FDS", "")
    for name in _LISTEN_VARS:
        environ.pop(name, None)
    if not listen_pid.isdigit():
        raise ValueError(f"LISTEN_PID={listen_pid!r} is not a process id")
    if int(listen_pid) != (os.getpid() if pid is None else pid):
        return []
    if not count_text.isdigit():
        raise ValueError(f"LISTEN_FDS={count_text!r} is not a number of descriptors")
    sockets: list[socket.socket] = []
    try:
        for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count_text)):
            sockets.append(_listening_socket(fd))
    except BaseException:
        for sock in sockets:  # not ours to close: leave the descriptors as they were
            sock.detach()
        raise
    for sock in sockets:
        os.set_inheritable(sock.fileno(), False)
        sock.setblocking(False)
    return sockets


def _listening_socket(fd: int) -> socket.socket:
    """A socket object for a passed descriptor, if it is a listening TCP socket."""
    where = f"fd {fd} (passed by systemd, LISTEN_FDS)"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise ValueError(f"{where} is not open: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"{where} is not a socket; socks64 needs listening TCP sockets")
    sock = socket.socket(fileno=fd)
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            family = getattr(sock.family, "name", f"family {sock.family}")
            raise ValueError(f"{where} is an {family} socket; socks64 needs AF_INET or AF_INET6")
        if kind != socket.SOCK_STREAM:
            name = _kind_name(kind)
            raise ValueError(
                f"{where} is a {name} socket; socks64 needs SOCK_STREAM (TCP), "
                "use ListenStream= not ListenDatagram="
            )
        if not listening:
            raise ValueError(f"{where} is a TCP socket that is not listening")
    except BaseException:
        sock.detach()
        raise
    return sock


def _kind_name(kind: int) -> str:
    try:
        return socket.SocketKind(kind).name
    except ValueError:
        return f"type {kind}"
