"""The emulated tasks, kept: what each of the five actions does to them, the tasks added by tests and
the admin endpoint, and the documentation's examples seeded. How each task's state moves with time
is ``task_states``'s.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from tiw_facade.emulator import protocol
from tiw_facade.emulator.config import EmulatorConfig
from tiw_facade.emulator.protocol import EmulatedTiwError
from tiw_facade.emulator.task_states import (
    Fields,
    PushTask,
    SnapshotTask,
    Task,
    TaskRecord,
    VideoTask,
    video_info,
)

# The SdkAppId of the documentation's push and video examples.
SEED_SDK_APP_ID: Final = 1400000001
_TASK_ID_ALPHABET: Final = "0123456789abcdefghijklmnopqrstuv"
_PUBLIC_BUCKET: Final = "http://tiw-snapshot-1259648581.cos.ap-guangzhou.myqcloud.com"


def _new_task_id() -> str:
    """An ID shaped like TIW's push and video task IDs (20 characters of base32hex)."""
    return "".join(random.choices(_TASK_ID_ALPHABET, k=20))


def _ignore_change(kind: str, sdk_app_id: int, task_id: str) -> None:
    pass


def _not_found(task_id: str) -> EmulatedTiwError:
    return EmulatedTiwError("InvalidParameter.TaskNotFound", f"The task `{task_id}` does not exist.")


@dataclass
class TaskStore:
    """Every task, keyed by (SdkAppId, task ID): another app's task is not found, as in TIW."""

    config: EmulatorConfig
    snapshots: dict[tuple[int, str], SnapshotTask] = field(default_factory=dict)
    pushes: dict[tuple[int, str], PushTask] = field(default_factory=dict)
    videos: dict[tuple[int, str], VideoTask] = field(default_factory=dict)
    # Told (kind, SdkAppId, task ID) when a task is added or stopped, i.e. when its changes of state
    # are new: the callback sender (callbacks.py) wakes to send those due.
    on_change: Callable[[str, int, str], None] = field(default=_ignore_change, repr=False, compare=False)

    @property
    def handlers(self) -> Mapping[str, Callable[[Fields, float], Fields]]:
        return {
            protocol.CREATE_SNAPSHOT_TASK: self.create_snapshot,
            protocol.DESCRIBE_SNAPSHOT_TASK: self.describe_snapshot,
            protocol.DESCRIBE_WHITEBOARD_PUSH: self.describe_push,
            protocol.STOP_WHITEBOARD_PUSH: self.stop_push,
            protocol.DESCRIBE_VIDEO_GENERATION_TASK: self.describe_video,
        }

    # --- the five actions (parameters already checked against protocol.REQUESTS) ---

    def create_snapshot(self, params: Fields, now: float) -> Fields:
        task_id = self.add_snapshot(
            sdk_app_id=params["SdkAppId"],
            cos=params.get("COS"),
            callback_url=params.get("CallbackURL", ""),
            now=now,
        )
        return {"TaskID": task_id}

    def describe_snapshot(self, params: Fields, now: float) -> Fields:
        task = self.snapshots.get((params["SdkAppId"], params["TaskID"]))
        if task is None:
            raise _not_found(params["TaskID"])
        return task.describe(now)

    def describe_push(self, params: Fields, now: float) -> Fields:
        return self._push(params).describe(now)

    def stop_push(self, params: Fields, now: float) -> Fields:
        task = self._push(params)
        if task.stop_time(now) is not None:
            raise EmulatedTiwError(
                "UnsupportedOperation.TaskHasAlreadyStopped",
                f"The task `{task.task_id}` has already stopped.",
            )
        task.stopped, task.finish_reason = now, "USER_CALL"
        self.on_change("push", params["SdkAppId"], task.task_id)
        # TIW answers with the JSON text of the backup push task's own stop call.
        return {"Backup": json.dumps({"RequestId": str(uuid.uuid4())}, separators=(",", ":"))}

    def describe_video(self, params: Fields, now: float) -> Fields:
        task = self.videos.get((params["SdkAppId"], params["TaskId"]))
        if task is None:
            raise _not_found(params["TaskId"])
        return task.describe(now)

    def _push(self, params: Fields) -> PushTask:
        task = self.pushes.get((params["SdkAppId"], params["TaskId"]))
        if task is None:
            raise _not_found(params["TaskId"])
        return task

    # --- tasks the five actions cannot create: added by tests (``Emulator.add_*_task`` are these),
    # the admin endpoint and the seed; created ``now``, the config's clock unless given ---

    def add_snapshot(
        self,
        task_id: str | None = None,
        *,
        sdk_app_id: int = SEED_SDK_APP_ID,
        cos: Fields | None = None,
        run_seconds: float | None = None,
        callback_url: str = "",
        now: float | None = None,
    ) -> str:
        """A snapshot task, Running for ``run_seconds`` (default ``snapshot_seconds``), then Finished;
        its callback goes to ``callback_url`` if given (else to ``config.callback_url``'s)."""
        now = self.config.clock() if now is None else now
        task_id = task_id or str(uuid.uuid4())
        if cos is None:
            base = f"{_PUBLIC_BUCKET}/{sdk_app_id}/"
        else:
            host = cos.get("Domain") or f"{cos['Bucket']}.cos.{cos['Region']}.myqcloud.com"
            base = f"https://{host}/{cos.get('TargetDir', '')}"
        images = [f"{base}{task_id}/{index}.png" for index in range(1, self.config.snapshot_images + 1)]
        run = self.config.snapshot_seconds if run_seconds is None else run_seconds
        self.snapshots[sdk_app_id, task_id] = SnapshotTask(
            task_id, created=now, finishes=now + run, snapshots=images, callback_url=callback_url
        )
        self.on_change("snapshot", sdk_app_id, task_id)
        return task_id

    def add_push(
        self,
        task_id: str | None = None,
        *,
        sdk_app_id: int = SEED_SDK_APP_ID,
        room_id: int = 880528,
        prepare_seconds: float | None = None,
        push_seconds: float | None = None,
        now: float | None = None,
    ) -> str:
        """A whiteboard push task, PREPARED for ``prepare_seconds`` (default ``push_prepare_seconds``),
        then PUSHING until stopped: by a call, or by itself after ``push_seconds`` if given."""
        now = self.config.clock() if now is None else now
        task_id = task_id or _new_task_id()
        starts = now + (self.config.push_prepare_seconds if prepare_seconds is None else prepare_seconds)
        ends = None if push_seconds is None else starts + push_seconds
        self.pushes[sdk_app_id, task_id] = PushTask(task_id, room_id, starts=starts, created=now, ends=ends)
        self.on_change("push", sdk_app_id, task_id)
        return task_id

    def add_video(
        self,
        task_id: str | None = None,
        *,
        sdk_app_id: int = SEED_SDK_APP_ID,
        room_id: int = 900822,
        videos: list[Fields] | None = None,
        queue_seconds: float | None = None,
        process_seconds: float | None = None,
        now: float | None = None,
    ) -> str:
        """A video generation task, QUEUED for ``queue_seconds``, then PROCESSING for
        ``process_seconds`` (defaults ``video_queue_seconds``, ``video_process_seconds``), then FINISHED."""
        now = self.config.clock() if now is None else now
        task_id = task_id or _new_task_id()
        if videos is None:
            videos = [
                video_info(
                    VideoDuration=156750,
                    VideoFormat="mp4",
                    VideoSize=318384,
                    VideoType=2,
                    VideoId=str(random.randrange(10**18, 10**19)),
                    Width=1280,
                    Height=720,
                    VideoUrl=f"http://1257240443.vod2.myqcloud.com/emulator/{task_id}.mp4",
                )
            ]
        config = self.config
        processing_from = now + (config.video_queue_seconds if queue_seconds is None else queue_seconds)
        process = config.video_process_seconds if process_seconds is None else process_seconds
        self.videos[sdk_app_id, task_id] = VideoTask(
            task_id,
            room_id,
            processing_from,
            processing_from + process,
            [video_info(**video) for video in videos],
            created=now,
        )
        self.on_change("video", sdk_app_id, task_id)
        return task_id

    def task(self, kind: str, sdk_app_id: int, task_id: str) -> Task | None:
        """The task of ``kind`` (snapshot, push, video), if it exists."""
        tasks: Mapping[tuple[int, str], Task]
        if kind == "snapshot":
            tasks = self.snapshots
        elif kind == "push":
            tasks = self.pushes
        else:
            tasks = self.videos
        return tasks.get((sdk_app_id, task_id))

    def records(self) -> list[TaskRecord]:
        """Every task's changes of state (those still to come included: their times are fixed)."""
        kinds: tuple[tuple[str, Mapping[tuple[int, str], SnapshotTask | PushTask | VideoTask]], ...] = (
            ("snapshot", self.snapshots),
            ("push", self.pushes),
            ("video", self.videos),
        )
        return [
            TaskRecord(kind, sdk_app_id, task_id, task.changes())
            for kind, tasks in kinds
            for (sdk_app_id, task_id), task in tasks.items()
        ]

    def reset(self, now: float) -> None:
        """Forget every task and seed the documentation's examples again."""
        self.snapshots.clear()
        self.pushes.clear()
        self.videos.clear()
        self._seed(now)

    def _seed(self, now: float) -> None:
        # DescribeSnapshotTask's example: a task finished long ago, answered as documented.
        example = "f2e1728c-6e87-4481-abe1-cde8542a5a10"
        self.snapshots[1400127230, example] = SnapshotTask(
            example,
            created=1626249427,
            finishes=1626250455,
            snapshots=[
                f"{_PUBLIC_BUCKET}/880520/{example}/{n}.png"
                for n in ("53255368873480", "53255373174978", "53255375472670")
            ],
        )
        # The push examples' inputs start fresh, so a client sees PREPARED -> PUSHING -> STOPPED;
        # the STOPPED output example is kept as documented.
        for task_id in ("ghucnligqtgtvk2624mb", "07b4c70bpafm1b4majmb"):
            self.add_push(task_id, now=now)
        self.pushes[SEED_SDK_APP_ID, "g42lfmu5uc3lpoqrqvvb"] = PushTask(
            "g42lfmu5uc3lpoqrqvvb",
            880528,
            starts=1610591726,
            push_user_id="tic_push_user_880528_test1",
            stopped=1610591759,
            finish_reason="USER_CALL",
        )
        # The video example asks for `ghucnligqtgtvk2624mb` and answers `00e1jv8ve0jcqk7da9lb`: seed both.
        example_video = video_info(
            VideoDuration=156750,
            VideoFormat="mp4",
            VideoId="5285890792776509100",
            VideoSize=318384,
            VideoType=2,
            Width=1024,
            Height=768,
            VideoUrl="http://1257240443.vod2.myqcloud.com/cc35b442vodcq1257240443/video.mp4",
        )
        for task_id in ("00e1jv8ve0jcqk7da9lb", "ghucnligqtgtvk2624mb"):
            self.add_video(task_id, videos=[example_video], now=now)
