"""Who is calling: the caller's name, from the ``tiw-caller`` metadata or a client certificate.

Without mutual TLS a caller names itself: ``tiw-caller`` is a short name (letters, digits, ``-``,
``_``, ``.``; at most 64), anything else is refused with INVALID_ARGUMENT before anything is sent,
and a call without it belongs to the one shared caller ``unidentified``. With mutual TLS the
certificate names the caller (its SPIFFE ID, else its first DNS name, else its CN), and a
``tiw-caller`` that says otherwise is refused with PERMISSION_DENIED: a name cannot be borrowed.

With authentication on (``TIW_AUTH_*``, authn.py), a caller proves itself with its Kubernetes
projected service-account token, sent as ``authorization: Bearer …``: it is named
``system:serviceaccount:NAMESPACE:NAME`` whatever certificate it has, a bad token is refused
UNAUTHENTICATED (the reason in ErrorInfo), and so is a call without one when ``TIW_AUTH_REQUIRED``.
A token sent while authentication is off proves nothing and is ignored.

``CallerCheck`` (a server interceptor) resolves the name once per call and leaves it in
``CURRENT_CALLER`` (the name as given), and the name the call's fair share is kept under in
``CURRENT_SHARE`` (for the limiter and other per-caller bounds). A name only claimed costs nothing to
invent: a flood under 200 made-up names would otherwise take 200 turns of the round robin to one of
an honest caller's. So the share is the certificate's name, or a claimed name the operator lists in
``TIW_CALLER_WEIGHTS``; every other caller shares the one ``unidentified`` share.
"""

from __future__ import annotations

import enum
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc

from tiw_facade import access, errors
from tiw_facade.call_record import (
    CURRENT_CALL,
    CURRENT_CALLER,
    CURRENT_PRINCIPAL,
    CURRENT_SHARE,
    UNIDENTIFIED,
)
from tiw_facade.failures import (
    AuthenticationFailed,
    AuthnReason,
    CallerMismatch,
    FacadeError,
    InvalidRequest,
    NotAuthorized,
)

if TYPE_CHECKING:
    from tiw_facade.authn import TokenVerifier
    from tiw_facade.authz import Authorizer, Verdict

CALLER_KEY = "tiw-caller"
AUTHORIZATION_KEY = "authorization"
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


class Proof(enum.StrEnum):
    """How a caller's name is known: the audit trail's ``proven_by``."""

    TOKEN = "token"  # a verified service-account token
    CERTIFICATE = "certificate"  # a verified client certificate (mutual TLS)
    CLAIMED = "claimed"  # tiw-caller alone: a claim, not a proof
    NONE = "none"  # nothing: the shared caller UNIDENTIFIED


class Caller(NamedTuple):
    """Who a call says it is, and how that is known."""

    name: str  # the token's principal, else the certificate's name, else tiw-caller, else UNIDENTIFIED
    proof: Proof

    @property
    def proven(self) -> bool:
        return self.proof in (Proof.TOKEN, Proof.CERTIFICATE)

    @property
    def principal(self) -> str | None:
        """The name an authorization policy matches: a proven one only (a claim is anyone's)."""
        return self.name if self.proven else None


def caller_of(context: grpc.aio.ServicerContext[Any, Any], *, mutual: bool = True) -> Caller:
    """The caller of the call ``context`` serves, by its certificate or its claim.

    Raises ``InvalidRequest`` naming ``tiw-caller`` for a malformed name, and ``CallerMismatch`` when a
    client certificate names someone else. ``mutual=False`` skips reading the auth context (a
    server without client certificates has none to read).
    """
    claims = _values(context, CALLER_KEY)
    verified = certificate_name(context.auth_context()) if mutual else None
    if verified is not None:
        return Caller(_agreed(claims, verified), Proof.CERTIFICATE)
    claimed = claimed_name(claims)
    return Caller(claimed, Proof.CLAIMED) if claimed else Caller(UNIDENTIFIED, Proof.NONE)


async def authenticated_caller(
    context: grpc.aio.ServicerContext[Any, Any], verifier: TokenVerifier | None, *, mutual: bool
) -> Caller:
    """The caller of the call, by its token when authentication is on (``verifier``), else as
    ``caller_of`` says. Raises ``AuthenticationFailed`` as well."""
    if verifier is not None:
        tokens = _values(context, AUTHORIZATION_KEY)
        if len(tokens) > 1:
            raise AuthenticationFailed(AuthnReason.MALFORMED_TOKEN, "more than one authorization value")
        principal = await verifier.authenticate(tokens[0] if tokens else None)
        if principal is not None:
            return Caller(_agreed(_values(context, CALLER_KEY), principal.name), Proof.TOKEN)
    return caller_of(context, mutual=mutual)


def _values(context: grpc.aio.ServicerContext[Any, Any], key: str) -> list[str]:
    return [value for name, value in context.invocation_metadata() or () if name == key]


def _agreed(claims: list[str], verified: str) -> str:
    """``verified``, unless ``tiw-caller`` names someone else (``CallerMismatch``)."""
    if not claims or claims == [verified]:  # echoed, though a SPIFFE ID or a principal does not fit NAME
        return verified
    raise CallerMismatch(claimed_name(claims) or "", verified)


def share_of(caller: Caller, listed: frozenset[str]) -> str:
    """The name ``caller``'s fair share is kept under: its own when proven or listed by the operator
    (who thereby vouches for it, borrowable as it is without mTLS), else ``UNIDENTIFIED``."""
    return caller.name if caller.proven or caller.name in listed else UNIDENTIFIED


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class CallerCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Resolves the caller of every unary RPC of ``services`` into ``CURRENT_CALLER`` and its share
    into ``CURRENT_SHARE`` (``listed``: the names of ``TIW_CALLER_WEIGHTS``), or refuses it.

    A refusal (a bad or missing token, a borrowed name) is answered here with the failure's rich
    status (ErrorInfo, and BadRequest for a malformed name), so nothing of the handler runs and
    nothing goes upstream. Placed after the
    RpcObserver, so refusals are counted and logged like any other answer.
    """

    def __init__(
        self,
        services: frozenset[str],
        *,
        mutual: bool,
        listed: Iterable[str],
        verifier: TokenVerifier | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        self._services = services
        self._mutual = mutual
        self._listed = frozenset(listed)
        self._verifier = verifier  # None: authentication off
        self._authorizer = authorizer  # None: no policy
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
                    self._checked(handler.unary_unary, method, action),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
            elif handler.unary_stream is not None:
                wrapped = grpc.unary_stream_rpc_method_handler(
                    self._checked_stream(handler.unary_stream, method, action),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
            else:  # a client-streaming method would escape the check: say so
                raise TypeError(f"{method}: CallerCheck knows only unary-request methods")
            self._wrapped[method] = wrapped
        return wrapped

    async def _caller(self, context: grpc.aio.ServicerContext[Any, Any], action: str) -> Caller | None:
        """The call's caller; or None, once the call is answered with the refusal."""
        try:
            return await authenticated_caller(context, self._verifier, mutual=self._mutual)
        except FacadeError as exc:
            errors.answer(context, errors.status_for(exc, action=action))
            return None

    def _enter(self, caller: Caller) -> Callable[[], None]:
        """Sets the call's caller, share and principal; the function that resets them."""
        if (record := CURRENT_CALL.get(None)) is not None:  # the access log's line names the caller
            record.caller = caller.name
        name = CURRENT_CALLER.set(caller.name)
        share = CURRENT_SHARE.set(share_of(caller, self._listed))
        principal = CURRENT_PRINCIPAL.set(caller.principal)

        def leave() -> None:
            CURRENT_PRINCIPAL.reset(principal)
            CURRENT_SHARE.reset(share)
            CURRENT_CALLER.reset(name)

        return leave

    def _verdict(
        self, caller: Caller, call: access.Call, context: grpc.aio.ServicerContext[Any, Any], action: str
    ) -> tuple[bool, Verdict | None]:
        """Whether the call goes on, and the policy's verdict when it denies (or, in audit mode, would
        deny) it. A refused call is answered PERMISSION_DENIED here and audited."""
        if self._authorizer is None:
            return True, None
        verdict = self._authorizer.authorize(caller.principal, call.method, call.sdk_app_id)
        if verdict.refused:
            refusal = NotAuthorized(verdict.decision.rule, verdict.decision.explanation)
            errors.answer(context, errors.status_for(refusal, action=action))
            access.audit_refusal(caller, call, verdict)
            return False, verdict
        return True, (verdict if verdict.outcome == "would_deny" else None)

    def _checked(self, inner: Any, method: str, action: str) -> Any:
        audited = action in access.AUDITED

        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            caller = await self._caller(context, action)
            if caller is None:
                return None
            call = access.Call(method, request)
            proceed, verdict = self._verdict(caller, call, context, action)
            if not proceed:
                return None
            leave = self._enter(caller)
            try:
                return await inner(request, context)
            finally:
                leave()
                if audited or verdict is not None:
                    access.audit_end(caller, call, context, verdict)

        return checked

    def _checked_stream(self, inner: Any, method: str, action: str) -> Any:
        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            caller = await self._caller(context, action)
            if caller is None:
                return
            call = access.Call(method, request)
            proceed, verdict = self._verdict(caller, call, context, action)
            if not proceed:
                return
            if verdict is not None:  # audit mode: written as it begins, since a watch may last long
                access.audit_end(caller, call, context, verdict)
            # Not reset at the end, unlike a unary call's: each RPC runs in a task (a context) of its
            # own, and a generator may be closed from another task, where reset() would raise.
            self._enter(caller)
            async for message in inner(request, context):
                yield message

        return checked
