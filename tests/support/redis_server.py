"""A real redis-server for tests: its own free port, no persistence, killable and restartable.

Not the shared server on 6379: tests must not see (or disturb) anyone else's keys.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """``with RedisServer() as redis: ... redis.url ... redis.kill() ... redis.start()``."""

    def __init__(
        self, port: int | None = None, *, password: str | None = None, args: Sequence[str] = ()
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.args = tuple(args)  # more options, e.g. ("--maxmemory", "1mb")
        self.config_file: str | None = None  # read first (options after it override it)
        self._dir = tempfile.mkdtemp(prefix="tiw-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 5.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.running:
            return
        os.makedirs(self._dir, exist_ok=True)
        args = [
            REDIS_SERVER,
            *([self.config_file] if self.config_file else []),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self._dir,
            "--save", "",  # no RDB snapshots
            "--appendonly", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--logfile", os.path.join(self._dir, "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += self.args
        deadline = time.monotonic() + timeout
        while True:
            self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            if self._wait_ready(deadline):
                return
            # The port may still be held by the previous process's socket: try again shortly.
            self._reap(signal.SIGKILL)
            if time.monotonic() >= deadline:
                log = os.path.join(self._dir, "redis.log")
                raise RuntimeError(f"redis-server did not start on port {self.port}; see {log}")
            time.sleep(0.05)

    def _wait_ready(self, deadline: float) -> bool:
        ping = b"*1\r\n$4\r\nPING\r\n"
        if self.password:
            secret = self.password.encode()
            ping = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret) + ping
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False  # exited (e.g. address in use)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(ping)
                    if b"+PONG" in sock.recv(256):
                        return True
            except OSError:
                pass
            time.sleep(0.01)
        return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, like a crashed node; its data is gone."""
        self._reap(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: a stall (a long fork, a swapped-out host). Connections stay open, nothing answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the stall ends; what clients sent meanwhile is read now."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Shut down and clean up (``start()`` again works)."""
        self._reap(signal.SIGTERM)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _reap(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RedisSentinel(RedisServer):
    """A real Sentinel (``redis-server --sentinel``) watching the master ``name`` at ``master``'s port."""

    def __init__(self, master: RedisServer, name: str = "tiw-master") -> None:
        super().__init__(args=("--sentinel",))
        self.name = name
        # Sentinel rewrites its configuration file: it must be its own, and writable.
        self.config_file = os.path.join(self._dir, "sentinel.conf")
        with open(self.config_file, "w") as file:
            file.write(f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Processes:
    """A group of processes started together (a cluster, a failover topology): ``with`` starts
    them, and closes those already started if the start fails, or when the block ends."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
