"""The emulator's admin endpoints under ``/_emulator``: unsigned, never rate limited, each one a
part of ``Emulator``'s Python API over JSON (stats, faults, reset, tasks, the callbacks' faults and
stats), for a process that runs the emulator in another (``tiw-facade emulator``, the benchmarks)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from tiw_facade.emulator.callbacks import CallbackFault
from tiw_facade.emulator.traffic import Fault

if TYPE_CHECKING:
    from tiw_facade.emulator.server import Emulator

ADMIN_PREFIX: Final = "/_emulator"
# The admin task endpoint's fields: JSON name, keyword of add_*_task, JSON type; common to every
# kind, then each kind's own (its durations, in seconds from now, non-negative).
_TASK_FIELDS: Final = (("TaskId", "task_id", str), ("SdkAppId", "sdk_app_id", int))
_KIND_FIELDS: Final[Mapping[str, tuple[tuple[str, str, type | tuple[type, ...]], ...]]] = {
    "snapshot": (("RunSeconds", "run_seconds", (int, float)), ("CallbackURL", "callback_url", str)),
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


class Admin:
    """The admin endpoints of one emulator."""

    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(f"{ADMIN_PREFIX}/stats", self._stats)
        router.add_get(f"{ADMIN_PREFIX}/faults", self._faults)
        router.add_post(f"{ADMIN_PREFIX}/faults", self._add_fault)
        router.add_delete(f"{ADMIN_PREFIX}/faults", self._clear_faults)
        router.add_post(f"{ADMIN_PREFIX}/reset", self._reset)
        router.add_post(f"{ADMIN_PREFIX}/tasks", self._add_task)
        router.add_get(f"{ADMIN_PREFIX}/tasks", self._tasks)
        router.add_get(f"{ADMIN_PREFIX}/callbacks/stats", self._callback_stats)
        router.add_get(f"{ADMIN_PREFIX}/callbacks/faults", self._callback_faults)
        router.add_post(f"{ADMIN_PREFIX}/callbacks/faults", self._add_callback_fault)
        router.add_delete(f"{ADMIN_PREFIX}/callbacks/faults", self._clear_callback_faults)

    async def _stats(self, request: web.Request) -> web.Response:
        emulator = self._emulator
        return web.json_response(
            {
                "rate_limit": emulator.config.rate_limit,
                "rate_window": emulator.config.rate_window,
                "actions": {name: dataclasses.asdict(stats) for name, stats in emulator.stats().items()},
            }
        )

    async def _faults(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": [dataclasses.asdict(f) for f in self._emulator.faults()]})

    async def _add_fault(self, request: web.Request) -> web.Response:
        try:
            self._emulator.add_fault(Fault.from_json(await _json_object(request)))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return await self._faults(request)

    async def _clear_faults(self, request: web.Request) -> web.Response:
        self._emulator.clear_faults(request.query.get("action"))
        return await self._faults(request)

    async def _callback_stats(self, request: web.Request) -> web.Response:
        return web.json_response(dataclasses.asdict(self._emulator.callback_stats()))

    async def _callback_faults(self, request: web.Request) -> web.Response:
        faults = self._emulator.callback_faults()
        return web.json_response({"faults": [dataclasses.asdict(f) for f in faults]})

    async def _add_callback_fault(self, request: web.Request) -> web.Response:
        try:
            self._emulator.add_callback_fault(CallbackFault.from_json(await _json_object(request)))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return await self._callback_faults(request)

    async def _clear_callback_faults(self, request: web.Request) -> web.Response:
        self._emulator.clear_callback_faults(request.query.get("event_type"))
        return await self._callback_faults(request)

    async def _reset(self, request: web.Request) -> web.Response:
        self._emulator.reset()
        return web.json_response({"reset": True})

    async def _add_task(self, request: web.Request) -> web.Response:
        """``{"Kind": "snapshot" | "push" | "video", "TaskId"?: str, "SdkAppId"?: int, ...}``: then
        ``RunSeconds``, ``CallbackURL`` (snapshot), ``RoomId``, ``PrepareSeconds``, ``PushSeconds``
        (push), ``RoomId``, ``QueueSeconds``, ``ProcessSeconds`` (video), all optional."""
        try:
            document = await _json_object(request)
            kind = document.pop("Kind", None)
            adders: dict[str, Callable[..., str]] = {
                "snapshot": self._emulator.add_snapshot_task,
                "push": self._emulator.add_push_task,
                "video": self._emulator.add_video_task,
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

    async def _tasks(self, request: web.Request) -> web.Response:
        """``{"Now": t, "Tasks": [{"Kind", "SdkAppId", "TaskId", "Changes": [[t, state], ...]}]}``.

        ``?kind=`` narrows to one kind. ``Now`` tells the changes that happened from those to come.
        """
        kind = request.query.get("kind")
        records = [r for r in self._emulator.task_records() if kind is None or r.kind == kind]
        return web.json_response(
            {
                "Now": self._emulator.config.clock(),
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
