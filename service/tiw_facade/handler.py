"""The one path every RPC takes, built from the service descriptor.

validate → translate to TIW JSON → the TIW client (admission, signing, sending, retries, translating
back) → the response, or the failure as a rich status. The five RPCs differ only in data: the action
name (the RPC's name), its request and response messages, its validation rows and its retry policy
(from the method's ``idempotency_level`` in the proto).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from tiw_facade import errors, translate, validate
from tiw_facade._proto.tiw.v20190919 import tiw_pb2
from tiw_facade.calls import CURRENT_CALL, CallRecord
from tiw_facade.failures import FacadeError, InvalidRequest, MalformedRequest
from tiw_facade.upstream import NEVER_RESEND, RetryPolicy, TiwClient

SERVICE: ServiceDescriptor = tiw_pb2.DESCRIPTOR.services_by_name["TiwService"]

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message | None]]

_Idempotency = descriptor_pb2.MethodOptions.IdempotencyLevel
# Only what the proto declares safe is re-sent after a lost answer; an unmarked method never is.
RESEND_MAYBE_DELIVERED: frozenset[int] = frozenset({_Idempotency.NO_SIDE_EFFECTS, _Idempotency.IDEMPOTENT})
# TIW's error that, after an attempt whose answer was lost, means that attempt did what was asked.
SUCCESS_AFTER_LOST_ANSWER: Mapping[str, str] = {
    "StopWhiteboardPush": "UnsupportedOperation.TaskHasAlreadyStopped",
}

# The upstream budget ends this much before the caller's deadline, so that the facade's own rich
# status (with ErrorInfo and its outcome) reaches the caller before the caller's timer fires and
# turns the call into a bare DEADLINE_EXCEEDED. The status needs a network hop and a little CPU:
# 10% of the time left covers that on short deadlines without eating them; beyond 1 s of deadline
# a fixed 100 ms is ample even on a busy host and costs a long call nothing noticeable.
DEADLINE_MARGIN = 0.1
DEADLINE_MARGIN_SHARE = 0.1


def retry_policy(method: MethodDescriptor) -> RetryPolicy:
    """What the client may re-send for ``method``, by its declared idempotency."""
    if method.GetOptions().idempotency_level not in RESEND_MAYBE_DELIVERED:
        return NEVER_RESEND
    return RetryPolicy(
        resend_maybe_delivered=True, success_after_lost_answer=SUCCESS_AFTER_LOST_ANSWER.get(method.name)
    )


POLICIES: Mapping[str, RetryPolicy] = {method.name: retry_policy(method) for method in SERVICE.methods}


def upstream_deadline(time_remaining: float | None, now: float) -> float | None:
    """The absolute ``time.monotonic()`` at which upstream work must end, or None (no caller deadline)."""
    if time_remaining is None:
        return None
    return now + time_remaining - min(DEADLINE_MARGIN, DEADLINE_MARGIN_SHARE * max(time_remaining, 0.0))


@dataclasses.dataclass(frozen=True, slots=True)
class Undecodable:
    """What the deserializer hands the handler for bytes it cannot decode."""

    message_name: str


def lenient_deserializer(request_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """``request_class.FromString`` that never raises: grpc would answer a raising deserializer
    UNKNOWN with a traceback, uncounted by the interceptor, which never sees the call."""
    undecodable = Undecodable(request_class.DESCRIPTOR.full_name)

    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            return request_class.FromString(data)
        except Exception:  # DecodeError mostly; whatever the parser says, the bytes are the caller's
            return undecodable

    return deserialize


def build_handler(client: TiwClient) -> grpc.GenericRpcHandler:
    """The generic handler serving every RPC of TiwService through ``client``."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _behavior(method, response_class, client),
            request_deserializer=lenient_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


def _behavior(method: MethodDescriptor, response_class: type[Message], client: TiwClient) -> Behavior:
    action = method.name  # RPCs are named exactly as the TIW actions
    policy = POLICIES[action]
    decode = functools.partial(translate.from_tiw, message_class=response_class)

    async def handle(
        request: Message | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Message | None:
        record = CURRENT_CALL.get(None)
        if record is None:  # served without the interceptor (tests): nobody reads it
            record = CallRecord()
        record.action = action
        try:
            if isinstance(request, Undecodable):
                raise MalformedRequest(request.message_name)
            found = validate.violations(request)
            if found:
                raise InvalidRequest(found)
            deadline = upstream_deadline(context.time_remaining(), time.monotonic())
            response = await client.call(
                action, translate.to_tiw(request), deadline=deadline, policy=policy, decode=decode
            )
        except Exception as exc:  # every failure becomes a status; CancelledError is not an Exception
            if isinstance(exc, FacadeError):
                record.tiw_code = exc.reason
                record.request_id = exc.request_id
            else:
                record.tiw_code = "INTERNAL"
            _fail(context, errors.status_for(exc, action=action))
            return None
        record.request_id = getattr(response, "request_id", "")
        return response

    return handle


def _fail(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    """Answer with ``status``. Setting it and returning, rather than ``abort_with_status``, spares
    grpc.aio raising and unwinding an exception through every frame: a quarter of the CPU of a
    call answered without going upstream (bench/RESULTS.md, local path)."""
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)
