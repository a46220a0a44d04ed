"""TaskWatcher: the watch streams, one path for the three methods, built from the service descriptor.

A watch is a Describe asked once and answered until the task's final state: each ``WatchX`` holds
the request of the Describe action ``DescribeX`` (found by that message type in TiwService) and
streams that action's response messages, exactly as the ``Watch`` of ``Answers.watch`` gives them.
Everything that makes a watch cheap (one refresh schedule per task, across replicas, from spare
quota) lives in ``answers``; this module only speaks gRPC: validation, the per-process bounds (the
replica's and each caller's), deadlines, and failures as the same rich statuses as the Describe
RPCs (errors.status_for with the Describe action).

Each open stream costs memory the replica must have (``budget.WATCH_COST``, most of it grpc's own
state for the stream), so the handler holds as little as it can while a stream waits: no helper
coroutine, generator, context manager or timer per stream (one timer serves every waiting stream's
deadline), and the answers' bytes are sent as Answers keeps them (shared by every stream of the
task), not parsed into a message of each stream's own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from tiw_facade import errors
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2
from tiw_facade.answers import Answers
from tiw_facade.call_record import CURRENT_SHARE, record_for
from tiw_facade.failures import (
    FacadeError,
    Outcome,
    TooManyWatches,
    UpstreamTimeout,
)
from tiw_facade.handler import SERVICE as TIW_SERVICE
from tiw_facade.handler import Undecodable, lenient_deserializer, upstream_deadline, valid_request
from tiw_facade.metrics import Metrics

SERVICE: ServiceDescriptor = watcher_pb2.DESCRIPTOR.services_by_name["TaskWatcher"]

# The field of every Watch request that holds the Describe request (the proto's convention).
REQUEST_FIELD = "request"

Stream = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]


def describe_method(method: MethodDescriptor) -> MethodDescriptor:
    """The TiwService Describe method a watch method repeats: the one taking the watch's inner request.

    Raises LookupError when the watch's messages do not match that method's: the proto is wrong.
    """
    inner: Descriptor | None = method.input_type.fields_by_name[REQUEST_FIELD].message_type
    describe = next((m for m in TIW_SERVICE.methods if m.input_type is inner), None)
    if inner is None or describe is None or describe.output_type is not method.output_type:
        raise LookupError(f"{method.full_name} does not repeat a TiwService method")
    return describe


class WatchSlots:
    """The watches this process holds open: TIW_MAX_WATCHES in all, TIW_MAX_WATCHES_PER_CALLER by
    share (``call_record.CURRENT_SHARE``: a proven or listed caller, or every other caller together).
    Task watches and WatchEvents streams (event_watch.py) take slots of the same two caps: they cost
    a replica alike (mostly grpc's state of an open stream), and budget.py sizes the caps for both.

    One event loop: no lock. A share is counted only while it holds a stream, so the table is never
    larger than the streams open, however many names callers bring.
    """

    __slots__ = ("by_share", "limit", "open", "per_caller")

    def __init__(self, limit: int, per_caller: int) -> None:
        self.limit = limit
        self.per_caller = per_caller
        self.open = 0
        self.by_share: dict[str, int] = {}

    def take(self, share: str) -> None:
        """One more stream for ``share``, or TooManyWatches naming the cap it would pass. The
        caller's own cap is checked first: that refusal is the one its caller can act on."""
        held = self.by_share.get(share, 0)
        if held >= self.per_caller:
            raise TooManyWatches(self.per_caller, caller=share)
        if self.open >= self.limit:
            raise TooManyWatches(self.limit)
        self.by_share[share] = held + 1
        self.open += 1

    def give_back(self, share: str) -> None:
        self.open -= 1
        held = self.by_share[share] - 1
        if held:
            self.by_share[share] = held
        else:
            del self.by_share[share]


def build_watcher(answers: Answers, metrics: Metrics, *, slots: WatchSlots) -> grpc.GenericRpcHandler:
    """The generic handler serving every RPC of TaskWatcher from ``answers``, each stream holding
    one of ``slots``."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        handlers[method.name] = grpc.unary_stream_rpc_method_handler(
            _behavior(describe_method(method).name, answers, slots, metrics),
            request_deserializer=lenient_deserializer(request_class),
            # None: the stream yields the Describe response already serialized (Answers keeps it
            # so), which grpc sends as it is.
            response_serializer=None,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


def _behavior(action: str, answers: Answers, slots: WatchSlots, metrics: Metrics) -> Stream:
    active = metrics.watches_active.labels(action=action)

    async def stream(
        request: Message | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        record = record_for(action)
        share = CURRENT_SHARE.get()
        try:
            inner = valid_request(request, REQUEST_FIELD)
            deadline = upstream_deadline(context.time_remaining(), time.monotonic())
            slots.take(share)
            active.inc()
            try:
                # The deadline bounds the waits only, never a ``yield``: a timeout that fired while
                # grpc sends a message would cancel grpc's send, not a wait. The first wait, for a
                # Describe's answer, here; the waits for changes through the topics' one timer, so
                # that no waiting stream holds a timer of its own.
                async with asyncio.timeout_at(deadline):
                    watch = await answers.watch(action, inner, deadline=deadline)
                del inner  # Answers is done with it: not held while the stream waits
                try:
                    # Written here, not in a helper coroutine or generator, whose frame each
                    # waiting stream would hold.
                    while not watch.over:
                        entry = watch.next()
                        if entry is not None:
                            record.request_id = entry.request_id
                            yield entry.payload
                        elif not watch.over:  # nothing new: the task's next change, or the deadline
                            wait = watch.wait(deadline)
                            try:
                                woken = await wait
                            finally:
                                watch.forget(wait)
                            if not woken:
                                raise TimeoutError("the deadline passed before the task changed")
                finally:
                    # Now, not whenever the generator is collected: a stream cancelled while a message
                    # is on its way still ends its watch now (its interest in the task, its wait).
                    watch.close()
            finally:
                active.dec()
                slots.give_back(share)
        except Exception as exc:  # every failure becomes a status; CancelledError is not an Exception
            failure = _deadline_passed() if isinstance(exc, TimeoutError) else exc
            if isinstance(failure, FacadeError):
                record.tiw_code = failure.reason
                record.request_id = failure.request_id or record.request_id
            else:
                record.tiw_code = "INTERNAL"
            errors.answer(context, errors.status_for(failure, action=action))

    return stream


def _deadline_passed() -> UpstreamTimeout:
    # Watching sends nothing that changes TIW, so "not sent" is the truth that matters: safe to repeat.
    return UpstreamTimeout(
        "the deadline passed before the task reached its final state; watch again to go on",
        outcome=Outcome.NOT_SENT,
    )
