"""Fixtures for end-to-end tests: a real emulator over HTTP, a real facade over a real gRPC channel.

Only fixtures and hooks live here; the helpers tests import are in tests/support/.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from redis.asyncio import Redis
from support import inner_loop
from support.facade import Facade, StartFacade, facade_environment
from support.redis_server import RedisServer
from tiw_facade import background, settings
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc
from tiw_facade.emulator import DEMO_CALLBACK_KEY, Emulator, EmulatorConfig
from tiw_facade.server import FacadeServer

# The inner loop's guard (tests/support/inner_loop.py): with --max-unmarked-seconds, which only
# `make check` passes, the run fails when a test not marked slow takes longer.
pytest_addoption = inner_loop.pytest_addoption
pytest_configure = inner_loop.pytest_configure


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    # Short state durations so tests can watch tasks move without waiting long.
    # Callbacks signed with the demo key, sent only where a test points them (none by default).
    instance = Emulator(
        EmulatorConfig(
            snapshot_seconds=0.3,
            push_prepare_seconds=0.3,
            video_queue_seconds=0.2,
            video_process_seconds=0.3,
            callback_key=DEMO_CALLBACK_KEY,
        )
    )
    await instance.start("127.0.0.1", 0)
    yield instance
    await instance.stop()


@pytest.fixture
async def start_facade(emulator: Emulator) -> AsyncIterator[StartFacade]:
    """Start facades against the emulator, with extra environment settings; all stopped at the end."""
    started: list[Facade] = []

    async def start(endpoint: str | None = None, **extra: str) -> Facade:
        config = settings.load(facade_environment(endpoint or emulator.url, **extra))
        server = FacadeServer(config)
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        facade = Facade(server, emulator, channel, tiw_pb2_grpc.TiwServiceStub(channel))
        started.append(facade)
        return facade

    yield start
    for facade in started:
        await facade.channel.close()
        await facade.server.stop(0)
    if started:
        await _no_facade_task_left()


# How long the facades' leftover tasks get to end once cancelled, before the test fails naming them.
LEFTOVER_GRACE = 10.0


async def _no_facade_task_left() -> None:
    """Cancel what the stopped facades left running, and fail naming it if it will not end.

    A task of the facade (or of redis-py under it) still running once every facade stopped would
    otherwise meet pytest-asyncio's own cancel at the loop's close, which waits forever for a task
    that swallows its cancellation (redis-py can: background.py), hanging the whole run silently.
    Tasks of the emulator and of the test itself are left to their own fixtures.
    """
    current = asyncio.current_task()
    leftover = [
        task
        for task in asyncio.all_tasks()
        if task is not current and not task.done() and _of_the_facade(task)
    ]
    if not leftover:
        return
    try:
        await asyncio.wait_for(background.stop(leftover), LEFTOVER_GRACE)
    except TimeoutError:
        names = sorted({_where(task) for task in leftover if not task.done()})
        pytest.fail(f"tasks still running {LEFTOVER_GRACE} s after the facades stopped: {names}")


def _where(task: asyncio.Task[object]) -> str:
    code = getattr(task.get_coro(), "cr_code", None)
    return f"{task.get_name()} ({code.co_filename}:{code.co_name})" if code else task.get_name()


def _of_the_facade(task: asyncio.Task[object]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    where = code.co_filename if code else ""
    return ("tiw_facade" in where and "emulator" not in where) or "/redis/" in where


@pytest.fixture
async def facade(start_facade: StartFacade) -> Facade:
    return await start_facade()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server of this test's own (a module may override it with one it shares)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()
