"""TaskWatcher: the watch streams, one path for the three methods, built from the service descriptor.

A watch is a Describe asked once and answered until the task's final state: each ``WatchX`` holds
the request of the Describe action ``DescribeX`` (found by that message type in TiwService) and
streams that action's response messages, exactly as ``Answers.watch`` yields them. Everything that
makes a watch cheap (one refresh schedule per task, across replicas, from spare quota) lives in
``answers``; this module only speaks gRPC: validation, the per-process bound, deadlines, and
failures as the same rich statuses as the Describe RPCs (errors.status_for with the Describe action).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from tiw_facade import errors
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2
from tiw_facade.answers import Answers, Entry
from tiw_facade.calls import record_for
from tiw_facade.failures import (
    FacadeError,
    Outcome,
    TiwError,
    TooManyWatches,
    UpstreamTimeout,
)
from tiw_facade.handler import SERVICE as TIW_SERVICE
from tiw_facade.handler import Undecodable, lenient_deserializer, upstream_deadline, valid_request
from tiw_facade.metrics import Metrics
from tiw_facade.settings import Settings

SERVICE: ServiceDescriptor = watcher_pb2.DESCRIPTOR.services_by_name["TaskWatcher"]

# The field of every Watch request that holds the Describe request (the proto's convention).
REQUEST_FIELD = "request"

Stream = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Message]]


def describe_method(method: MethodDescriptor) -> MethodDescriptor:
    """The TiwService Describe method a watch method repeats: the one taking the watch's inner request.

    Raises LookupError when the watch's messages do not match that method's: the proto is wrong.
    """
    inner: Descriptor | None = method.input_type.fields_by_name[REQUEST_FIELD].message_type
    describe = next((m for m in TIW_SERVICE.methods if m.input_type is inner), None)
    if inner is None or describe is None or describe.output_type is not method.output_type:
        raise LookupError(f"{method.full_name} does not repeat a TiwService method")
    return describe


class _Slots:
    """The watches this process holds open, bounded by TIW_MAX_WATCHES (one event loop: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.open >= self.limit:
            raise TooManyWatches(self.limit)
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


def build_watcher(answers: Answers, settings: Settings, metrics: Metrics) -> grpc.GenericRpcHandler:
    """The generic handler serving every RPC of TaskWatcher from ``answers``."""
    slots = _Slots(settings.max_watches)
    handlers = {}
    for method in SERVICE.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_stream_rpc_method_handler(
            _behavior(describe_method(method).name, response_class, answers, slots, metrics),
            request_deserializer=lenient_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


def _behavior(
    action: str, response_class: type[Message], answers: Answers, slots: _Slots, metrics: Metrics
) -> Stream:
    active = metrics.watches_active.labels(action=action)

    async def stream(
        request: Message | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Message]:
        record = record_for(action)
        try:
            inner = valid_request(request, REQUEST_FIELD)
            deadline = upstream_deadline(context.time_remaining(), time.monotonic())
            # aclosing: a stream cancelled while a message is on its way still ends the watch now
            # (its interest in the task, its waits), not whenever the generator is collected.
            with slots.take(), active.track_inprogress():
                async with contextlib.aclosing(answers.watch(action, inner, deadline=deadline)) as entries:
                    while (entry := await _next(entries, deadline)) is not None:
                        if entry.is_error:  # Answers raises kept errors; never sent as a message
                            raise TiwError(entry.error_code, entry.error_message, entry.request_id)
                        record.request_id = entry.request_id
                        yield response_class.FromString(entry.payload)
                        if entry.terminal:
                            return
        except Exception as exc:  # every failure becomes a status; CancelledError is not an Exception
            failure = _deadline_passed() if isinstance(exc, TimeoutError) else exc
            if isinstance(failure, FacadeError):
                record.tiw_code = failure.reason
                record.request_id = failure.request_id or record.request_id
            else:
                record.tiw_code = "INTERNAL"
            errors.answer(context, errors.status_for(failure, action=action))

    return stream


async def _next(entries: AsyncIterator[Entry], deadline: float | None) -> Entry | None:
    """The next answer, or None after the last; TimeoutError at ``deadline`` (``time.monotonic()``,
    the event loop's clock). The deadline bounds this wait only, never a ``yield``: a timeout that
    fired while grpc sends a message would cancel grpc's send, not this wait."""
    async with asyncio.timeout_at(deadline):
        return await anext(entries, None)


def _deadline_passed() -> UpstreamTimeout:
    # Watching sends nothing that changes TIW, so "not sent" is the truth that matters: safe to repeat.
    return UpstreamTimeout(
        "the deadline passed before the task reached its final state; watch again to go on",
        outcome=Outcome.NOT_SENT,
    )
