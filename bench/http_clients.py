"""HTTP clients for the upstream call, compared: aiohttp (the baseline), httpx, httpx on aiohttp, pyreqwest.

    python -m bench --only http-clients            this section alone
    python -m bench.http_clients serve --port N    the answering server (a process of its own)
    python -m bench.http_clients client URL        the measuring process (JSON lines in and out)

Each client sends what the facade sends to TIW — a POST of a ~200-byte JSON body with TC3-signed
headers (signed once: signing is the same work whatever the client) — to a local HTTP/1.1
keep-alive server in another process, whose CPU is not counted, and reads a ~200-byte JSON answer.
Per client, in one client process on uvloop (the facade's loop): CPU per call (``time.process_time``,
all threads, so pyreqwest's Tokio thread counts) and wall time per call, sequential and with 32 in
flight, for a fixed time after a warm-up; the clients take turns within each round (the order
rotating), and every figure is also given as the median of the rounds' ratios to aiohttp's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from bench.calls import CREATE_SNAPSHOT_TASK, PARAMS
from bench.common import Budget, Section, fmt, fmt_ratio, rotated, table
from bench.procs import HOST, PYTHON, BenchError, Proc, Processes, Worker, free_port, wait_tcp
from bench.stats import median, paired

BASELINE = "aiohttp"
MODES = ("seq", "conc")
CONCURRENCY = 32
CALL_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
KEEPALIVE_TIMEOUT = 15.0
POOL_LIMIT = 100
MAX_ANSWER_BYTES = 1 << 20
ANSWER = json.dumps(
    {
        "Response": {
            "TaskID": "f2e1728c-6e87-4481-abe1-cde8542a5a10",
            "Status": "Finished",
            "CreateTime": 1700000000,
            "FinishTime": 1700000030,
            "RequestId": "7b0e6b1a-3b1e-4c1f-9f5e-2d7c1a0b9e11",
        }
    },
    separators=(",", ":"),
).encode()


@dataclasses.dataclass(frozen=True)
class Timing:
    rounds: int
    seconds: dict[str, float]  # per mode, measured
    warmup: float

    @classmethod
    def of(cls, budget: Budget) -> Timing:
        # Kept short on purpose: the whole section stays well under a minute even in a full run.
        if budget.rounds <= 2:
            return cls(rounds=2, seconds={"seq": 0.2, "conc": 0.3}, warmup=0.1)
        return cls(rounds=5, seconds={"seq": 0.4, "conc": 0.6}, warmup=0.15)


# --- the server (its own process) ----------------------------------------------------------------


class _AnswerProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive: reads a request (headers + Content-Length body) and answers ANSWER."""

    RESPONSE = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ANSWER)
        + ANSWER
    )

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._transport: Any = None  # uvloop's TCPTransport is no asyncio.Transport subclass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in bytes(self._buffer[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self._buffer) < end + 4 + length:
                return
            del self._buffer[: end + 4 + length]
            self._transport.write(self.RESPONSE)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_AnswerProtocol, HOST, port, backlog=256)
    async with server:
        await server.serve_forever()


# --- the clients (in the measuring process) ------------------------------------------------------


class Client(Protocol):
    async def start(self) -> None: ...
    async def call(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]: ...
    async def close(self) -> None: ...


class AiohttpClient:
    """As ``tiw_facade.upstream`` sends: one session, a pre-parsed URL, a ClientTimeout per call."""

    def __init__(self, url: str) -> None:
        import yarl

        self._url = yarl.URL(url, encoded=True)

    async def start(self) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        connector = aiohttp.TCPConnector(limit=POOL_LIMIT, keepalive_timeout=KEEPALIVE_TIMEOUT)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
        )

    async def call(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        timeout = self._aiohttp.ClientTimeout(total=CALL_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
        async with self._session.post(
            self._url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        await self._session.close()


class HttpxClient:
    def __init__(self, url: str, *, on_aiohttp: bool = False) -> None:
        self._url = url
        self._on_aiohttp = on_aiohttp

    async def start(self) -> None:
        import httpx

        limits = httpx.Limits(
            max_connections=POOL_LIMIT,
            max_keepalive_connections=POOL_LIMIT,
            keepalive_expiry=KEEPALIVE_TIMEOUT,
        )
        transport: httpx.AsyncBaseTransport | None = None
        if self._on_aiohttp:
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits)
        self._timeout = httpx.Timeout(CALL_TIMEOUT, connect=CONNECT_TIMEOUT)
        self._client = httpx.AsyncClient(
            limits=limits, timeout=self._timeout, follow_redirects=False, transport=transport
        )

    async def call(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        response = await self._client.post(self._url, content=body, headers=headers, timeout=self._timeout)
        return response.status_code, response.content

    async def close(self) -> None:
        await self._client.aclose()


class PyreqwestClient:
    """pyreqwest with its answer read whole (``build().send()``): the library's own cost, no size cap."""

    def __init__(self, url: str) -> None:
        self._url = url

    async def start(self) -> None:
        import datetime

        from pyreqwest.client import ClientBuilder
        from pyreqwest.http import Url

        self._url_parsed = Url(self._url)
        self._timeout = datetime.timedelta(seconds=CALL_TIMEOUT)
        self._client = (
            ClientBuilder()
            .follow_redirects(False)
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
            .connect_timeout(datetime.timedelta(seconds=CONNECT_TIMEOUT))
            .pool_idle_timeout(datetime.timedelta(seconds=KEEPALIVE_TIMEOUT))
            .build()
        )

    async def call(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        request = self._client.post(self._url_parsed).headers(headers).body_bytes(body).timeout(self._timeout)
        response = await request.build().send()
        return response.status, bytes(await response.bytes())

    async def close(self) -> None:
        await self._client.close()


class TransportClient:
    """``bench.pyreqwest_transport``: pyreqwest streamed, with the size cap and failure kinds."""

    def __init__(self, url: str) -> None:
        self._url = url

    async def start(self) -> None:
        from bench.pyreqwest_transport import PyreqwestTransport

        self._transport = PyreqwestTransport(
            self._url,
            max_answer_bytes=MAX_ANSWER_BYTES,
            connect_timeout=CONNECT_TIMEOUT,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            pool_limit=POOL_LIMIT,
        )
        await self._transport.start()

    async def call(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        return await self._transport.post(body, headers, CALL_TIMEOUT)

    async def close(self) -> None:
        await self._transport.aclose()


CLIENTS: dict[str, Callable[[str], Client]] = {
    BASELINE: AiohttpClient,
    "httpx": HttpxClient,
    "httpx + httpx-aiohttp": lambda url: HttpxClient(url, on_aiohttp=True),
    "pyreqwest": PyreqwestClient,
    "pyreqwest via PyreqwestTransport": TransportClient,
}
PACKAGES = ("aiohttp", "httpx", "httpcore", "httpx-aiohttp", "pyreqwest")


def signed_request() -> tuple[bytes, dict[str, str]]:
    """A CreateSnapshotTask body and headers shaped as the facade's (TC3, a session token too).

    Literal values of the real lengths, not the facade's Signer: signing costs every client the same,
    and this section must not move when the signing module does.
    """
    body = json.dumps(PARAMS[CREATE_SNAPSHOT_TASK], separators=(",", ":")).encode()
    timestamp = int(time.time())
    date = time.strftime("%Y-%m-%d", time.gmtime(timestamp))
    headers = {
        "Host": "tiw.tencentcloudapi.com",
        "Content-Type": "application/json; charset=utf-8",
        "X-TC-Version": "2019-09-19",
        "X-TC-Region": "ap-guangzhou",
        "X-TC-Language": "en-US",
        "X-TC-Token": "bench-session-token-" + "t" * 100,
        "X-TC-Action": CREATE_SNAPSHOT_TASK,
        "X-TC-Timestamp": str(timestamp),
        "Authorization": f"TC3-HMAC-SHA256 Credential=AKIDbenchHTTPclients0000000000/{date}/tiw/tc3_request, "
        f"SignedHeaders=content-type;host, Signature={hashlib.sha256(body).hexdigest()}",
    }
    return body, headers


class Measurer:
    """The measuring process's state: every client, started once and kept warm across rounds."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.body, self.headers = signed_request()
        self.clients: dict[str, Client] = {}
        self.missing: dict[str, str] = {}

    async def open(self) -> dict[str, Any]:
        for name, make in CLIENTS.items():
            try:
                client = make(self.url)
                await client.start()
                self.clients[name] = client
            except ImportError as exc:
                self.missing[name] = str(exc)
        return {"clients": list(self.clients), "missing": self.missing, "body_bytes": len(self.body)}

    async def _call(self, client: Client) -> None:
        status, answer = await client.call(self.body, self.headers)
        if status != 200 or answer != ANSWER:
            raise RuntimeError(f"unexpected answer: HTTP {status}, {answer[:100]!r}")

    async def _loop(self, client: Client, until: float) -> int:
        calls = 0
        while time.perf_counter() < until:
            await self._call(client)
            calls += 1
        return calls

    async def _run(self, client: Client, mode: str, seconds: float) -> int:
        until = time.perf_counter() + seconds
        callers = 1 if mode == "seq" else CONCURRENCY
        return sum(await asyncio.gather(*(self._loop(client, until) for _ in range(callers))))

    async def measure(self, name: str, mode: str, seconds: float, warmup: float) -> dict[str, Any]:
        client = self.clients[name]
        await self._run(client, mode, warmup)  # connections open (32 for "conc"), caches warm
        cpu, wall = time.process_time(), time.perf_counter()
        calls = await self._run(client, mode, seconds)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        return {"calls": calls, "cpu_us": cpu / calls * 1e6, "wall_us": wall / calls * 1e6}

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


def client_main(url: str) -> int:
    import uvloop

    loop = uvloop.new_event_loop()
    measurer = Measurer(url)
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "open":
                answer = loop.run_until_complete(measurer.open())
            else:
                answer = loop.run_until_complete(
                    measurer.measure(
                        command["client"], command["mode"], command["seconds"], command["warmup"]
                    )
                )
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        loop.run_until_complete(measurer.close())
        loop.close()
    return 0


# --- the driver (in ``python -m bench``) ---------------------------------------------------------


def run(procs: Processes, budget: Budget) -> Section:
    timing = Timing.of(budget)
    with procs.scope():
        port = free_port()
        server = procs.spawn(
            Proc,
            f"http-server-{port}",
            [PYTHON, "-m", "bench.http_clients", "serve", "--port", str(port)],
            None,
        )
        wait_tcp(server, port)
        worker = procs.spawn(
            Worker, "http-clients", [PYTHON, "-m", "bench.http_clients", "client", f"http://{HOST}:{port}/"],
            None, pipes=True,
        )  # fmt: skip
        assert isinstance(worker, Worker)
        opened = worker.request({"op": "open"}, timeout=30)
        names: list[str] = opened["clients"]
        if BASELINE not in names:
            raise BenchError(f"the baseline client cannot be loaded: {opened['missing']}")
        results: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
        for turn in range(timing.rounds):
            for name in rotated(names, turn):
                for mode in MODES:
                    command = {
                        "op": "measure",
                        "client": name,
                        "mode": mode,
                        "seconds": timing.seconds[mode],
                        "warmup": timing.warmup,
                    }
                    results[name, mode].append(worker.request(command, timeout=60))
    return _section(timing, names, opened["missing"], opened["body_bytes"], results)


HEADER = (
    "client",
    "seq CPU µs/call",
    "÷ aiohttp",
    "seq wall µs/call",
    "÷ aiohttp",
    "32 in flight CPU µs/call",
    "÷ aiohttp",
    "32 in flight calls/s",
    "÷ aiohttp",
)


def _section(
    timing: Timing,
    names: Sequence[str],
    missing: dict[str, str],
    body_bytes: int,
    results: dict[tuple[str, str], list[dict[str, float]]],
) -> Section:
    def series(name: str, mode: str, key: str) -> list[float]:
        return [r[key] for r in results[name, mode]]

    def rate(name: str) -> list[float]:
        return [1e6 / r["wall_us"] for r in results[name, "conc"]]

    rows = []
    notes: dict[str, float] = {}
    for name in names:
        cells = [f"`{name}`"]
        for values, base in (
            (series(name, "seq", "cpu_us"), series(BASELINE, "seq", "cpu_us")),
            (series(name, "seq", "wall_us"), series(BASELINE, "seq", "wall_us")),
            (series(name, "conc", "cpu_us"), series(BASELINE, "conc", "cpu_us")),
            (rate(name), rate(BASELINE)),
        ):
            cells += [fmt(median(values), 0), f"**{fmt_ratio(paired(values, base))}**"]
        rows.append(cells)
        notes[f"{name} conc cpu ratio"] = paired(
            series(name, "conc", "cpu_us"), series(BASELINE, "conc", "cpu_us")
        )
    rows += [[f"`{name}`", *["not installed"] * (len(HEADER) - 1)] for name in missing]
    versions = ", ".join(f"{package} {_version(package)}" for package in PACKAGES)
    body = f"""\
The client of the facade's one upstream call, on its own: a POST of a {body_bytes}-byte JSON body
with TC3-shaped headers (`Authorization`, `X-TC-*` including a session token; made once, outside
the measurement) to a local HTTP/1.1 keep-alive server in another process (its CPU not counted),
whose {len(ANSWER)}-byte JSON answer each client reads whole and checks. One client process on
uvloop; per client and round, {timing.seconds["seq"]:g} s of sequential calls and \
{timing.seconds["conc"]:g} s with {CONCURRENCY} in flight, each after {timing.warmup:g} s of warm-up on
the same pool; {timing.rounds} rounds, the clients taking turns (order rotating). CPU per call:
`time.process_time()` of the client process (user + system, all threads — pyreqwest's Tokio
thread included) ÷ calls; wall per call: elapsed ÷ calls. Figures are medians of the rounds;
ratios are medians of the rounds' ratios to aiohttp's. Versions: {versions}.

{table(HEADER, rows)}

`aiohttp` is configured as `tiw_facade.upstream` sends (one session, pre-parsed URL, a
`ClientTimeout` per call). `pyreqwest` reads the answer whole (`build().send()`); `pyreqwest via
PyreqwestTransport` is `bench.pyreqwest_transport` — the answer streamed under a 1 MiB cap, its
failures classified — the cost the facade would pay. See docs/http-client.md for what each client
does and does not do.
"""
    return Section("HTTP clients for the upstream call", body, [], notes=notes)


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_clients")
    roles = parser.add_subparsers(dest="role", required=True)
    serve_parser = roles.add_parser("serve")
    serve_parser.add_argument("--port", type=int, required=True)
    client_parser = roles.add_parser("client")
    client_parser.add_argument("url")
    args = parser.parse_args(argv)
    if args.role == "serve":
        import uvloop

        uvloop.run(serve(args.port))
        return 0
    return client_main(args.url)


if __name__ == "__main__":
    sys.exit(main())
