"""Processes of a benchmark run: start, wait until ready, talk to, and stop every role.

Every process is started here, tracked, and stopped by its own pid when the run ends (SIGTERM,
then SIGKILL after a grace period). Output goes to one log file per process in the run's directory.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tiw_facade.emulator import DEMO_REGION, DEMO_SECRET_ID, DEMO_SECRET_KEY

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A role failed to start or answer; the message points at its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (all its threads)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def fail(self, what: str) -> BenchError:
        return BenchError(f"{self.name} (pid {self.pid}) {what}; log {self.log}:\n{self.tail()}")


class Worker(Proc):
    """A load generator process: one JSON command in, one JSON answer out."""

    def request(self, command: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        stdin, stdout = self.popen.stdin, self.popen.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(command).encode() + b"\n")
        stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.fail(f"did not answer {command['op']} within {timeout:.0f}s")
            ready, _, _ = select.select([stdout], [], [], min(left, 1.0))
            if ready:
                line = stdout.readline()
                if not line:
                    raise self.fail(f"exited during {command['op']}")
                answer: dict[str, Any] = json.loads(line)
                return answer
            if not self.alive():
                raise self.fail(f"exited during {command['op']}")


def base_environment() -> dict[str, str]:
    """This process's environment without any facade or Tencent setting that could leak into a role."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TIW_", "TENCENTCLOUD_"))}


def facade_environment(endpoint: str, grpc_port: int, http_port: int, **extra: str) -> dict[str, str]:
    return {
        "TENCENTCLOUD_SECRET_ID": DEMO_SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": DEMO_SECRET_KEY,
        "TENCENTCLOUD_REGION": DEMO_REGION,
        "TIW_ENDPOINT": endpoint,
        "TIW_GRPC_PORT": str(grpc_port),
        "TIW_HTTP_PORT": str(http_port),
        "TIW_BIND_HOST": HOST,
        **extra,
    }


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port that completes TCP handshakes and never reads or answers: an upstream that hangs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        sock.listen(64)
        yield sock.getsockname()[1]


class Processes:
    """The processes of one run; ``close()`` (or leaving the ``with``) stops them all."""

    def __init__(self, keep_logs: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tiw-bench-"))
        self._keep_logs = keep_logs
        self._procs: list[Proc] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(failed=exc[0] is not None)

    def spawn(
        self,
        cls: type[Proc],
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        pipes: bool = False,
    ) -> Proc:
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                env={**base_environment(), **(env or {})},
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else out,
                stderr=out,
            )
        proc = cls(name, popen, log)
        self._procs.append(proc)
        return proc

    # --- roles ---

    def emulator(self, rate_limit: int) -> tuple[Proc, str]:
        port = free_port()
        proc = self.spawn(
            Proc,
            f"emulator-{port}",
            [PYTHON, "-m", "bench.roles", "emulator", "--port", str(port), "--rate-limit", str(rate_limit)],
            None,
        )
        url = f"http://{HOST}:{port}"
        wait_http(proc, f"{url}/_emulator/stats")
        return proc, url

    def facade(
        self,
        env: Mapping[str, str],
        *,
        loop: str = "uvloop",
        profile: Path | None = None,
        heap: Path | None = None,
    ) -> Proc:
        """``tiw-facade serve`` itself, or (another loop, a profile, heap snapshots: see bench.roles)
        the same assembly in ``bench.roles``."""
        if loop == "uvloop" and profile is None and heap is None:
            argv = [PYTHON, "-m", "tiw_facade.cli", "serve"]
        else:
            argv = [PYTHON, "-m", "bench.roles", "facade", "--loop", loop]
            if profile is not None:
                argv += ["--profile", str(profile)]
            if heap is not None:
                argv += ["--heap", str(heap)]
        proc = self.spawn(Proc, f"facade-{env['TIW_GRPC_PORT']}", argv, env)
        wait_http(proc, f"http://{HOST}:{env['TIW_HTTP_PORT']}/healthz")
        return proc

    def echo(
        self, loop: str = "uvloop", *, as_facade: Mapping[str, str] | None = None, heap: Path | None = None
    ) -> tuple[Proc, str]:
        """The bare echo server; ``as_facade``: a facade's environment, whose grpc options it takes."""
        port = free_port()
        argv = [PYTHON, "-m", "bench.roles", "echo", "--port", str(port), "--loop", loop]
        if as_facade is not None:
            argv.append("--as-facade")
        if heap is not None:
            argv += ["--heap", str(heap)]
        proc = self.spawn(Proc, f"echo-{port}", argv, as_facade)
        wait_tcp(proc, port)
        return proc, f"{HOST}:{port}"

    def redis(self, *, replica_of: int | None = None) -> tuple[Proc, str]:
        """A redis-server without persistence; with ``replica_of``, a replica of the one on that port."""
        port = free_port()
        data = self.dir / f"redis-{port}"
        data.mkdir()
        replication = ["--replicaof", HOST, str(replica_of)] if replica_of is not None else []
        proc = self.spawn(
            Proc,
            f"redis-{port}",
            [
                REDIS_SERVER,
                "--port",
                str(port),
                "--bind",
                HOST,
                "--dir",
                str(data),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
                *replication,
            ],
            None,
        )
        wait_tcp(proc, port)
        return proc, f"redis://{HOST}:{port}/0"

    def sentinel(
        self, master: str, primary_port: int, *, quorum: int, down_after_ms: int, failover_timeout_ms: int
    ) -> tuple[Proc, int]:
        """``redis-server <conf> --sentinel`` watching the primary on ``primary_port`` as ``master``.

        A sentinel rewrites its configuration file (the other sentinels, the replicas, a new master):
        each has its own, writable, in its own directory. Answers the process and its port."""
        port = free_port()
        data = self.dir / f"sentinel-{port}"
        data.mkdir()
        config = data / "sentinel.conf"
        config.write_text(
            f"port {port}\n"
            f"bind {HOST}\n"
            f"dir {data}\n"
            "loglevel notice\n"
            f"sentinel monitor {master} {HOST} {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
            f"sentinel failover-timeout {master} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {master} 1\n"
        )
        proc = self.spawn(Proc, f"sentinel-{port}", [REDIS_SERVER, str(config), "--sentinel"], None)
        wait_tcp(proc, port)
        return proc, port

    def worker(self, name: str, *args: str) -> Worker:
        proc = self.spawn(Worker, name, [PYTHON, "-m", "bench.worker", *args], None, pipes=True)
        assert isinstance(proc, Worker)
        return proc

    # --- stopping ---

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Stop every process started inside the ``with`` when it ends (a suite's own processes)."""
        before = list(self._procs)
        try:
            yield
        finally:
            for proc in reversed([p for p in self._procs if p not in before]):
                self.stop(proc, grace=5.0)

    def kill(self, proc: Proc) -> None:
        """SIGKILL to ``proc``'s pid: a crash, with no shutdown of any kind. It stays on the list (its
        log is kept with the others'); stopping it later does nothing."""
        if proc.alive():
            proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait()

    def stop(self, proc: Proc, grace: float = 10.0) -> None:
        """SIGTERM (a facade drains and exits), then SIGKILL if it lingers."""
        if proc.alive():
            if isinstance(proc, Worker) and proc.popen.stdin is not None:
                proc.popen.stdin.close()  # a worker ends at EOF
            else:
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        for stream in (proc.popen.stdout, proc.popen.stdin):
            if stream is not None and not stream.closed:
                stream.close()
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self, failed: bool = False) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc, grace=5.0)
        if failed or self._keep_logs:
            print(f"bench: process logs kept in {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def wait_http(proc: Proc, url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise proc.fail("exited while starting")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise proc.fail(f"not ready at {url} within {timeout:.0f}s")


def wait_tcp(proc: Proc, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise proc.fail("exited while starting")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise proc.fail(f"not listening on port {port} within {timeout:.0f}s")


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


class EmulatorAdmin:
    """The emulator's ``/_emulator/...`` endpoints (unsigned, never rate limited)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._host, _, port = url.removeprefix("http://").partition(":")
        self._port = int(port)

    def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        conn: http.client.HTTPConnection | None = None,
    ) -> Any:
        own = conn is None
        conn = conn or http.client.HTTPConnection(self._host, self._port, timeout=10)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(
                method, f"/_emulator/{path}", body=payload, headers={"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise BenchError(f"emulator {method} {path}: HTTP {response.status} {data[:200]!r}")
            return json.loads(data)
        finally:
            if own:
                conn.close()

    def stats(self) -> dict[str, dict[str, int]]:
        actions: dict[str, dict[str, int]] = self._request("GET", "stats")["actions"]
        return actions

    def reset(self) -> None:
        self._request("POST", "reset", {})


class TaskAdmin(EmulatorAdmin):
    """The emulator's task endpoints: tasks with chosen times, and the record of their changes."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.created = 0  # tasks added through this client

    def add_tasks(self, bodies: Sequence[Mapping[str, Any]]) -> list[str]:
        """One task per body (``POST /_emulator/tasks``), over one keep-alive connection: their IDs."""
        conn = http.client.HTTPConnection(self._host, self._port, timeout=10)
        try:
            ids = [str(self._request("POST", "tasks", body, conn)["TaskId"]) for body in bodies]
        finally:
            conn.close()
        self.created += len(ids)
        return ids

    def changes(self) -> dict[str, list[tuple[float, str]]]:
        document = self._request("GET", "tasks")
        return {t["TaskId"]: [(at, state) for at, state in t["Changes"]] for t in document["Tasks"]}
