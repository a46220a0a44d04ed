"""WatchEvents end to end: a real grpc.aio server with the EventStream handler, a real channel and the
generated stub, over the in-process log or a real redis-server shared by two "replicas"."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from support.events import event
from support.redis_server import RedisServer
from support.rich_status import details, error_info
from support.waiting import wait_until
from tiw_facade import shared_redis
from tiw_facade._proto.tiw.facade.v1 import events_pb2, events_pb2_grpc
from tiw_facade.event_watch import event_stream_handler
from tiw_facade.events import Event, EventLog
from tiw_facade.events._memory import MemoryEventLog
from tiw_facade.events._redis import connect_log
from tiw_facade.metrics import Metrics
from tiw_facade.watcher import WatchSlots

WAIT = 5.0  # seconds a test waits for what must come (never a bound on how fast it comes)
APP = 1400000001


@dataclass
class Replica:
    log: EventLog
    metrics: Metrics
    stub: events_pb2_grpc.EventStreamStub
    drain: Callable[[], None]

    @property
    def open_streams(self) -> float:
        found = self.metrics.registry.get_sample_value("tiw_event_watches_active")
        assert found is not None
        return found


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Any]]:
    """Start a server on 127.0.0.1 serving EventStream from a log (a new in-process one by default)."""
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []
    logs: list[EventLog] = []

    async def run(log: EventLog | None = None, *, max_watches: int = 10, per_caller: int = 10) -> Replica:
        log = log or MemoryEventLog(retention=3600.0, max_events=1000)
        logs.append(log)
        metrics = Metrics("test")
        handler, drain = event_stream_handler(log, metrics, slots=WatchSlots(max_watches, per_caller))
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return Replica(log, metrics, events_pb2_grpc.EventStreamStub(channel), drain)

    yield run
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(0)
    for log in logs:
        await log.aclose()


async def appended(log: EventLog, item: Event) -> Event:
    taken = await log.append(item)
    assert taken is not None
    return taken


async def read(call: grpc.aio.UnaryStreamCall, count: int) -> list[events_pb2.Event]:
    async with asyncio.timeout(WAIT):
        return [await call.read() for _ in range(count)]


async def ended(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError:
    """The error that ends ``call`` (it must end with one, before any further message)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(WAIT):
            message = await call.read()
            raise AssertionError(f"a message came: {message}")
    return caught.value


async def nothing_yet(call: grpc.aio.UnaryStreamCall) -> None:
    """No message came after a moment (nothing must come); the call is cancelled."""
    pending = asyncio.ensure_future(call.read())
    done, _ = await asyncio.wait({pending}, timeout=0.3)
    assert not done, f"a message came: {pending.result()}"
    call.cancel()
    with suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await pending


def as_sent(item: Event) -> tuple[Any, ...]:
    return (item.cursor, item.kind, item.sdk_app_id, item.event_type, item.task_id, item.body)


def as_received(message: events_pb2.Event) -> tuple[Any, ...]:
    return (
        message.cursor,
        message.kind,
        message.sdk_app_id,
        message.event_type,
        message.task_id,
        message.body,
    )


# --- what a stream sends -----------------------------------------------------------------------------


async def test_a_stream_sends_the_events_its_filters_match(start: Callable[..., Any]) -> None:
    replica: Replica = await start()
    mark = await appended(replica.log, event(0))
    request = events_pb2.WatchEventsRequest(kinds=["push"], task_ids=["a", "b"], cursor=mark.cursor)
    call = replica.stub.WatchEvents(request)
    candidates = [
        event(1, kind="push", task_id="a"),
        event(2, kind="snapshot", task_id="a"),  # not its kind
        event(3, kind="push", task_id="c"),  # not its task
        event(4, kind="push", task_id="b", received_at=1700000000.25),
    ]
    taken = [await appended(replica.log, item) for item in candidates]
    received = await read(call, 2)
    assert [as_received(m) for m in received] == [as_sent(taken[0]), as_sent(taken[3])]
    assert received[1].received_at.ToNanoseconds() == 1700000000_250000000
    await nothing_yet(call)


async def test_an_empty_request_sends_only_what_comes_after_it(start: Callable[..., Any]) -> None:
    replica: Replica = await start()
    await appended(replica.log, event(1))
    call = replica.stub.WatchEvents(events_pb2.WatchEventsRequest())
    await wait_until(lambda: replica.open_streams == 1)
    await asyncio.sleep(0.1)  # the memory log's follower takes its place at once; a moment more
    later = await appended(replica.log, event(2))
    assert [as_received(m) for m in await read(call, 1)] == [as_sent(later)]
    call.cancel()


async def test_resuming_with_the_last_cursor_gets_what_was_missed_once(start: Callable[..., Any]) -> None:
    replica: Replica = await start()
    mark = await appended(replica.log, event(0))
    first = replica.stub.WatchEvents(events_pb2.WatchEventsRequest(cursor=mark.cursor))
    taken = [await appended(replica.log, event(n)) for n in (1, 2)]
    received = await read(first, 2)
    first.cancel()  # the subscriber goes away...
    await wait_until(lambda: replica.open_streams == 0)  # ...and its stream is cleaned up
    taken += [await appended(replica.log, event(n)) for n in (3, 4)]  # ...while these come

    again = replica.stub.WatchEvents(events_pb2.WatchEventsRequest(cursor=received[-1].cursor))
    received += await read(again, 2)
    assert [as_received(m) for m in received] == [as_sent(t) for t in taken]
    await nothing_yet(again)


# --- refusals ----------------------------------------------------------------------------------------


async def test_an_expired_cursor_is_out_of_range(start: Callable[..., Any]) -> None:
    replica: Replica = await start(MemoryEventLog(retention=3600.0, max_events=2))
    taken = [await appended(replica.log, event(n)) for n in range(4)]
    error = await ended(replica.stub.WatchEvents(events_pb2.WatchEventsRequest(cursor=taken[0].cursor)))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(error)
    assert (info.reason, info.domain, info.metadata["action"]) == (
        "CURSOR_EXPIRED",
        "tiw-facade",
        "WatchEvents",
    )
    await wait_until(lambda: replica.open_streams == 0)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"kinds": ["push", "whiteboard"]}, "kinds[1]"),
        ({"cursor": "yesterday"}, "cursor"),
        ({"task_ids": [f"t{n}" for n in range(101)]}, "task_ids"),
        ({"sdk_app_ids": list(range(101))}, "sdk_app_ids"),
    ],
)
async def test_an_invalid_request_is_refused_naming_the_field(
    start: Callable[..., Any], request_fields: dict[str, Any], field: str
) -> None:
    replica: Replica = await start()
    error = await ended(replica.stub.WatchEvents(events_pb2.WatchEventsRequest(**request_fields)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = details(error)["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == [field]


async def test_beyond_the_bound_a_stream_is_refused_until_one_ends(start: Callable[..., Any]) -> None:
    replica: Replica = await start(max_watches=2, per_caller=2)
    first, second = (replica.stub.WatchEvents(events_pb2.WatchEventsRequest()) for _ in range(2))
    await wait_until(lambda: replica.open_streams == 2)
    error = await ended(replica.stub.WatchEvents(events_pb2.WatchEventsRequest()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(error).reason == "TOO_MANY_WATCHES"
    first.cancel()
    await wait_until(lambda: replica.open_streams == 1)
    third = replica.stub.WatchEvents(events_pb2.WatchEventsRequest())
    await wait_until(lambda: replica.open_streams == 2)
    for call in (second, third):
        call.cancel()
    await wait_until(lambda: replica.open_streams == 0)


async def test_the_drain_ends_open_streams_unavailable_and_refuses_new_ones(
    start: Callable[..., Any],
) -> None:
    replica: Replica = await start()
    open_call = replica.stub.WatchEvents(events_pb2.WatchEventsRequest())
    await wait_until(lambda: replica.open_streams == 1)
    replica.drain()
    for call in (open_call, replica.stub.WatchEvents(events_pb2.WatchEventsRequest())):
        error = await ended(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(error).reason == "SHUTTING_DOWN"
    await wait_until(lambda: replica.open_streams == 0)


# --- two replicas on one Redis -----------------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_an_event_taken_by_one_replica_reaches_a_subscriber_of_another(
    start: Callable[..., Any], redis_server: RedisServer
) -> None:
    where = shared_redis.Target(redis_server.url, 0.25)
    account = f"AKID-{uuid.uuid4().hex}"

    def log() -> EventLog:
        return connect_log(where, account=account, retention=3600.0, max_events=1000, metrics=None)

    one, other = await start(log()), await start(log())
    mark = await appended(one.log, event(0))
    call = other.stub.WatchEvents(events_pb2.WatchEventsRequest(cursor=mark.cursor))
    await wait_until(lambda: other.open_streams == 1)
    taken = await appended(one.log, event(1))
    assert await other.log.append(event(1)) is None  # the same callback, at the other replica: once
    assert [as_received(m) for m in await read(call, 1)] == [as_sent(taken)]
    await nothing_yet(call)
