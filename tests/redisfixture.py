"""A throwaway redis-server for tests: loopback only, its own port and directory, no
persistence, never the system's Redis service.

    with running_redis() as server:      # started, answering PING
        use(server.url)                   # redis://127.0.0.1:PORT/0
        server.stop()                     # an outage: connections are refused
        server.start()                    # the same server back on the same port (empty)

The process is killed and the directory removed on leaving, also when the test fails.
``pause()``/``resume()`` freeze the process (SIGSTOP/SIGCONT): the port still accepts
connections but nothing answers, which is how a hung server looks.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT = 10.0  # seconds for redis-server to answer PING
STOP_TIMEOUT = 5.0


def redis_server_path() -> str | None:
    """Where redis-server is (PATH, or /usr/bin and /usr/sbin for a non-root PATH)."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server"):
        if Path(candidate).is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``, restartable on the same port."""

    def __init__(self, executable: str, port: int, directory: Path) -> None:
        self.executable = executable
        self.port = port
        self.directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> None:
        """Start the server (on the same port as before) and wait until it answers PING."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        self._process = subprocess.Popen(
            [
                self.executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--logfile", str(self.log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers_ping(self.port):
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"redis-server exited on start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not answer PING in {START_TIMEOUT} s:\n{self._log_tail()}"
                )
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill the server (SIGKILL: an outage, not a clean shutdown) and reap it."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()  # also ends a paused process
        process.wait(STOP_TIMEOUT)

    def pause(self) -> None:
        """Freeze the server: connections are accepted by the kernel, nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running_redis(executable: str | None = None) -> Iterator[RedisServer]:
    """A started :class:`RedisServer` on a free port; killed and cleaned up on leaving."""
    path = executable or redis_server_path()
    if path is None:
        raise RuntimeError("redis-server is not installed")
    directory = Path(tempfile.mkdtemp(prefix="socks64-redis-"))
    server: RedisServer | None = None
    try:
        for attempt in range(5):
            # The probe's port is free now; another process may take it before Redis
            # binds it, so a failed start is retried on another port.
            server = RedisServer(path, _free_port(), directory)
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        assert server is not None
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)
