"""EventStream: WatchEvents, TIW's callbacks streamed from the event log (events/) to subscribers.

This module only speaks gRPC: it checks the request, holds a slot of the replica's bounds for each
open stream (TIW_MAX_WATCHES, and TIW_MAX_WATCHES_PER_CALLER by caller share, as the task watches),
follows the log from the request's cursor and sends each event its filter matches. Failures are
rich statuses as everywhere (errors.py): INVALID_ARGUMENT with BadRequest, RESOURCE_EXHAUSTED
``TOO_MANY_WATCHES``, OUT_OF_RANGE ``CURSOR_EXPIRED``, UNAVAILABLE ``SHUTTING_DOWN`` once the
replica drains, UNAVAILABLE ``EVENTS_UNAVAILABLE`` when the log gave up (its Redis down for long).

A stream waits inside the log's follow; the drain ends it by cancelling that wait (only that: a
stream sending a message is not cancelled, it sees the drain at its next wait), then answers it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.message import Message

from tiw_facade import errors, failures
from tiw_facade._proto.tiw.facade.v1 import events_pb2
from tiw_facade.call_record import CURRENT_SHARE, record_for
from tiw_facade.events import (
    KINDS,
    CursorExpired,
    Event,
    EventLog,
    EventLogUnavailable,
    Filter,
    InvalidCursor,
    parse_cursor,
)
from tiw_facade.failures import FacadeError, InvalidRequest, ShuttingDown
from tiw_facade.handler import Undecodable, lenient_deserializer, valid_request
from tiw_facade.metrics import Metrics
from tiw_facade.watcher import WatchSlots

SERVICE = events_pb2.DESCRIPTOR.services_by_name["EventStream"]
METHOD = "WatchEvents"  # the access log's and the errors' ``action``
MAX_FILTER_VALUES = 100  # values in each of a request's filters

Stream = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[events_pb2.Event]]


class _Streams:
    """The open streams: their slots, and those waiting for an event (which a drain cancels)."""

    def __init__(self, slots: WatchSlots) -> None:
        self.slots = slots
        self.draining = False
        self._waiting: set[asyncio.Task[Any]] = set()

    def drain(self) -> None:
        """Open streams end with UNAVAILABLE now; new ones are refused."""
        self.draining = True
        for task in self._waiting:
            task.cancel()

    async def next(self, events: AsyncIterator[Event]) -> Event:
        """The log's next event; ShuttingDown once the drain began."""
        if self.draining:
            raise ShuttingDown()
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            return await anext(events)
        except asyncio.CancelledError:
            if not self.draining:
                raise  # the client went away, or its deadline passed: grpc's own cancel
            task.uncancel()
            raise ShuttingDown() from None
        finally:
            self._waiting.discard(task)


def event_stream_handler(
    log: EventLog, metrics: Metrics, *, slots: WatchSlots
) -> tuple[grpc.GenericRpcHandler, Callable[[], None]]:
    """The generic handler serving EventStream from ``log``, and the drain to call on SIGTERM (before
    the server's stop: open streams end UNAVAILABLE at once, new ones are refused). Each stream holds
    one of ``slots``, the task watches' (TIW_MAX_WATCHES, TIW_MAX_WATCHES_PER_CALLER)."""
    streams = _Streams(slots)
    handler = grpc.unary_stream_rpc_method_handler(
        _behavior(log, streams, metrics),
        request_deserializer=lenient_deserializer(events_pb2.WatchEventsRequest),
        response_serializer=events_pb2.Event.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, {METHOD: handler}), streams.drain


def _behavior(log: EventLog, streams: _Streams, metrics: Metrics) -> Stream:
    active = metrics.event_watches_active

    async def stream(
        request: Message | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[events_pb2.Event]:
        record = record_for(METHOD)
        share = CURRENT_SHARE.get()
        try:
            wanted, cursor = valid_watch(valid_request(request))
            if streams.draining:
                raise ShuttingDown()
            streams.slots.take(share)
            active.inc()
            try:
                # Closed now, not whenever collected: a stream whose client went away leaves the log's
                # followers at once.
                async with aclosing(log.follow(cursor)) as events:
                    while True:
                        event = await streams.next(events)
                        if wanted.matches(event):
                            yield message(event)
            finally:
                active.dec()
                streams.slots.give_back(share)
        except Exception as exc:  # every failure becomes a status; CancelledError is not an Exception
            failure = _facade_failure(exc)
            record.tiw_code = failure.reason if isinstance(failure, FacadeError) else "INTERNAL"
            errors.answer(context, errors.status_for(failure, action=METHOD))

    return stream


def valid_watch(request: Message) -> tuple[Filter, str | None]:
    """The request's filter and cursor (None: from now on); InvalidRequest naming each bad field."""
    assert isinstance(request, events_pb2.WatchEventsRequest)
    violations: list[tuple[str, str]] = []
    for name in ("sdk_app_ids", "event_types", "kinds", "task_ids"):
        count = len(getattr(request, name))
        if count > MAX_FILTER_VALUES:
            violations.append((name, f"has {count} values; at most {MAX_FILTER_VALUES}"))
    violations += [
        (f"kinds[{index}]", f"is not a kind of event ({', '.join(KINDS)})")
        for index, kind in enumerate(request.kinds[:MAX_FILTER_VALUES])
        if kind not in KINDS
    ]
    if request.cursor:
        try:
            parse_cursor(request.cursor)
        except InvalidCursor:
            violations.append(
                ("cursor", "is not a cursor an event was sent with (leave it empty: from now on)")
            )
    if violations:
        raise InvalidRequest(violations)
    wanted = Filter(
        sdk_app_ids=frozenset(request.sdk_app_ids),
        event_types=frozenset(request.event_types),
        kinds=frozenset(request.kinds),
        task_ids=frozenset(request.task_ids),
    )
    return wanted, request.cursor or None


def message(event: Event) -> events_pb2.Event:
    sent = events_pb2.Event(
        cursor=event.cursor,
        kind=event.kind,
        sdk_app_id=event.sdk_app_id,
        event_type=event.event_type,
        task_id=event.task_id,
        body=event.body,
    )
    # Seconds and their fraction apart: the nanoseconds of a whole float would be rounded to a double.
    seconds = math.floor(event.received_at)
    sent.received_at.FromNanoseconds(seconds * 1_000_000_000 + round((event.received_at - seconds) * 1e9))
    return sent


def _facade_failure(exc: Exception) -> Exception:
    """The log's exceptions as the facade's failures; the others as they are."""
    if isinstance(exc, CursorExpired):
        return failures.CursorExpired()
    if isinstance(exc, InvalidCursor):  # checked before, so a log's disagreement: the caller's cursor
        return InvalidRequest([("cursor", "is not a cursor of this log")])
    if isinstance(exc, EventLogUnavailable | StopAsyncIteration):
        return failures.EventsUnavailable()
    return exc
