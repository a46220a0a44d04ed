"""The emulator's HTTP side: TIW's ``POST /`` and the ``/_emulator/...`` admin endpoints."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import email.utils
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from aiohttp import web

from tiw_facade import signing
from tiw_facade.emulator import protocol, sts
from tiw_facade.emulator.config import EmulatorConfig
from tiw_facade.emulator.protocol import TiwError
from tiw_facade.emulator.tasks import SEED_SDK_APP_ID, Fields, TaskRecord, TaskStore
from tiw_facade.emulator.traffic import PRE_EXECUTION, ActionStats, ActionTraffic, Fault, FaultKind, Faults

logger = logging.getLogger(__name__)

ADMIN_PREFIX: Final = "/_emulator"
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
# The admin task endpoint's fields: JSON name, keyword of add_*_task, JSON type; common to every
# kind, then each kind's own (its durations, in seconds from now, non-negative).
_TASK_FIELDS: Final = (("TaskId", "task_id", str), ("SdkAppId", "sdk_app_id", int))
_KIND_FIELDS: Final[Mapping[str, tuple[tuple[str, str, type | tuple[type, ...]], ...]]] = {
    "snapshot": (("RunSeconds", "run_seconds", (int, float)),),
    "push": (
        ("RoomId", "room_id", int),
        ("PrepareSeconds", "prepare_seconds", (int, float)),
        ("PushSeconds", "push_seconds", (int, float)),
    ),
    "video": (
        ("RoomId", "room_id", int),
        ("QueueSeconds", "queue_seconds", (int, float)),
        ("ProcessSeconds", "process_seconds", (int, float)),
    ),
}
_MALFORMED_BODY: Final = b'{"Response": {"Unexpected": "not a TIW envelope"'


@dataclass(frozen=True)
class _Action:
    schema: Mapping[str, protocol.Param]
    handler: Callable[[Fields, float], Fields]
    traffic: ActionTraffic
    creates_task: bool


class Emulator:
    """An independent TIW (version 2019-09-19) over HTTP, for tests, demos and benchmarks.

    ``await start()`` returns the base URL; ``stop()`` closes it. Between the two, the Python
    methods below (faults, stats, tasks) and their admin endpoints act on the running server.
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self._clock = self.config.clock
        self.sts = sts.SecurityTokenService(self.config)
        self._verifier = signing.Verifier(self._secret_key, max_skew=self.config.max_clock_skew)
        # Accepted TIW requests per SecretId that signed them: which key a client used, and when.
        self.signers: collections.Counter[str] = collections.Counter()
        self.tasks = TaskStore(self.config)
        self._faults = Faults()
        self._actions: dict[str, _Action] = {}
        self.reset()
        self.app = self._make_app()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.url = ""

    # --- lifecycle ---

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); return the base URL, e.g. http://127.0.0.1:PORT."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        # No access log: it would cost more than the emulated action on the benchmarks' hot path.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self.url = f"http://[{host}]:{bound_port}" if ":" in host else f"http://{host}:{bound_port}"
        logger.debug("TIW emulator listening on %s", self.url)  # the CLI says where, and with which key
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            self._stopping.set()
            await runner.cleanup()
            self._stopping = asyncio.Event()

    async def serve_forever(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start, then serve until cancelled (what the CLI runs)."""
        await self.start(host, port)
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- the Python API of faults, stats and tasks ---

    def reset(self) -> None:
        """Forget tasks, counters and faults; seed the documented example tasks again."""
        config = self.config
        handlers = self.tasks.handlers
        self._actions = {
            name: _Action(
                schema,
                handlers[name],
                ActionTraffic(config.rate_limit, config.rate_window, config.arrival_history),
                creates_task=name == protocol.CREATE_SNAPSHOT_TASK,
            )
            for name, schema in protocol.REQUESTS.items()
        }
        self._faults.clear()
        self.signers.clear()
        self.tasks.reset(self._clock())

    def add_fault(self, fault: Fault) -> None:
        self._faults.add(fault)

    def clear_faults(self, action: str | None = None) -> None:
        self._faults.clear(action)

    def faults(self) -> list[Fault]:
        return self._faults.active()

    def stats(self) -> dict[str, ActionStats]:
        return {name: action.traffic.snapshot() for name, action in self._actions.items()}

    def arrivals(self, action: str) -> list[float]:
        """Accepted arrival times of ``action`` (the latest ``config.arrival_history``)."""
        return list(self._actions[action].traffic.arrivals)

    def add_snapshot_task(
        self,
        task_id: str | None = None,
        *,
        sdk_app_id: int = SEED_SDK_APP_ID,
        run_seconds: float | None = None,
    ) -> str:
        """A snapshot task, Running now and Finished after ``run_seconds`` (default ``snapshot_seconds``)."""
        return self.tasks.add_snapshot(
            self._clock(), task_id=task_id, sdk_app_id=sdk_app_id, run_seconds=run_seconds
        )

    def add_push_task(
        self,
        task_id: str | None = None,
        *,
        sdk_app_id: int = SEED_SDK_APP_ID,
        room_id: int = 880528,
        prepare_seconds: float | None = None,
        push_seconds: float | None = None,
    ) -> str:
        """A whiteboard push task, PREPARED now and PUSHING after ``prepare_seconds`` (default
        ``push_prepare_seconds``), until stopped by a call or, if given, ``push_seconds`` later."""
        return self.tasks.add_push(
            self._clock(),
            task_id=task_id,
            sdk_app_id=sdk_app_id,
            room_id=room_id,
            prepare_seconds=prepare_seconds,
            push_seconds=push_seconds,
        )

    def add_video_task(
        self,
        task_id: str | None = None,
        *,
        sdk_app_id: int = SEED_SDK_APP_ID,
        room_id: int = 900822,
        queue_seconds: float | None = None,
        process_seconds: float | None = None,
    ) -> str:
        """A video generation task, QUEUED now, then PROCESSING, then FINISHED (durations default to
        ``video_queue_seconds`` and ``video_process_seconds``)."""
        return self.tasks.add_video(
            self._clock(),
            task_id=task_id,
            sdk_app_id=sdk_app_id,
            room_id=room_id,
            queue_seconds=queue_seconds,
            process_seconds=process_seconds,
        )

    def task_records(self) -> list[TaskRecord]:
        """Every task's changes of state, by the emulator's clock (Unix seconds unless it was given
        another): fixed when the task was created, so those still to come are included."""
        return self.tasks.records()

    # --- TIW ---

    def _secret_key(self, secret_id: str) -> str | None:
        return self.config.credentials.get(secret_id) or self.sts.secret_key(secret_id)

    def _date(self) -> dict[str, str]:
        """The ``Date`` header by the emulator's clock (a skewed clock shows in it, as Tencent's would)."""
        return {"Date": email.utils.formatdate(self._clock(), usegmt=True)}

    async def _tiw(self, request: web.Request) -> web.Response:
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
                    await asyncio.wait_for(self._stopping.wait(), fault.delay)
        return web.Response(body=answer, content_type=protocol.CONTENT_TYPE, headers=self._date())

    def _answer_sts(self, headers: Mapping[str, str], body: bytes) -> bytes:
        request_id = str(uuid.uuid4())
        try:
            fields = self.sts.assume_role(headers, protocol.parse_body(body), self._clock())
        except TiwError as error:
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
                raise TiwError(
                    "UnauthorizedOperation.SdkAppId",
                    "The SdkAppId does not exist or does not belong to this account.",
                )
            fields = action.handler(params, now)
        except TiwError as error:
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
                raise TiwError("MissingParameter", "The request is missing a required parameter `Version`.")
            raise TiwError("NoSuchVersion", f"The API version `{version}` does not exist.")
        if not headers.get("X-TC-Region"):
            traffic.rejected += 1
            raise TiwError("MissingParameter", "The request is missing a required parameter `Region`.")
        code = self._verifier.verify(headers, body, now)
        # Signed correctly: the key may be a temporary one, valid only with its token and until it expires.
        auth = signing.parse_authorization(headers["Authorization"]) if code is None else None
        if auth is not None:
            code = self.sts.check_token(auth.secret_id, headers.get("X-TC-Token", ""), now)
        if code is not None:
            traffic.rejected += 1
            raise TiwError(code, _AUTH_MESSAGES[code])
        if not traffic.admit(now):
            raise TiwError(
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

    # --- admin: unsigned, never rate limited ---

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self._tiw)
        app.router.add_get(f"{ADMIN_PREFIX}/stats", self._admin_stats)
        app.router.add_get(f"{ADMIN_PREFIX}/faults", self._admin_faults)
        app.router.add_post(f"{ADMIN_PREFIX}/faults", self._admin_add_fault)
        app.router.add_delete(f"{ADMIN_PREFIX}/faults", self._admin_clear_faults)
        app.router.add_post(f"{ADMIN_PREFIX}/reset", self._admin_reset)
        app.router.add_post(f"{ADMIN_PREFIX}/tasks", self._admin_add_task)
        app.router.add_get(f"{ADMIN_PREFIX}/tasks", self._admin_tasks)
        return app

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "rate_limit": self.config.rate_limit,
                "rate_window": self.config.rate_window,
                "actions": {name: dataclasses.asdict(stats) for name, stats in self.stats().items()},
            }
        )

    async def _admin_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": [dataclasses.asdict(f) for f in self._faults.active()]})

    async def _admin_add_fault(self, request: web.Request) -> web.Response:
        try:
            self.add_fault(Fault.from_json(await _json_object(request)))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return await self._admin_faults(request)

    async def _admin_clear_faults(self, request: web.Request) -> web.Response:
        self.clear_faults(request.query.get("action"))
        return await self._admin_faults(request)

    async def _admin_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def _admin_add_task(self, request: web.Request) -> web.Response:
        """``{"Kind": "snapshot" | "push" | "video", "TaskId"?: str, "SdkAppId"?: int, ...}``: then
        ``RunSeconds`` (snapshot), ``RoomId``, ``PrepareSeconds``, ``PushSeconds`` (push), ``RoomId``,
        ``QueueSeconds``, ``ProcessSeconds`` (video), all optional."""
        try:
            document = await _json_object(request)
            kind = document.pop("Kind", None)
            adders: dict[str, Callable[..., str]] = {
                "snapshot": self.add_snapshot_task,
                "push": self.add_push_task,
                "video": self.add_video_task,
            }
            if kind not in adders:
                raise ValueError(f'"Kind" must be one of {sorted(adders)}')
            fields = (*_TASK_FIELDS, *_KIND_FIELDS[kind])
            unknown = set(document) - {key for key, _, _ in fields}
            if unknown:
                raise ValueError(f"unknown fields for {kind}: {sorted(unknown)}")
            options = {
                name: _typed(document, key, json_type) for key, name, json_type in fields if key in document
            }
            task_id = adders[kind](**options)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"TaskId": task_id})

    async def _admin_tasks(self, request: web.Request) -> web.Response:
        """``{"Now": t, "Tasks": [{"Kind", "SdkAppId", "TaskId", "Changes": [[t, state], ...]}]}``.

        ``?kind=`` narrows to one kind. ``Now`` tells the changes that happened from those to come.
        """
        kind = request.query.get("kind")
        records = [r for r in self.task_records() if kind is None or r.kind == kind]
        return web.json_response(
            {
                "Now": self._clock(),
                "Tasks": [
                    {
                        "Kind": r.kind,
                        "SdkAppId": r.sdk_app_id,
                        "TaskId": r.task_id,
                        "Changes": [[at, state] for at, state in r.changes],
                    }
                    for r in records
                ],
            }
        )


def _typed(document: Mapping[str, Any], key: str, json_type: type | tuple[type, ...]) -> Any:
    value: Any = document[key]
    # bool is an int to Python, never to JSON; and a duration cannot be negative.
    if isinstance(value, bool) or not isinstance(value, json_type):
        names = json_type.__name__ if isinstance(json_type, type) else "number"
        raise ValueError(f'"{key}" must be of type {names}')
    if key.endswith("Seconds") and document[key] < 0:
        raise ValueError(f'"{key}" must not be negative')
    return value


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        document = json.loads(await request.read() or b"{}")
    except ValueError:
        raise ValueError("the body must be JSON") from None
    if not isinstance(document, dict):
        raise ValueError("the body must be a JSON object")
    return document
