"""Who is calling: the caller's name, from the ``tiw-caller`` metadata or a client certificate.

Without mutual TLS a caller names itself: ``tiw-caller`` is a short name (letters, digits, ``-``,
``_``, ``.``; at most 64), anything else is refused with INVALID_ARGUMENT before anything is sent,
and a call without it belongs to the one shared caller ``unidentified``. With mutual TLS the
certificate names the caller (its SPIFFE ID, else its first DNS name, else its CN), and a
``tiw-caller`` that says otherwise is refused with PERMISSION_DENIED: a name cannot be borrowed.

``CallerCheck`` (a server interceptor) resolves the name once per call and leaves it in
``CURRENT_CALLER`` (the name as given), and the name the call's fair share is kept under in
``CURRENT_SHARE`` (for the limiter and other per-caller bounds). A name only claimed costs nothing to
invent: a flood under 200 made-up names would otherwise take 200 turns of the round robin to one of
an honest caller's. So the share is the certificate's name, or a claimed name the operator lists in
``TIW_CALLER_WEIGHTS``; every other caller shares the one ``unidentified`` share.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, NamedTuple

import grpc

from tiw_facade import errors
from tiw_facade.call_record import CURRENT_CALLER, CURRENT_SHARE, UNIDENTIFIED
from tiw_facade.failures import CallerMismatch, FacadeError, InvalidRequest

CALLER_KEY = "tiw-caller"
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
NAME_RULE = "must be 1 to 64 letters, digits, '-', '_' or '.'"


def claimed_name(values: list[str]) -> str | None:
    """The name the ``tiw-caller`` values give, checked; None when there are none."""
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest([(CALLER_KEY, "must be given once")])
    (value,) = values
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise InvalidRequest([(CALLER_KEY, NAME_RULE)])
    return value


def certificate_name(auth_context: Mapping[str, Any]) -> str | None:
    """The name a verified client certificate gives, by precedence; None without a certificate.

    grpc exposes the SANs already split: ``peer_spiffe_id`` (set only for one well-formed SPIFFE
    URI), ``peer_uri``, ``peer_dns``; and the subject's ``x509_common_name``.
    """
    for key, accept in _PRECEDENCE:
        for value in auth_context.get(key, ()):
            text: str = value.decode(errors="replace")
            if accept(text):
                return text
    return None


_PRECEDENCE: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("peer_spiffe_id", bool),
    ("peer_uri", lambda uri: uri.startswith("spiffe://")),
    ("peer_dns", bool),
    ("x509_common_name", bool),
)


class Caller(NamedTuple):
    """Who a call says it is, and whether that is proven."""

    name: str  # the certificate's name, else the claimed tiw-caller, else UNIDENTIFIED
    proven: bool  # named by a verified client certificate


def caller_of(context: grpc.aio.ServicerContext[Any, Any], *, mutual: bool = True) -> Caller:
    """The caller of the call ``context`` serves.

    Raises ``InvalidRequest`` naming ``tiw-caller`` for a malformed name, and ``CallerMismatch`` when a
    client certificate names someone else. ``mutual=False`` skips reading the auth context (a
    server without client certificates has none to read).
    """
    claims = [value for key, value in context.invocation_metadata() or () if key == CALLER_KEY]
    verified = certificate_name(context.auth_context()) if mutual else None
    if verified is not None and claims == [verified]:
        # The certificate's own name echoed, though a SPIFFE ID does not fit NAME.
        return Caller(verified, True)
    claimed = claimed_name(claims)
    if verified is None:
        return Caller(claimed or UNIDENTIFIED, False)
    if claimed is not None:
        raise CallerMismatch(claimed, verified)
    return Caller(verified, True)


def share_of(caller: Caller, listed: frozenset[str]) -> str:
    """The name ``caller``'s fair share is kept under: its own when proven or listed by the operator
    (who thereby vouches for it, borrowable as it is without mTLS), else ``UNIDENTIFIED``."""
    return caller.name if caller.proven or caller.name in listed else UNIDENTIFIED


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class CallerCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Resolves the caller of every unary RPC of ``services`` into ``CURRENT_CALLER`` and its share
    into ``CURRENT_SHARE`` (``listed``: the names of ``TIW_CALLER_WEIGHTS``), or refuses it.

    A refusal is answered here with the failure's rich status (ErrorInfo, and BadRequest for a
    malformed name), so nothing of the handler runs and nothing goes upstream. Placed after the
    RpcObserver, so refusals are counted and logged like any other answer.
    """

    def __init__(self, services: frozenset[str], *, mutual: bool, listed: Iterable[str]) -> None:
        self._services = services
        self._mutual = mutual
        self._listed = frozenset(listed)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            service, _, action = method.lstrip("/").rpartition("/")
            if handler is None or service not in self._services:
                return handler
            if handler.unary_unary is not None:
                wrapped = grpc.unary_unary_rpc_method_handler(
                    self._checked(handler.unary_unary, action),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
            elif handler.unary_stream is not None:
                wrapped = grpc.unary_stream_rpc_method_handler(
                    self._checked_stream(handler.unary_stream, action),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
            else:  # a client-streaming method would escape the check: say so
                raise TypeError(f"{method}: CallerCheck knows only unary-request methods")
            self._wrapped[method] = wrapped
        return wrapped

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any], action: str) -> Caller | None:
        """The call's caller; or None, once the call is answered with the refusal."""
        try:
            return caller_of(context, mutual=self._mutual)
        except FacadeError as exc:
            errors.answer(context, errors.status_for(exc, action=action))
            return None

    def _enter(self, caller: Caller) -> tuple[contextvars.Token[str], contextvars.Token[str]]:
        return CURRENT_CALLER.set(caller.name), CURRENT_SHARE.set(share_of(caller, self._listed))

    @staticmethod
    def _leave(tokens: tuple[contextvars.Token[str], contextvars.Token[str]]) -> None:
        CURRENT_SHARE.reset(tokens[1])
        CURRENT_CALLER.reset(tokens[0])

    def _checked(self, inner: Any, action: str) -> Any:
        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            caller = self._caller(context, action)
            if caller is None:
                return None
            tokens = self._enter(caller)
            try:
                return await inner(request, context)
            finally:
                self._leave(tokens)

        return checked

    def _checked_stream(self, inner: Any, action: str) -> Any:
        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            caller = self._caller(context, action)
            if caller is None:
                return
            # Not reset at the end, unlike a unary call's: each RPC runs in a task (a context) of its
            # own, and a generator may be closed from another task, where reset() would raise.
            self._enter(caller)
            async for message in inner(request, context):
                yield message

        return checked
