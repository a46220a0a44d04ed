"""The one path every RPC takes, built from the service descriptor.

validate → translate to TIW JSON → the TIW client (admission, signing, sending, retries, translating
back) → the response, or the failure as a rich status. The five RPCs differ only in data: the action
name (the RPC's name), its request and response messages, its validation rows and its retry policy
(from the method's ``idempotency_level`` in the proto).

A method the proto does not declare safe to repeat (CreateSnapshotTask) is also seen through once
sent, whatever its caller does, and takes an ``idempotency-key`` (idempotency/, docs/idempotency.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from tiw_facade import answers as answers_module
from tiw_facade import errors, idempotency, translate, validate
from tiw_facade._proto.tiw.v20190919 import tiw_pb2
from tiw_facade.answers import Answers, Served
from tiw_facade.call_record import CURRENT_PRINCIPAL, CallRecord, record_for
from tiw_facade.failures import (
    FacadeError,
    InvalidRequest,
    MalformedRequest,
    Outcome,
    TiwError,
    UpstreamTimeout,
)
from tiw_facade.retries import NEVER_RESEND, RetryPolicy
from tiw_facade.upstream import Request, TiwClient

log = logging.getLogger("tiw_facade.handler")

SERVICE: ServiceDescriptor = tiw_pb2.DESCRIPTOR.services_by_name["TiwService"]

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message | bytes | None]]

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
# What must never be lost once sent, nor sent twice by a retry: the methods never re-sent. They take
# an idempotency key; the other methods ignore one (repeating them is harmless).
SEEN_THROUGH: frozenset[str] = frozenset(name for name, policy in POLICIES.items() if policy is NEVER_RESEND)
IDEMPOTENCY_KEY = "idempotency-key"
# Initial metadata of an answer replayed from an idempotency key's record, not from TIW just now.
REPLAY_METADATA = (("tiw-source", "replay"),)
# How old an answer of a Describe call may be, in milliseconds (0: ask TIW now); docs/answers.md.
MAX_AGE_KEY = "tiw-max-age-ms"
# Longer than any answer is kept: a caller's "any age" is the cache's own bound.
MAX_AGE_LIMIT_MS = 86_400_000
# Checked before int(), whose work grows with the digits and which refuses more than 4,300 of them
# with a ValueError (an INTERNAL answer, an ERROR line). Room for leading zeros, and no more.
MAX_AGE_DIGITS = 16


def upstream_deadline(time_remaining: float | None, now: float) -> float | None:
    """The absolute ``time.monotonic()`` at which upstream work must end, or None (no caller deadline)."""
    if time_remaining is None:
        return None
    return now + time_remaining - min(DEADLINE_MARGIN, DEADLINE_MARGIN_SHARE * max(time_remaining, 0.0))


@dataclasses.dataclass(frozen=True, slots=True)
class Undecodable:
    """What the deserializer hands the handler for bytes it cannot decode."""

    message_name: str


def valid_request(request: Message | Undecodable, field: str = "") -> Message:
    """The request to act on (``field`` of it, if given), or the InvalidRequest (MalformedRequest for
    bytes that did not decode) that it is: raised before anything is sent."""
    if isinstance(request, Undecodable):
        raise MalformedRequest(request.message_name)
    inner = getattr(request, field) if field else request  # an absent one is empty: its rules say so
    found = validate.violations(inner, field)
    if found:
        raise InvalidRequest(found)
    return inner


def lenient_deserializer(request_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """``request_class.FromString`` that never raises: grpc would answer a raising deserializer
    UNKNOWN with a traceback, uncounted by the interceptor, which never sees the call."""
    undecodable = Undecodable(request_class.DESCRIPTOR.full_name)

    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            request = request_class.FromString(data)
        except Exception:  # DecodeError mostly; whatever the parser says, the bytes are the caller's
            return undecodable
        # Unknown fields reach nobody (TIW is sent the known ones): dropped here, a call waiting for
        # its slot holds a few known fields, not whatever padding its caller sent (docs/limits.md).
        request.DiscardUnknownFields()
        return request

    return deserialize


def idempotency_key(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The call's ``idempotency-key`` metadata, or None; InvalidRequest when it is not one."""
    keys = [value for key, value in context.invocation_metadata() or () if key == IDEMPOTENCY_KEY]
    if not keys:
        return None
    problem = "must be given once" if len(keys) > 1 else idempotency.key_violation(str(keys[0]))
    if problem is not None:
        raise InvalidRequest([(IDEMPOTENCY_KEY, f"(metadata) {problem}")])
    return str(keys[0])


def max_age(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The call's ``tiw-max-age-ms`` in seconds, or None; InvalidRequest when it is not one."""
    values = [value for key, value in context.invocation_metadata() or () if key == MAX_AGE_KEY]
    if not values:
        return None
    text = str(values[0])
    # ASCII digits only: str.isdigit() also takes other scripts' digits, and superscripts int() refuses.
    digits = len(text) <= MAX_AGE_DIGITS and text.isascii() and text.isdigit()
    if len(values) > 1 or not digits or int(text) > MAX_AGE_LIMIT_MS:
        rule = f"whole milliseconds 0..{MAX_AGE_LIMIT_MS}, at most {MAX_AGE_DIGITS} ASCII digits"
        raise InvalidRequest([(MAX_AGE_KEY, f"(metadata) must be given once, as {rule}")])
    return int(text) / 1000


def source_metadata(served: Served) -> tuple[tuple[str, str], ...]:
    """Where an answer came from and how old TIW's answer is, for the caller (initial metadata)."""
    return (("tiw-source", served.source), ("tiw-age-ms", str(int(served.age * 1000))))


def decoder(method: MethodDescriptor) -> Callable[[dict[str, Any]], Message]:
    """How TIW's ``Response`` to ``method`` becomes its response message."""
    return functools.partial(
        translate.from_tiw, message_class=message_factory.GetMessageClass(method.output_type)
    )


def fetcher(client: TiwClient) -> answers_module.Fetch:
    """How the answer cache asks TIW: the one path of every RPC, from the translation on."""
    decoders = {method.name: decoder(method) for method in SERVICE.methods}

    async def fetch(
        action: str, request: Message, deadline: float | None, spare: bool, sent: Callable[[], None]
    ) -> Message:
        # Seen through: the deadline (the first caller's) bounds the wait for a slot, but a request
        # once sent waits for TIW's answer whatever the first caller does: the others share it.
        admission = (
            client.spare(on_admitted=sent) if spare else client.queued(sees_through=True, on_admitted=sent)
        )
        tiw_request = Request(action, translate.to_tiw(request), POLICIES[action], decoders[action])
        return await client.call(tiw_request, deadline, admission)

    return fetch


def serialize(response: Message | bytes) -> bytes:
    """A response message's bytes; a cached answer is its bytes already."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def build_handler(
    client: TiwClient, keys: idempotency.Keys, answers: Answers | None = None
) -> grpc.GenericRpcHandler:
    """The generic handler serving every RPC of TiwService through ``client``.

    ``keys``: the idempotency keys of the creates; the calls ``client`` sees through settle them, so
    they are closed after it. ``answers``: the shared answers of the Describe calls (coalesced,
    cached); without it every call goes to TIW.
    """
    handlers = {}
    for method in SERVICE.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _behavior(method, response_class, client, keys, answers),
            request_deserializer=lenient_deserializer(request_class),
            response_serializer=serialize,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


def _behavior(
    method: MethodDescriptor,
    response_class: type[Message],
    client: TiwClient,
    keys: idempotency.Keys,
    answers: Answers | None,
) -> Behavior:
    action = method.name  # RPCs are named exactly as the TIW actions
    policy = POLICIES[action]
    decode = functools.partial(translate.from_tiw, message_class=response_class)
    shared = answers is not None and answers.shares(action)
    seen_through = client.queued(sees_through=True)

    async def send(
        request: Message,
        deadline: float | None,
        context: grpc.aio.ServicerContext[Any, Any],
        record: CallRecord,
    ) -> Message | bytes:
        if shared:
            assert answers is not None
            return await _shared_answer(answers, action, request, deadline, context, record=record)
        tiw_request = Request(action, translate.to_tiw(request), policy, decode)
        if action not in SEEN_THROUGH:
            if answers is None:
                return await client.call(tiw_request, deadline)
            try:
                response = await client.call(tiw_request, deadline)
            except TiwError:
                await answers.stopped(action, request)  # TIW answered: what it changed is changed
                raise
            await answers.stopped(action, request)
            return response
        key = idempotency_key(context)
        attempt = functools.partial(client.call, tiw_request, deadline, seen_through)
        hashed = record.key_sha256 = idempotency.key_hash(key) if key is not None else ""
        late = functools.partial(_log_late, action, hashed)
        if key is None:
            return await client.see_through(attempt(), deadline, _still_waiting, late)

        async def replayed() -> None:
            await context.send_initial_metadata(REPLAY_METADATA)

        return await keys.call(
            key,
            idempotency.fingerprint(action, request.SerializeToString(deterministic=True)),
            deadline=deadline,
            send=attempt,
            see_through=lambda work, until, overdue: client.see_through(work, until, overdue, late),
            encode=_encode,
            decode=response_class.FromString,
            replayed=replayed,
            owner=CURRENT_PRINCIPAL.get(),  # a proven caller's keys are its own
        )

    async def handle(
        request: Message | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Message | bytes | None:
        record = record_for(action)
        try:
            request = valid_request(request)
            deadline = upstream_deadline(context.time_remaining(), time.monotonic())
            response = await send(request, deadline, context, record)
        except Exception as exc:  # every failure becomes a status; CancelledError is not an Exception
            if isinstance(exc, FacadeError):
                record.tiw_code = exc.reason
                record.request_id = exc.request_id
            else:
                record.tiw_code = "INTERNAL"
            errors.answer(context, errors.status_for(exc, action=action))
            return None
        if not isinstance(response, bytes):
            record.request_id = getattr(response, "request_id", "")
            if action in SEEN_THROUGH:  # the TaskID a create made, for the audit trail
                record.task_id = getattr(response, "task_id", "")
        return response

    return handle


async def _shared_answer(
    answers: Answers,
    action: str,
    request: Message,
    deadline: float | None,
    context: grpc.aio.ServicerContext[Any, Any],
    *,
    record: CallRecord,
) -> bytes:
    """A Describe call's answer from the shared answers, with its source and age in the metadata;
    TIW's RequestId of the answer in ``record``."""
    served = await answers.describe(action, request, max_age=max_age(context), deadline=deadline)
    await context.send_initial_metadata(source_metadata(served))
    entry = served.entry
    if entry.is_error:
        raise TiwError(entry.error_code, entry.error_message, entry.request_id)
    record.request_id = entry.request_id
    return entry.payload


def _encode(response: Message) -> tuple[bytes, str]:
    return response.SerializeToString(), getattr(response, "request_id", "")


def _still_waiting() -> UpstreamTimeout:
    return UpstreamTimeout(
        "TIW has not answered within the deadline; the facade waits on for its answer and logs it "
        f"(send an {IDEMPOTENCY_KEY} to get it by retrying)",
        outcome=Outcome.UNKNOWN,
    )


def _log_late(action: str, key_hash: str, task: asyncio.Task[Message]) -> None:
    """What became of a call seen through after its caller stopped waiting: nothing created is lost."""
    extra: dict[str, object] = {"action": action, "idempotency_key_sha256": key_hash}
    if task.cancelled():
        log.warning("a call whose caller went away was cancelled before TIW answered", extra=extra)
        return
    exc = task.exception()
    if exc is None:
        response = task.result()
        extra.update(task_id=getattr(response, "task_id", ""), tiw_request_id=_encode(response)[1])
        log.info("a call whose caller went away was answered", extra=extra)
    else:
        extra.update(
            tiw_code=getattr(exc, "reason", type(exc).__name__), tiw_request_id=getattr(exc, "request_id", "")
        )
        log.info("a call whose caller went away failed", extra=extra)
