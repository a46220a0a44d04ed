"""TIW's ``POST /`` as the emulator answers it: the gateway's checks, in its order (version,
region, signature, temporary key, rate limit), the faults injected, then the action itself
(``tasks``, or ``callbacks``' four Set… actions), in TIW's envelopes (``protocol``). STS's one
action shares the address."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from tiw_facade import signing
from tiw_facade.emulator import callbacks, protocol, sts
from tiw_facade.emulator.config import EmulatorConfig
from tiw_facade.emulator.protocol import EmulatedTiwError
from tiw_facade.emulator.task_states import Fields
from tiw_facade.emulator.tasks import TaskStore
from tiw_facade.emulator.traffic import PRE_EXECUTION, ActionStats, ActionTraffic, Fault, FaultKind, Faults

_AUTH_MESSAGES: Final = {
    signing.INVALID_AUTHORIZATION: "The Authorization header is missing or malformed "
    "(TC3-HMAC-SHA256 expected).",
    signing.SECRET_ID_NOT_FOUND: "The SecretId is not found, please ensure that your SecretId is correct.",
    signing.SIGNATURE_FAILURE: "The provided credentials could not be validated. "
    "Please check your signature is correct.",
    signing.SIGNATURE_EXPIRE: "The signature has expired: X-TC-Timestamp is more than 5 minutes away "
    "from the server time.",
    sts.TOKEN_FAILURE: "The token is invalid or has expired.",
}
_MALFORMED_BODY: Final = b'{"Response": {"Unexpected": "not a TIW envelope"'


@dataclass(frozen=True)
class _Action:
    schema: Mapping[str, protocol.Param]
    handler: Callable[[Fields, float], Fields]
    traffic: ActionTraffic
    creates_task: bool


class Gateway:
    """Answers ``POST /``; counts each action's traffic and, per SecretId, the requests accepted."""

    def __init__(
        self,
        config: EmulatorConfig,
        tasks: TaskStore,
        faults: Faults,
        token_service: sts.SecurityTokenService,
        callback_routes: callbacks.CallbackRoutes,
    ) -> None:
        self.config = config
        self._clock = config.clock
        self._tasks = tasks
        self._faults = faults
        self.sts = token_service
        self._callback_routes = callback_routes
        self._verifier = signing.Verifier(self._secret_key, max_skew=config.max_clock_skew)
        # Accepted TIW requests per SecretId that signed them: which key a client used, and when.
        self.signers: collections.Counter[str] = collections.Counter()
        self._actions: dict[str, _Action] = {}
        # Set by the emulator's stop(), so that a long injected latency never holds up a shutdown.
        self.stopping = asyncio.Event()

    def reset(self) -> None:
        """Fresh counters for every action, and no signer seen."""
        config = self.config
        handlers = {**self._tasks.handlers, **self._callback_routes.handlers}
        self._actions = {
            name: _Action(
                schema,
                handlers[name],
                ActionTraffic(config.rate_limit, config.rate_window, config.arrival_history),
                creates_task=name == protocol.CREATE_SNAPSHOT_TASK,
            )
            for name, schema in (*protocol.REQUESTS.items(), *callbacks.REQUESTS.items())
        }
        self.signers.clear()

    def stats(self) -> dict[str, ActionStats]:
        return {name: action.traffic.snapshot() for name, action in self._actions.items()}

    def arrivals(self, action: str) -> list[float]:
        return list(self._actions[action].traffic.arrivals)

    def _secret_key(self, secret_id: str) -> str | None:
        return self.config.credentials.get(secret_id) or self.sts.secret_key(secret_id)

    def _date(self) -> dict[str, str]:
        """The ``Date`` header by the emulator's clock (a skewed clock shows in it, as Tencent's would)."""
        return {"Date": email.utils.formatdate(self._clock(), usegmt=True)}

    async def answer(self, request: web.Request) -> web.Response:
        body = await request.read()
        action_name = request.headers.get("X-TC-Action", "")
        fault = self._faults.take(action_name) if self._faults else None
        if fault is not None and fault.kind in PRE_EXECUTION:
            return self._answer_fault(fault, action_name)
        if action_name == sts.ACTION:  # STS shares the emulator's address: the facade's TIW_STS_ENDPOINT
            answer = self._answer_sts(request.headers, body)
        else:
            answer = self._answer(action_name, request.headers, body)
        if fault is not None:
            if fault.kind is FaultKind.DROP:
                # Executed, but the answer is lost: the client sees the connection close.
                if request.transport is not None:
                    request.transport.close()
            else:
                # Cut short by stop(), so that a long injected latency never holds up a shutdown.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), fault.delay)
        return web.Response(body=answer, content_type=protocol.CONTENT_TYPE, headers=self._date())

    def _answer_sts(self, headers: Mapping[str, str], body: bytes) -> bytes:
        request_id = str(uuid.uuid4())
        try:
            fields = self.sts.assume_role(headers, protocol.parse_body(body), self._clock())
        except EmulatedTiwError as error:
            return protocol.failure(error.code, error.message, request_id)
        return protocol.success(fields, request_id)

    def _answer(self, action_name: str, headers: Mapping[str, str], body: bytes) -> bytes:
        request_id = str(uuid.uuid4())
        action = self._actions.get(action_name)
        if action is None:
            if not action_name:
                return protocol.failure(
                    "MissingParameter", "The request is missing a required parameter `Action`.", request_id
                )
            return protocol.failure(
                "InvalidAction", f"The action `{action_name}` is not supported.", request_id
            )
        now = self._clock()
        try:
            self._admit(action, headers, body, now)
            params = protocol.parse_body(body)
            protocol.check(action.schema, params)
            if params["SdkAppId"] in self.config.unauthorized_sdk_app_ids:
                raise EmulatedTiwError(
                    "UnauthorizedOperation.SdkAppId",
                    "The SdkAppId does not exist or does not belong to this account.",
                )
            fields = action.handler(params, now)
        except EmulatedTiwError as error:
            return protocol.failure(error.code, error.message, request_id)
        if action.creates_task:
            action.traffic.tasks_created += 1
        return protocol.success(fields, request_id)

    def _admit(self, action: _Action, headers: Mapping[str, str], body: bytes, now: float) -> None:
        """The gateway's checks, in its order: what fails here never reaches the rate limit."""
        traffic = action.traffic
        version = headers.get("X-TC-Version", "")
        if version != protocol.VERSION:
            traffic.rejected += 1
            if not version:
                raise EmulatedTiwError(
                    "MissingParameter", "The request is missing a required parameter `Version`."
                )
            raise EmulatedTiwError("NoSuchVersion", f"The API version `{version}` does not exist.")
        if not headers.get("X-TC-Region"):
            traffic.rejected += 1
            raise EmulatedTiwError(
                "MissingParameter", "The request is missing a required parameter `Region`."
            )
        code = self._verifier.verify(headers, body, now)
        # Signed correctly: the key may be a temporary one, valid only with its token and until it expires.
        auth = signing.parse_authorization(headers["Authorization"]) if code is None else None
        if auth is not None:
            code = self.sts.check_token(auth.secret_id, headers.get("X-TC-Token", ""), now)
        if code is not None:
            traffic.rejected += 1
            raise EmulatedTiwError(code, _AUTH_MESSAGES[code])
        if not traffic.admit(now):
            raise EmulatedTiwError(
                "RequestLimitExceeded", "Your current request times equals to `limit`, please retry later."
            )
        if auth is not None:
            self.signers[auth.secret_id] += 1

    def _answer_fault(self, fault: Fault, action_name: str) -> web.Response:
        action = self._actions.get(action_name)
        if action is not None:
            action.traffic.faulted += 1
        if fault.kind is FaultKind.HTTP_STATUS:
            return web.Response(
                status=fault.status,
                text=f"<html><body>{fault.status} injected</body></html>",
                content_type="text/html",
                headers=self._date(),
            )
        if fault.kind is FaultKind.MALFORMED:
            return web.Response(
                body=_MALFORMED_BODY, content_type=protocol.CONTENT_TYPE, headers=self._date()
            )
        return web.Response(
            body=protocol.failure(fault.code, fault.message, str(uuid.uuid4())),
            content_type=protocol.CONTENT_TYPE,
            headers=self._date(),
        )
