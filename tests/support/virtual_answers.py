"""``Answers`` in virtual time, built as a test builds it: a Config, no Settings, no Redis, around a
stand-in for the handler's fetch (``Tiw``: task states the test sets, requests it may hold back or
fail). Time is two VirtualClocks: ages are exact, and nothing waits for time to pass."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.answers import Answers, Config, Served
from tiw_facade.answers._policy import RESPONSES
from tiw_facade.call_record import CURRENT_SHARE
from tiw_facade.failures import NoSpareQuota, TiwError
from tiw_facade.metrics import Metrics

from support.clock import VirtualClock

SDK_APP_ID = 1400000001
DESCRIBE = "DescribeSnapshotTask"
PUSH = "DescribeWhiteboardPush"
NOT_FOUND = "InvalidParameter.TaskNotFound"


@dataclasses.dataclass(frozen=True)
class Call:
    """A call of the fetch: a request on its way to a rate-limit slot, and then to TIW."""

    action: str
    task_id: str
    deadline: float | None
    spare: bool
    share: str  # the fair share its slot was queued under (call_record.CURRENT_SHARE)


class Tiw:
    """TIW as ``Answers``' fetch reaches it. ``states``: each task's status (absent: unknown task).
    ``slot``: while set, requests wait for it to open before they get a rate-limit slot; ``fail``:
    the next requests then fail so, unsent. ``answer``: while set, TIW, having read the state, holds
    its answer back until it opens. ``no_spare``: refreshes find no spare quota."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.calls: list[Call] = []
        self.slot: asyncio.Event | None = None
        self.answer: asyncio.Event | None = None
        self.no_spare = False
        self._failures: list[BaseException] = []
        self._answered = 0

    def fail(self, *errors: BaseException) -> None:
        self._failures.extend(errors)

    async def fetch(
        self, action: str, request: Message, deadline: float | None, spare: bool, sent: Callable[[], None]
    ) -> Message:
        task_id: str = request.task_id  # type: ignore[attr-defined]
        self.calls.append(Call(action, task_id, deadline, spare, CURRENT_SHARE.get()))
        if spare and self.no_spare:
            raise NoSpareQuota(action)
        if self.slot is not None:
            await self.slot.wait()
        if self._failures:
            raise self._failures.pop(0)
        sent()  # the slot: on its way to TIW, which reads the state
        self._answered += 1
        request_id = f"request-{self._answered}"
        state = self.states.get(task_id)
        if self.answer is not None:
            await self.answer.wait()
        if state is None:
            raise TiwError(NOT_FOUND, "The task does not exist.", request_id)
        return RESPONSES[action](task_id=task_id, status=state, request_id=request_id)

    def asked(self, *, spare: bool = False) -> int:
        """Fetches of callers' flights (or, ``spare``, refreshes') so far."""
        return sum(1 for call in self.calls if call.spare == spare)


@dataclasses.dataclass
class VirtualAnswers:
    answers: Answers
    tiw: Tiw
    wall: VirtualClock
    monotonic: VirtualClock
    metrics: Metrics

    async def describe(
        self,
        task_id: str,
        *,
        max_age: float | None = None,
        deadline: float | None = None,
        action: str = DESCRIBE,
    ) -> Served:
        request = RESPONSES_REQUESTS[action](sdk_app_id=SDK_APP_ID, task_id=task_id)
        return await self.answers.describe(action, request, max_age=max_age, deadline=deadline)

    def counted(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


RESPONSES_REQUESTS: dict[str, Callable[..., Message]] = {
    DESCRIBE: pb.DescribeSnapshotTaskRequest,
    PUSH: pb.DescribeWhiteboardPushRequest,
}

MakeFacade = Callable[..., VirtualAnswers]


def build(**overrides: Any) -> VirtualAnswers:
    """An ``Answers`` with ``Config(**overrides)`` (seconds) and no Redis, on virtual clocks."""
    wall, monotonic = VirtualClock(1_700_000_000.0), VirtualClock(100.0)
    tiw, metrics = Tiw(), Metrics("test")
    answers = Answers(Config(**overrides), tiw.fetch, metrics=metrics, clock=wall, monotonic=monotonic)
    return VirtualAnswers(answers, tiw, wall, monotonic, metrics)
