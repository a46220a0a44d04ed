"""TIW's callbacks as the emulator sends them: a JSON POST when a task enters a state that has an
event, signed as TIW signs them, retried until answered 200 as TIW retries them (so delivered at
least once), with faults to inject.

Where each kind goes and which key signs it is set per SdkAppId by four actions
(``SetWhiteboardPushCallback`` …, ``CallbackRoutes``), by a snapshot task's own ``CallbackURL``,
or for every SdkAppId by ``EmulatorConfig.callback_url`` and ``callback_key``.

The sender (``CallbackSender``) follows the tasks' timelines (``task_states``' ``changes()``) by the
emulator's clock: it sleeps until the next change is due (at most ``callback_poll_seconds``, for a
clock a test moves by hand), and wakes early when a task is added or stopped. Each change is sent
once; a change from before the emulator's last reset (the seeded documentary examples) never is.

The snapshot and video events are not publicly documented: their names and EventData are this
emulator's invention (docs/emulator.md), for a receiver that treats every callback as a hint and
confirms it with a Describe.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import heapq
import itertools
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from tiw_facade.emulator.config import EmulatorConfig
from tiw_facade.emulator.protocol import EmulatedTiwError, Kind, Param
from tiw_facade.emulator.task_states import Fields, PushTask, SnapshotTask, Task
from tiw_facade.emulator.tasks import TaskStore
from tiw_facade.emulator.traffic import FaultList, fault_from_json

logger = logging.getLogger(__name__)

SET_PUSH_CALLBACK: Final = "SetWhiteboardPushCallback"
SET_PUSH_CALLBACK_KEY: Final = "SetWhiteboardPushCallbackKey"
SET_VIDEO_CALLBACK: Final = "SetVideoGenerationTaskCallback"
SET_VIDEO_CALLBACK_KEY: Final = "SetVideoGenerationTaskCallbackKey"

_SDK_APP_ID: Final = Param(Kind.I64, required=True)
_TEXT: Final = Param(Kind.STRING, required=True)
# The four actions' parameters, checked by the gateway as it checks the five task actions'.
REQUESTS: Final[Mapping[str, Mapping[str, Param]]] = {
    SET_PUSH_CALLBACK: {"SdkAppId": _SDK_APP_ID, "Callback": _TEXT},
    SET_PUSH_CALLBACK_KEY: {"SdkAppId": _SDK_APP_ID, "CallbackKey": _TEXT},
    SET_VIDEO_CALLBACK: {"SdkAppId": _SDK_APP_ID, "Callback": _TEXT},
    SET_VIDEO_CALLBACK_KEY: {"SdkAppId": _SDK_APP_ID, "CallbackKey": _TEXT},
}

# The path of each kind under `config.callback_url`: the facade's intake serves these three.
PATHS: Final[Mapping[str, str]] = {
    "push": "/callbacks/push",
    "snapshot": "/callbacks/snapshot",
    "video": "/callbacks/video",
}

# The event sent when a task enters a state; the states absent (a task's first: Running, PREPARED,
# QUEUED) send none. TIW documents the two push events; the others are the emulator's invention.
EVENT_TYPES: Final[Mapping[tuple[str, str], str]] = {
    ("snapshot", "Finished"): "SnapshotTaskFinished",
    ("push", "PUSHING"): "WhiteboardPushStarted",
    ("push", "STOPPED"): "WhiteboardPushStopped",
    ("video", "PROCESSING"): "VideoGenerationTaskChanged",
    ("video", "FINISHED"): "VideoGenerationTaskFinished",
}
_PUSH_STARTED_FIELDS: Final = ("TaskId", "RoomId", "PushUserId", "PushStartTime")
_PUSH_STOPPED_FIELDS: Final = (
    "TaskId",
    "RoomId",
    "GroupId",
    "PushUserId",
    "FinishReason",
    "PushStartTime",
    "PushStopTime",
    "IMSyncTime",
    "ExceptionCnt",
)
_VIDEO_FIELDS: Final = ("TaskId", "RoomId", "GroupId", "Status", "Progress")


def sign(key: str, expire_time: int) -> str:
    """TIW's callback signature: the hex MD5 of the key then the ExpireTime's digits; "" with no key."""
    if not key:
        return ""
    return hashlib.md5((key + str(expire_time)).encode()).hexdigest()


def event_data(kind: str, task: Task, at: float, state: str) -> Fields:
    """EventData of the event ``task`` entering ``state`` at ``at``: what a Describe then answers."""
    if isinstance(task, PushTask):
        described = task.describe(at)
        # TIW adds Error {Code, Message} only when a push failed (FinishReason EXCEPTION): never here.
        fields = _PUSH_STOPPED_FIELDS if state == "STOPPED" else _PUSH_STARTED_FIELDS
        return {name: described[name] for name in fields}
    if isinstance(task, SnapshotTask):
        return task.describe(at)
    described = task.describe(at)
    data = {name: described[name] for name in _VIDEO_FIELDS}
    if state == "FINISHED":
        data.update(TotalTime=described["TotalTime"], VideoInfoList=described["VideoInfoList"])
    return data


# --- where callbacks go, set per SdkAppId by four actions ---


def _checked_key(params: Fields) -> str:
    key: str = params["CallbackKey"]
    if len(key) > 64:  # TIW: at most 64 characters
        raise EmulatedTiwError("InvalidParameter", "The parameter `CallbackKey` is over 64 characters.")
    return key


def _checked_url(params: Fields) -> str:
    url: str = params["Callback"]
    if url and not url.startswith(("http://", "https://")):
        raise EmulatedTiwError("InvalidParameter", "The parameter `Callback` is not a valid URL.")
    return url


class CallbackRoutes:
    """Each SdkAppId's callback URLs and keys, as the four Set… actions leave them. A value set
    (even "": no callback, or unsigned) wins over the config's ``callback_url`` and ``callback_key``."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.push_urls: dict[int, str] = {}
        self.push_keys: dict[int, str] = {}
        self.video_urls: dict[int, str] = {}
        self.video_keys: dict[int, str] = {}

    @property
    def handlers(self) -> Mapping[str, Callable[[Fields, float], Fields]]:
        return {
            SET_PUSH_CALLBACK: self._set_push_url,
            SET_PUSH_CALLBACK_KEY: self._set_push_key,
            SET_VIDEO_CALLBACK: self._set_video_url,
            SET_VIDEO_CALLBACK_KEY: self._set_video_key,
        }

    def reset(self) -> None:
        for table in (self.push_urls, self.push_keys, self.video_urls, self.video_keys):
            table.clear()

    def url(self, kind: str, sdk_app_id: int, task: Task) -> str:
        """Where ``task``'s callbacks go ("": nowhere)."""
        base = self.config.callback_url.rstrip("/")
        default = f"{base}{PATHS[kind]}" if base else ""
        if isinstance(task, SnapshotTask):
            return task.callback_url or default
        urls = self.push_urls if kind == "push" else self.video_urls
        return urls.get(sdk_app_id, default)

    def key(self, kind: str, sdk_app_id: int) -> str:
        """The key signing ``kind``'s callbacks: a snapshot's is the push key (TIW does not say)."""
        keys = self.video_keys if kind == "video" else self.push_keys
        return keys.get(sdk_app_id, self.config.callback_key)

    # The actions' handlers (parameters already checked against REQUESTS); TIW answers nothing but
    # the RequestId.

    def _set_push_url(self, params: Fields, now: float) -> Fields:
        self.push_urls[params["SdkAppId"]] = _checked_url(params)
        return {}

    def _set_push_key(self, params: Fields, now: float) -> Fields:
        self.push_keys[params["SdkAppId"]] = _checked_key(params)
        return {}

    def _set_video_url(self, params: Fields, now: float) -> Fields:
        self.video_urls[params["SdkAppId"]] = _checked_url(params)
        return {}

    def _set_video_key(self, params: Fields, now: float) -> Fields:
        self.video_keys[params["SdkAppId"]] = _checked_key(params)
        return {}


# --- faults and counters ---


class CallbackFaultKind(enum.StrEnum):
    DELAY = "delay"  # posted `delay` seconds late (real seconds)
    DUPLICATE = "duplicate"  # posted twice, the same body: two callbacks, each retried on its own
    DROP = "drop"  # never posted
    BAD_SIGN = "bad_sign"  # Sign made with another key
    EXPIRED = "expired"  # ExpireTime a minute before now (and signed for it, correctly)


_JSON_TYPES: Final[Mapping[str, type | tuple[type, ...]]] = {
    "kind": str,
    "event_type": str,
    "count": int,
    "probability": (int, float),
    "delay": (int, float),
}


@dataclass
class CallbackFault:
    """A fault for callbacks of ``event_type`` (``None``: every event), each one with
    ``probability``, for the next ``count`` callbacks it applies to (``None``: until cleared)."""

    kind: CallbackFaultKind
    event_type: str | None = None
    count: int | None = None
    probability: float = 1.0
    delay: float = 1.0

    def __post_init__(self) -> None:
        self.kind = CallbackFaultKind(self.kind)
        if self.count is not None and self.count < 1:
            raise ValueError("count must be >= 1 (or absent: until cleared)")
        if not 0 <= self.probability <= 1:
            raise ValueError("probability must be between 0 and 1")
        if self.delay < 0:
            raise ValueError("delay must not be negative")

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> CallbackFault:
        """A fault from the admin endpoint's JSON, field names as in this class."""
        return fault_from_json(
            cls, document, _JSON_TYPES, may_be_null={"event_type", "count"}, what="callback fault"
        )


class CallbackFaults(FaultList[CallbackFault]):
    """The active faults of callbacks; the newest for the event's type (or every type), and whose
    chance comes up, applies."""

    def __init__(self) -> None:
        chance = random.Random()
        super().__init__(
            lambda fault: fault.event_type,
            lambda fault, event_type: (
                fault.event_type in (None, event_type) and chance.random() < fault.probability
            ),
        )


@dataclass(frozen=True)
class CallbackStats:
    """Counters since the last reset. A callback is one delivery of one event: a duplicated event
    makes two, a dropped one none."""

    sent: int  # callbacks begun
    attempts: int  # POSTs made, retries included
    delivered: int  # callbacks answered 200
    failed: int  # callbacks given up: no 200 after `callback_attempts` POSTs
    dropped: int  # events never sent, by a drop fault
    faulted: int  # events a fault applied to (dropped ones too)
    in_flight: int  # callbacks neither delivered nor failed yet (delayed, posting, between retries)


@dataclass
class _Counters:
    sent: int = 0
    attempts: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    faulted: int = 0

    def snapshot(self) -> CallbackStats:
        in_flight = self.sent - self.delivered - self.failed
        return CallbackStats(
            self.sent, self.attempts, self.delivered, self.failed, self.dropped, self.faulted, in_flight
        )


# --- the sender ---

_TaskKey = tuple[str, int, str]  # kind, SdkAppId, task ID


class CallbackSender:
    """Sends each task's callbacks when its changes of state come due, between ``start()`` and
    ``stop()``; ``reset()`` forgets what it sent, its routes, faults and counters."""

    def __init__(self, config: EmulatorConfig, tasks: TaskStore) -> None:
        self.config = config
        self._clock = config.clock
        self._tasks = tasks
        tasks.on_change = self.task_changed
        self.routes = CallbackRoutes(config)
        self.faults = CallbackFaults()
        self._counters = _Counters()
        # Changes are sent from this instant on (by the clock): none from before the last reset.
        self._since = 0.0
        # Per task, the changes (when, state) already sent or passed over; and when each task is next
        # due, with the heap of those times (entries that no longer match `_due` are stale).
        self._handled: dict[_TaskKey, set[tuple[float, str]]] = {}
        self._due: dict[_TaskKey, float] = {}
        self._heap: list[tuple[float, int, _TaskKey]] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    @property
    def running(self) -> bool:
        return self._loop_task is not None

    async def start(self) -> None:
        if self._loop_task is not None:
            raise RuntimeError("the callback sender is already running")
        self._session = aiohttp.ClientSession()
        self._wake = asyncio.Event()  # a fresh one: an Event belongs to the loop it first waited on
        self._loop_task = asyncio.create_task(self._run(), name="tiw-emulator-callbacks")

    async def stop(self) -> None:
        """Stop sending: a callback delayed or between retries is abandoned (not counted failed)."""
        loop_task, self._loop_task = self._loop_task, None
        if loop_task is not None:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
        await self._cancel_deliveries()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def reset(self, now: float) -> None:
        """Forget every task's changes, the routes set by actions, the faults and the counters;
        changes before ``now`` will never be sent. Callbacks in flight are abandoned."""
        for delivery in self._deliveries:
            delivery.cancel()
        self._deliveries.clear()
        self.routes.reset()
        self.faults.clear()
        self._counters = _Counters()
        self._since = now
        self._handled.clear()
        self._due.clear()
        self._heap.clear()

    def stats(self) -> CallbackStats:
        return self._counters.snapshot()

    def wake(self) -> None:
        """Look at the clock now, not at the next poll: for a test that has just moved its clock."""
        self._wake.set()

    def task_changed(self, kind: str, sdk_app_id: int, task_id: str) -> None:
        """A task was added or stopped: its changes are new (TaskStore's ``on_change``)."""
        self._schedule((kind, sdk_app_id, task_id))
        self._wake.set()

    async def _cancel_deliveries(self) -> None:
        deliveries = list(self._deliveries)
        for delivery in deliveries:
            delivery.cancel()
        await asyncio.gather(*deliveries, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock()
            self._send_due(now)
            # Nothing to come: only a task added or stopped (or wake()) has anything to send.
            timeout = None
            if self._heap:
                timeout = min(self.config.callback_poll_seconds, max(0.0, self._heap[0][0] - now))
            # asyncio.timeout, not wait_for: on 3.11, wait_for swallows a cancel (stop()) that comes
            # as the event is set (add_task then stop), and the sender would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _schedule(self, key: _TaskKey) -> None:
        """Note when ``key``'s first change not yet handled is due, if it has one."""
        task = self._tasks.task(*key)
        handled = self._handled.get(key, set())
        upcoming = None if task is None else next((c for c in task.changes() if c not in handled), None)
        if upcoming is None:
            self._due.pop(key, None)
            if task is None:
                self._handled.pop(key, None)
        elif self._due.get(key) != upcoming[0]:
            self._due[key] = upcoming[0]
            heapq.heappush(self._heap, (upcoming[0], next(self._order), key))

    def _send_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, key = heapq.heappop(heap)
            if self._due.get(key) != at:
                continue  # stale: the task was stopped since, which moved its next change
            del self._due[key]
            task = self._tasks.task(*key)
            if task is not None:
                # A set of what was handled, not a count: a stop at the very instant a push started
                # replaces PUSHING by STOPPED in its timeline, and STOPPED must still be sent.
                handled = self._handled.setdefault(key, set())
                for change in task.changes():
                    if change[0] > now:
                        break
                    if change not in handled:
                        handled.add(change)
                        if change[0] >= self._since:
                            self._send(key, task, *change)
            self._schedule(key)

    def _send(self, key: _TaskKey, task: Task, at: float, state: str) -> None:
        kind, sdk_app_id, _ = key
        event_type = EVENT_TYPES.get((kind, state))
        url = self.routes.url(kind, sdk_app_id, task) if event_type is not None else ""
        if event_type is None or not url:
            return
        counters = self._counters
        fault = self.faults.take(event_type)
        if fault is not None:
            counters.faulted += 1
            if fault.kind is CallbackFaultKind.DROP:
                counters.dropped += 1
                return
        timestamp = int(at)
        expire_time = timestamp + self.config.callback_expire_seconds
        key_text = self.routes.key(kind, sdk_app_id)
        signature_key = key_text
        if fault is not None and fault.kind is CallbackFaultKind.EXPIRED:
            expire_time = int(self._clock()) - 60
        elif fault is not None and fault.kind is CallbackFaultKind.BAD_SIGN:
            signature_key = f"not-{key_text}-the-key"
        body = json.dumps(
            {
                "Timestamp": timestamp,
                "SdkAppId": sdk_app_id,
                "ExpireTime": expire_time,
                "Sign": sign(signature_key, expire_time),
                "EventType": event_type,
                "EventData": event_data(kind, task, at, state),
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
        delay = fault.delay if fault is not None and fault.kind is CallbackFaultKind.DELAY else 0.0
        copies = 2 if fault is not None and fault.kind is CallbackFaultKind.DUPLICATE else 1
        for _ in range(copies):
            counters.sent += 1
            delivery = asyncio.create_task(
                self._deliver(counters, url, body, delay), name="tiw-emulator-callback"
            )
            self._deliveries.add(delivery)
            delivery.add_done_callback(self._deliveries.discard)

    async def _deliver(self, counters: _Counters, url: str, body: bytes, delay: float) -> None:
        """Post until answered 200, or `callback_attempts` times (TIW retries, so at least once)."""
        if delay:
            await asyncio.sleep(delay)
        pause = self.config.callback_retry_seconds
        for attempt in range(1, self.config.callback_attempts + 1):
            counters.attempts += 1
            if await self._post(url, body):
                counters.delivered += 1
                return
            if attempt < self.config.callback_attempts:
                await asyncio.sleep(pause)
                pause *= 2
        counters.failed += 1
        logger.info("TIW emulator: gave up a callback to %s after %d attempts", url, attempt)

    async def _post(self, url: str, body: bytes) -> bool:
        session = self._session
        if session is None:
            return False
        try:
            async with session.post(
                url,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.config.callback_timeout),
            ) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("TIW emulator: a callback to %s failed: %r", url, exc)
            return False
