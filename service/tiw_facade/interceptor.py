"""The gRPC server interceptor: go-grpc-prometheus metrics and one access-log line for every RPC.

Messages are counted as go-grpc-prometheus counts them: a unary RPC receives one and sends one when
it succeeds; a streaming RPC counts each message it reads and each it writes (through its request
iterator, ``context.read()``, ``yield`` or ``context.write()``). The line of an RPC carries its
method, code, duration, and what the handler put in its ``CallRecord`` (action, TIW's RequestId,
the TIW error code of a failure).
"""

# Written by hand rather than with py-grpc-prometheus: that one intercepts only the synchronous
# grpc.Server, and spells its labels differently from go-grpc-prometheus, whose names the
# dashboards and alerts use.

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from tiw_facade.call_record import CURRENT_CALL, CallRecord
from tiw_facade.logs import LineTemplate
from tiw_facade.metrics import MethodSeries, Metrics

# The fields of an access-log line after ``grpc_method``, in the order ``_finish`` passes them.
LINE_FIELDS = ("grpc_code", "duration_ms", "tiw_action", "tiw_request_id", "tiw_code", "caller")


class RpcObserver(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """go-grpc-prometheus metrics and one structured log line for every RPC."""

    def __init__(
        self, metrics: Metrics, log: logging.Logger, quiet_services: frozenset[str] = frozenset()
    ) -> None:
        self._metrics = metrics
        self._log = log
        self._quiet = quiet_services  # health and reflection: logged at DEBUG, probes are frequent
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # no such method: grpc answers UNIMPLEMENTED
                return handler
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = full_method.lstrip("/").rpartition("/")
        level = logging.DEBUG if service in self._quiet else logging.INFO
        line = LineTemplate(self._log, level, "rpc", {"grpc_method": full_method}, LINE_FIELDS)
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            series = self._metrics.method("unary", service, method)
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, series, line), **options
            )
        if handler.unary_stream is not None:
            series = self._metrics.method("server_stream", service, method)
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, series, line, streamed_requests=False), **options
            )
        if handler.stream_stream is not None:
            series = self._metrics.method("bidi_stream", service, method)
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.stream_stream, series, line, streamed_requests=True), **options
            )
        series = self._metrics.method("client_stream", service, method)
        return grpc.stream_unary_rpc_method_handler(
            self._client_stream(handler.stream_unary, series, line), **options
        )

    def _unary(self, inner: Any, series: MethodSeries, line: LineTemplate) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # The hot path, so no context manager or context proxy here (a generator costs ~10% of
            # a call answered locally), and _begin's work inline.
            record = CallRecord()
            token = CURRENT_CALL.set(record)
            series.started.inc()
            series.received.inc()
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                return await inner(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                CURRENT_CALL.reset(token)
                code = _outcome(context, error)
                if code is _OK:
                    series.sent.inc()
                _finish(series, line, record, code, started)

        return unary

    def _client_stream(self, inner: Any, series: MethodSeries, line: LineTemplate) -> Any:
        async def client_stream(
            requests: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            started, record, _ = _begin(series)
            error: BaseException | None = None
            try:
                return await inner(_received(requests, series), _CountingContext(context, series))
            except BaseException as exc:
                error = exc
                raise
            finally:
                code = _outcome(context, error)
                if code is grpc.StatusCode.OK:
                    series.sent.inc()
                _finish(series, line, record, code, started)

        return client_stream

    def _streaming(
        self, inner: Any, series: MethodSeries, line: LineTemplate, *, streamed_requests: bool
    ) -> Any:
        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            # The CallRecord is not reset at the end: each RPC runs in a task (a context) of its
            # own, and a generator may be closed from another task, where reset() would raise.
            started, record, _ = _begin(series)
            if streamed_requests:
                request = _received(request, series)
            else:
                series.received.inc()
            error: BaseException | None = None
            try:
                result = inner(request, _CountingContext(context, series))
                if inspect.isawaitable(result):  # writes with context.write()
                    await result
                elif hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                        series.sent.inc()  # resumed: grpc has sent the message
                else:  # a plain generator, which grpc.aio accepts too
                    for item in result:
                        yield item
                        series.sent.inc()
            except BaseException as exc:
                error = exc
                raise
            finally:
                _finish(series, line, record, _outcome(context, error), started)

        return streaming


class _CountingContext:
    """The servicer's context, counting the messages read and written through it."""

    __slots__ = ("_context", "_series")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], series: MethodSeries) -> None:
        self._context = context
        self._series = series

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._series.received.inc()
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._series.sent.inc()


async def _received(requests: AsyncIterable[Any], series: MethodSeries) -> AsyncIterator[Any]:
    async for request in requests:
        series.received.inc()
        yield request


def _begin(series: MethodSeries) -> tuple[float, CallRecord, contextvars.Token[CallRecord]]:
    """Start observing one RPC: its clock, and its record for the handler to fill in."""
    record = CallRecord()
    token = CURRENT_CALL.set(record)
    series.started.inc()
    return time.perf_counter(), record, token


def _finish(
    series: MethodSeries, line: LineTemplate, record: CallRecord, code: grpc.StatusCode, started: float
) -> None:
    elapsed = time.perf_counter() - started
    series.handled[code].inc()
    series.seconds.observe(elapsed)
    if line.enabled():
        line.emit(
            code.name,
            round(elapsed * 1000, 3),
            record.action or None,
            record.request_id or None,
            record.tiw_code or None,
            record.caller or None,
        )


_OK = grpc.StatusCode.OK


def _outcome(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> grpc.StatusCode:
    """The status an RPC ended with: what the handler set on its context, else what its end implies."""
    if error is None:  # most calls: the handler returned, and set a code only if it failed
        value = context.code()
        return _OK if value is None else _status_code(value) or _OK
    if isinstance(error, asyncio.CancelledError):  # the caller's deadline passed, or the caller left
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return _status_code(context.code()) or grpc.StatusCode.UNKNOWN


_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _status_code(value: object) -> grpc.StatusCode | None:
    """context.code() gives a StatusCode, a raw int, or None depending on how the call ended."""
    if isinstance(value, grpc.StatusCode):
        return value
    if isinstance(value, int):
        return _CODES_BY_VALUE.get(value)
    return None
