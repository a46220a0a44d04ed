"""The server-side roles the benchmarks start, each in its own OS process.

    python -m bench.roles emulator --port N [--rate-limit 20]
    python -m bench.roles facade [--loop uvloop|asyncio] [--profile FILE] [--heap FILE]
                                 (settings from the environment)
    python -m bench.roles echo --port N [--loop uvloop|asyncio] [--as-facade] [--heap FILE]

``--heap FILE`` traces the process's Python allocations (tracemalloc) and writes a snapshot to
FILE.0, FILE.1, ... at each SIGUSR1. ``--as-facade`` gives the echo server the facade's own grpc
server options and concurrency cap, read from the facade's settings in the environment.

The facade's default (uvloop) figures come from the product's own command, ``tiw-facade serve``;
this ``facade`` role exists for the variants it cannot express: the stock asyncio loop, and a run
under cProfile. It does what ``tiw_facade.cli`` does, with the loop chosen here.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import signal
import sys
import threading
import time
import tracemalloc
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc

ECHO_METHOD = "/bench.Echo/Echo"
# The same echo, sending the two entries of initial metadata a shared answer carries (tiw-source,
# tiw-age-ms) as the facade does, in a batch of their own: grpc.aio cannot add them to the answer's.
ECHO_WITH_METADATA_METHOD = "/bench.Echo/EchoWithMetadata"
ANSWER_METADATA = (("tiw-source", "cache"), ("tiw-age-ms", "1234"))


def run(main: Coroutine[Any, Any, int], loop: str) -> int:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


async def emulator(port: int, rate_limit: int) -> int:
    from tiw_facade.emulator import Emulator, EmulatorConfig

    # Zero task durations: every Describe answer is the final, complete one from the first call.
    config = EmulatorConfig(
        rate_limit=rate_limit,
        snapshot_seconds=0,
        push_prepare_seconds=0,
        video_queue_seconds=0,
        video_process_seconds=0,
    )
    instance = Emulator(config)
    await instance.start("127.0.0.1", port)
    await _until_terminated()
    await instance.stop()
    return 0


async def _until_terminated() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def trace_heap(path: str) -> None:
    """Trace Python allocations; at each SIGUSR1, a snapshot in ``path``.N (N from 0, written whole:
    renamed into place). Called before any other thread starts, so every thread blocks SIGUSR1
    and only the dumping thread takes it, whatever the event loop does with signals."""
    tracemalloc.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    def dump() -> None:
        for index in range(1_000_000):
            signal.sigwait({signal.SIGUSR1})
            partial = f"{path}.{index}.partial"
            tracemalloc.take_snapshot().dump(partial)
            os.replace(partial, f"{path}.{index}")

    threading.Thread(target=dump, name="heap-snapshots", daemon=True).start()


def facade(loop: str, profile: str | None) -> int:
    from tiw_facade import logs, settings
    from tiw_facade.server import serve

    config = settings.load()
    logs.configure(config.log_level, secrets=(config.secret_key, config.session_token, config.redis_url))
    if profile is None:
        return run(serve(config), loop)
    # CPU time of the main thread, not wall time: idle waits in the event loop would otherwise
    # be charged to whatever was running when the loop went to sleep.
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        return run(serve(config), loop)
    finally:
        profiler.disable()
        profiler.dump_stats(profile)


async def echo(port: int, as_facade: bool) -> int:
    """A bare grpc.aio unary server: the same message type in and out, no interceptors, no health;
    ``as_facade``: with the facade's grpc options and cap on calls (its settings from the environment)."""
    from tiw_facade._proto.tiw.v20190919 import tiw_pb2

    message = tiw_pb2.DescribeWhiteboardPushRequest

    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return request

    async def handle_with_metadata(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.send_initial_metadata(ANSWER_METADATA)
        return request

    def unary(behaviour: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=message.FromString, response_serializer=message.SerializeToString
        )

    handlers = {
        ECHO_METHOD.rsplit("/", 1)[1]: unary(handle),
        ECHO_WITH_METADATA_METHOD.rsplit("/", 1)[1]: unary(handle_with_metadata),
    }
    service = ECHO_METHOD.strip("/").split("/")[0]
    server = grpc.aio.server(**(_facade_server_arguments() if as_facade else {}))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_generic_rpc_handlers((_bare_watcher(),))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await _until_terminated()
    await server.stop(0)
    return 0


def _facade_server_arguments() -> dict[str, Any]:
    """What the facade gives ``grpc.aio.server`` besides its interceptors: without the facade's cap on
    pending calls, grpc's own (1,000, then random drops up to 3,000) cancels most of 10,000 streams."""
    from tiw_facade import settings
    from tiw_facade.server import grpc_options, max_calls_in_flight

    config = settings.load()
    return {"options": grpc_options(config), "maximum_concurrent_rpcs": max_calls_in_flight(config)}


# How long a bare watch stream stays open between its two messages: longer than the answers bench
# takes to open all of its streams, so they are all open at once, as on the facade.
BARE_WATCH_SECONDS = 8.0


def _bare_watcher() -> grpc.GenericRpcHandler:
    """``WatchSnapshotTask`` as plain grpc.aio would serve it: Running, a wait, Finished, OK. The
    baseline of what holding a stream open costs, for the answers bench's memory figure."""
    from tiw_facade._proto.tiw.facade.v1 import watcher_pb2
    from tiw_facade._proto.tiw.v20190919 import tiw_pb2

    response = tiw_pb2.DescribeSnapshotTaskResponse

    async def watch(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        task_id = request.request.task_id
        yield response(task_id=task_id, status="Running")
        await asyncio.sleep(BARE_WATCH_SECONDS)
        yield response(task_id=task_id, status="Finished")

    handler = grpc.unary_stream_rpc_method_handler(
        watch,
        request_deserializer=watcher_pb2.WatchSnapshotTaskRequest.FromString,
        response_serializer=response.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("tiw.facade.v1.TaskWatcher", {"WatchSnapshotTask": handler})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roles")
    roles = parser.add_subparsers(dest="role", required=True)
    emu = roles.add_parser("emulator")
    emu.add_argument("--port", type=int, required=True)
    emu.add_argument("--rate-limit", type=int, default=20)
    fac = roles.add_parser("facade")
    fac.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    fac.add_argument("--profile", help="write a cProfile of the process to this file")
    ech = roles.add_parser("echo")
    ech.add_argument("--port", type=int, required=True)
    ech.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ech.add_argument("--as-facade", action="store_true", help="the facade's grpc options and call cap")
    for role in (fac, ech):
        role.add_argument("--heap", help="tracemalloc snapshots to FILE.N at each SIGUSR1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.role != "emulator" and args.heap:
        trace_heap(args.heap)
    if args.role == "emulator":
        return run(emulator(args.port, args.rate_limit), "uvloop")
    if args.role == "facade":
        return facade(args.loop, args.profile)
    return run(echo(args.port, args.as_facade), args.loop)


if __name__ == "__main__":
    sys.exit(main())
