"""The load generator: a process of its own, driven by JSON lines on stdin, one JSON answer per line.

    python -m bench.worker grpc     a grpc.aio client (one event loop, tasks for concurrency)
    python -m bench.worker sdk ENDPOINT
                                    Tencent's official Python SDK (threads for concurrency)

Commands (``op``):

- ``seq``: ``n`` calls one at a time after ``warmup`` more; answers every latency (ms) and the count
  of each outcome. ``params`` is cycled through, so a list of fresh tasks gives each call its own.
- ``conc``: ``concurrency`` callers, each calling again as soon as its call ends, for
  ``warmup_seconds`` and then ``seconds``, taking ``calls`` in turn; answers the calls completed in
  the measured part, and the calls made of each (warm-up included). A call with ``each`` (a list of
  TIW JSON requests) sends the i-th of them in its i-th use, e.g. a task of its own each; past the
  end of the list it starts again, and ``reused`` counts those calls.
- ``hold`` / ``release`` (gRPC only): start a call and leave it in flight / cancel those calls.
- ``open`` (gRPC only): an open loop of ``rate`` calls per second for each of ``calls``, for
  ``seconds``, spread over ``targets`` in turn; answers one record per call. A call with ``each``
  (a list of TIW JSON requests) sends the i-th of them in its i-th call, e.g. a task of its own each.
- ``call`` (gRPC only): one call, tried again every 0.2 s while it is refused (RESOURCE_EXHAUSTED,
  UNAVAILABLE) for up to ``retry_for`` seconds; answers its outcome, the answer (TIW JSON) and the tries.

A gRPC call is described by ``{"method": "/pkg.Service/Method", "request": TypeName, "response":
TypeName, "params": {TIW JSON}}``; an SDK call by ``{"action": Name, "params": {TIW JSON}}``.
Outcomes are ``OK``, a gRPC status code name, or the TIW error code the SDK raised.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

JSON = dict[str, Any]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


class Supply:
    """Which request each call of a ``conc`` sends: per kind of call, its ``each`` list in turn.

    ``sizes[k]``: how many distinct requests kind ``k`` has (None: one request, sent every time).
    Shared by every caller (the SDK's are threads, so under a lock).
    """

    def __init__(self, sizes: Sequence[int | None]) -> None:
        self._sizes = list(sizes)
        self.made = [0] * len(sizes)  # calls of each kind so far
        self._lock = threading.Lock()

    @classmethod
    def of(cls, specs: Sequence[JSON]) -> Supply:
        return cls([len(spec["each"]) if spec.get("each") else None for spec in specs])

    def take(self, kind: int) -> int:
        """The index of the request the next call of ``kind`` sends."""
        with self._lock:
            made = self.made[kind]
            self.made[kind] = made + 1
        size = self._sizes[kind]
        return made % size if size else 0

    @property
    def reused(self) -> int:
        """Calls that sent a request of an ``each`` list a second time (the list was too short)."""
        return sum(max(0, made - size) for made, size in zip(self.made, self._sizes, strict=True) if size)


def variants(spec: JSON) -> list[JSON]:
    """The TIW requests a kind of call sends in turn: its ``each`` list, or its one ``params``."""
    return [{**spec, "params": params} for params in spec["each"]] if spec.get("each") else [spec]


# --- gRPC ---------------------------------------------------------------------------------------


class GrpcClient:
    def __init__(self) -> None:
        import grpc

        self._grpc = grpc
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._callables: dict[tuple[str, str, tuple[tuple[str, str], ...]], Any] = {}
        self._held: list[asyncio.Future[str]] = []

    def _callable(self, target: str, spec: JSON) -> Any:
        metadata = tuple((name, value) for name, value in spec.get("metadata", ()))
        key = (target, spec["method"], metadata)
        found = self._callables.get(key)
        if found is None:
            from tiw_facade._proto.tiw.v20190919 import tiw_pb2

            channel = self._channels.get(target)
            if channel is None:
                channel = self._channels[target] = self._grpc.aio.insecure_channel(target)
            request = getattr(tiw_pb2, spec["request"])
            response = getattr(tiw_pb2, spec["response"])
            found = channel.unary_unary(
                spec["method"],
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
            if metadata:
                found = functools.partial(found, metadata=metadata)
            self._callables[key] = found
        return found

    @staticmethod
    def _message(spec: JSON) -> Any:
        from google.protobuf import json_format
        from tiw_facade._proto.tiw.v20190919 import tiw_pb2

        return json_format.ParseDict(spec["params"], getattr(tiw_pb2, spec["request"])())

    def _prepared(self, target: str, specs: Sequence[JSON]) -> list[tuple[Any, Any]]:
        return [(self._callable(target, spec), self._message(spec)) for spec in specs]

    async def _call(self, stub: Any, message: Any, deadline: float) -> str:
        try:
            await stub(message, timeout=deadline)  # the gRPC deadline, sent to the server
        except self._grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return "OK"

    async def seq(self, command: JSON) -> JSON:
        calls = self._prepared(
            command["target"], [{**command["call"], "params": p} for p in command["params"]]
        )
        timeout = float(command["timeout"])
        cycle = itertools.cycle(calls)
        for _ in range(command["warmup"]):
            stub, message = next(cycle)
            await self._call(stub, message, timeout)
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        for _ in range(command["n"]):
            stub, message = next(cycle)
            started = time.perf_counter()
            code = await self._call(stub, message, timeout)
            latencies.append(_ms(time.perf_counter() - started))
            codes[code] += 1
        return {"latencies_ms": latencies, "codes": codes}

    async def conc(self, command: JSON) -> JSON:
        targets: list[str] = command["targets"]
        specs: list[JSON] = command["calls"]
        stubs = [[self._callable(target, spec) for spec in specs] for target in targets]
        messages = [[self._message(one) for one in variants(spec)] for spec in specs]
        supply = Supply.of(specs)
        timeout = float(command["timeout"])
        begin = time.perf_counter() + float(command["warmup_seconds"])
        end = begin + float(command["seconds"])
        codes: Counter[str] = Counter()
        turn = itertools.count()
        total = 0

        async def caller() -> None:
            nonlocal total
            while True:
                place, kind = divmod(next(turn) % (len(targets) * len(specs)), len(specs))
                stub, message = stubs[place][kind], messages[kind][supply.take(kind)]
                code = await self._call(stub, message, timeout)
                total += 1
                now = time.perf_counter()
                if now >= end:
                    return
                if now >= begin:
                    codes[code] += 1

        await asyncio.gather(*(caller() for _ in range(command["concurrency"])))
        return _rate(codes, total, end - begin, supply)

    async def open(self, command: JSON) -> JSON:
        """Open loop: call i of each kind starts at begin + i / rate, whatever the answers do."""
        targets: list[str] = command["targets"]
        specs: list[JSON] = command["calls"]
        prepared = [self._prepared(target, specs) for target in targets]
        # Per kind, the messages its calls send in turn: its one request, or one per entry of ``each``.
        messages = [[self._message(one) for one in variants(spec)] for spec in specs]
        for target in targets:  # connected before the first scheduled call
            await asyncio.wait_for(self._channels[target].channel_ready(), timeout=10)
        timeout = float(command["timeout"])
        interval = 1.0 / float(command["rate"])
        ticks = int(float(command["seconds"]) * float(command["rate"]))
        records: list[list[Any]] = []
        pending: set[asyncio.Task[None]] = set()
        turn = itertools.count()

        async def one(kind: int, tick: int) -> None:
            stub, _ = prepared[next(turn) % len(prepared)][kind]
            message = messages[kind][tick % len(messages[kind])]
            started = time.monotonic()
            code = await self._call(stub, message, timeout)
            records.append([kind, round(started, 6), _ms(time.monotonic() - started), code])

        # ``begin``: the orchestrator's time.monotonic() (one clock for every process on the machine).
        begin = float(command.get("begin") or time.monotonic() + 0.05)
        for tick in range(ticks):
            delay = begin + tick * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for kind in range(len(specs)):
                task = asyncio.create_task(one(kind, tick))
                pending.add(task)
                task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(set(pending))
        return {"records": records, "begin": begin, "end": begin + ticks * interval}

    async def call(self, command: JSON) -> JSON:
        """One call, tried again while refused (for ``retry_for`` s): its outcome and its answer."""
        from google.protobuf import json_format

        refused = {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}
        stub, message = self._prepared(command["target"], [command["call"]])[0]
        timeout = float(command["timeout"])
        give_up = time.monotonic() + float(command.get("retry_for", 0.0))
        codes: list[str] = []
        while True:
            try:
                answer = await stub(message, timeout=timeout)
            except self._grpc.aio.AioRpcError as exc:
                codes.append(str(exc.code().name))
                if codes[-1] in refused and time.monotonic() < give_up:
                    await asyncio.sleep(0.2)
                    continue
                return {"code": codes[-1], "answer": None, "tries": codes, "at": time.monotonic()}
            codes.append("OK")
            return {
                "code": "OK",
                "answer": json_format.MessageToDict(answer),
                "tries": codes,
                "at": time.monotonic(),
            }

    async def hold(self, command: JSON) -> JSON:
        """Start one call and leave it running (until ``release``): it keeps its rate-limit token."""
        stub, message = self._prepared(command["target"], [command["call"]])[0]
        self._held.append(asyncio.ensure_future(self._call(stub, message, float(command["timeout"]))))
        return {"held": len(self._held)}

    async def release(self, command: JSON) -> JSON:
        held, self._held = self._held, []
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        return {"released": len(held)}

    async def close(self) -> None:
        await self.release({})
        for channel in self._channels.values():
            await channel.close()


async def grpc_main() -> int:
    client = GrpcClient()
    loop = asyncio.get_running_loop()
    ops: dict[str, Callable[[JSON], Any]] = {
        "seq": client.seq,
        "conc": client.conc,
        "open": client.open,
        "call": client.call,
        "hold": client.hold,
        "release": client.release,
    }
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return 0
            command = json.loads(line)
            _answer(await ops[command["op"]](command))
    finally:
        await client.close()


# --- the official SDK ---------------------------------------------------------------------------


class SdkClient:
    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint  # host:port of the emulator
        self._main: Any = None
        self._pool: list[Any] = []

    def client(self) -> Any:
        """One TiwClient (one requests.Session, so one keep-alive connection pool) per thread."""
        from tencentcloud.common import credential
        from tencentcloud.common.profile.client_profile import ClientProfile
        from tencentcloud.common.profile.http_profile import HttpProfile
        from tencentcloud.tiw.v20190919 import tiw_client
        from tiw_facade.emulator import DEMO_REGION, DEMO_SECRET_ID, DEMO_SECRET_KEY

        http = HttpProfile(protocol="http", endpoint=self._endpoint, reqTimeout=5)
        return tiw_client.TiwClient(
            credential.Credential(DEMO_SECRET_ID, DEMO_SECRET_KEY),
            DEMO_REGION,
            ClientProfile(httpProfile=http),
        )

    @staticmethod
    def _prepared(client: Any, specs: Sequence[JSON]) -> list[tuple[Callable[[Any], Any], Any]]:
        from tencentcloud.tiw.v20190919 import models

        prepared = []
        for spec in specs:
            request = getattr(models, spec["action"] + "Request")()
            request.from_json_string(json.dumps(spec["params"]))
            prepared.append((getattr(client, spec["action"]), request))
        return prepared

    @staticmethod
    def _call(method: Callable[[Any], Any], request: Any) -> str:
        from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException

        try:
            method(request)
        except TencentCloudSDKException as exc:
            return str(exc.code)
        return "OK"

    def seq(self, command: JSON) -> JSON:
        if self._main is None:
            self._main = self.client()
        client = self._main
        calls = self._prepared(client, [{**command["call"], "params": p} for p in command["params"]])
        cycle = itertools.cycle(calls)
        for _ in range(command["warmup"]):
            self._call(*next(cycle))
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        for _ in range(command["n"]):
            method, request = next(cycle)
            started = time.perf_counter()
            code = self._call(method, request)
            latencies.append(_ms(time.perf_counter() - started))
            codes[code] += 1
        return {"latencies_ms": latencies, "codes": codes}

    def conc(self, command: JSON) -> JSON:
        concurrency = int(command["concurrency"])
        if len(self._pool) != concurrency:
            self._pool = [self.client() for _ in range(concurrency)]
        clients = self._pool
        start = threading.Barrier(concurrency + 1)
        begin = end = 0.0
        lock = threading.Lock()
        codes: Counter[str] = Counter()
        turn = itertools.count()
        total = 0
        specs: list[JSON] = command["calls"]
        # The requests, shared by the threads (each sends them with its own client's methods).
        requests = [[request for _, request in self._prepared(self._main or clients[0], variants(spec))]
                    for spec in specs]  # fmt: skip
        supply = Supply.of(specs)

        def caller(client: Any) -> None:
            nonlocal total
            methods = [getattr(client, spec["action"]) for spec in specs]
            start.wait()
            mine: Counter[str] = Counter()
            done = 0
            while True:
                kind = next(turn) % len(specs)
                code = self._call(methods[kind], requests[kind][supply.take(kind)])
                done += 1
                now = time.perf_counter()
                if now >= end:
                    break
                if now >= begin:
                    mine[code] += 1
            with lock:
                codes.update(mine)
                total += done

        threads = [threading.Thread(target=caller, args=(client,), daemon=True) for client in clients]
        for thread in threads:
            thread.start()
        begin = time.perf_counter() + float(command["warmup_seconds"])
        end = begin + float(command["seconds"])
        start.wait()
        for thread in threads:
            thread.join()
        return _rate(codes, total, end - begin, supply)


def sdk_main(endpoint: str) -> int:
    client = SdkClient(endpoint)
    ops: dict[str, Callable[[JSON], JSON]] = {"seq": client.seq, "conc": client.conc}
    for line in sys.stdin:
        command = json.loads(line)
        _answer(ops[command["op"]](command))
    return 0


def _rate(codes: Counter[str], total: int, seconds: float, supply: Supply) -> JSON:
    """The answer to ``conc``: calls completed in the measured part, and in all (warm-up included);
    the calls made of each kind (warm-up included: every one completed), and those ``reused``."""
    calls = sum(codes.values())
    return {
        "calls": calls,
        "calls_total": total,
        "seconds": seconds,
        "per_second": calls / seconds,
        "codes": codes,
        "per_call": supply.made,
        "reused": supply.reused,
    }


def _answer(result: JSON) -> None:
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["grpc"]:
        return asyncio.run(grpc_main())
    if args[:1] == ["sdk"] and len(args) == 2:
        return sdk_main(args[1])
    print("usage: python -m bench.worker grpc | sdk HOST:PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
