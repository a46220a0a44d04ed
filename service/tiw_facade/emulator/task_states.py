"""How an emulated task's state moves with time, and what a Describe action answers about it.

States are computed from the request's instant and the times fixed when a task was created, so
nothing runs in the background and a fake clock moves every task at once. The same times make each
task's record of changes (``changes()``): when it entered each state, known from its creation on
(only a StopWhiteboardPush call adds a change later), which a benchmark compares with when its
callers first saw each state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Fields = dict[str, Any]
# (when, the state entered then), oldest first.
Changes = list[tuple[float, str]]


def _timeline(*steps: tuple[float, str]) -> Changes:
    """The states a caller can see, in order: a state left as soon as it is entered never shows."""
    return [
        step
        for step, following in zip(steps, (*steps[1:], None), strict=True)
        if following is None or following[0] > step[0]
    ]


@dataclass
class SnapshotTask:
    task_id: str
    created: float
    finishes: float
    snapshots: list[str]
    callback_url: str = ""  # CreateSnapshotTask's CallbackURL: where its callback goes, if given

    def describe(self, now: float) -> Fields:
        if now < self.finishes:
            # TIW documents these as "may be null": a running task has no finish time or result yet.
            return {
                "TaskID": self.task_id,
                "Status": "Running",
                "CreateTime": int(self.created),
                "FinishTime": None,
                "Result": None,
            }
        return {
            "TaskID": self.task_id,
            "Status": "Finished",
            "CreateTime": int(self.created),
            "FinishTime": int(self.finishes),
            "Result": {
                "ErrorCode": "OK",
                "ErrorMessage": "",
                "Total": len(self.snapshots),
                "Snapshots": list(self.snapshots),
            },
        }

    def changes(self) -> Changes:
        return _timeline((self.created, "Running"), (self.finishes, "Finished"))


@dataclass
class PushTask:
    task_id: str
    room_id: int
    starts: float
    group_id: str = ""
    push_user_id: str = ""
    stopped: float | None = None  # when a StopWhiteboardPush call stopped it
    finish_reason: str = ""
    created: float | None = None  # None: as long ago as `starts` (a seeded task)
    ends: float | None = None  # when it stops by itself (TIW's idle room), if it does

    def __post_init__(self) -> None:
        self.group_id = self.group_id or str(self.room_id)
        self.push_user_id = self.push_user_id or f"tic_push_user_{self.room_id}_{self.task_id[:5]}"

    def stop_time(self, now: float) -> float | None:
        """When it stopped, by a call or by itself, if it has by ``now``."""
        return min((t for t in (self.stopped, self.ends) if t is not None and t <= now), default=None)

    def describe(self, now: float) -> Fields:
        stop = self.stop_time(now)
        # A task stopped while still PREPARED never started pushing.
        started = now >= self.starts and (stop is None or stop >= self.starts)
        status = "STOPPED" if stop is not None else "PUSHING" if started else "PREPARED"
        reason = self.finish_reason if stop is None or stop == self.stopped else "AUTO"
        return {
            "FinishReason": reason,
            "TaskId": self.task_id,
            "Status": status,
            "RoomId": self.room_id,
            "GroupId": self.group_id,
            "PushUserId": self.push_user_id,
            "PushStartTime": int(self.starts) if started else 0,
            "PushStopTime": int(stop) if stop is not None else 0,
            "ExceptionCnt": 0,
            "IMSyncTime": int(self.starts) if started else 0,
            "Backup": "",
        }

    def changes(self) -> Changes:
        created = self.starts if self.created is None else self.created
        stop = self.stop_time(float("inf"))
        if stop is not None and stop < self.starts:
            return _timeline((created, "PREPARED"), (stop, "STOPPED"))
        steps = [(created, "PREPARED"), (self.starts, "PUSHING")]
        return _timeline(*steps, *([(stop, "STOPPED")] if stop is not None else []))


@dataclass
class VideoTask:
    task_id: str
    room_id: int
    processing_from: float
    finishes: float
    videos: list[Fields]
    group_id: str = ""
    created: float | None = None  # None: as long ago as `processing_from`

    def describe(self, now: float) -> Fields:
        if now >= self.finishes:
            status, progress = "FINISHED", 100
        elif now >= self.processing_from:
            span = self.finishes - self.processing_from
            status, progress = "PROCESSING", min(99, int(100 * (now - self.processing_from) / span))
        else:
            status, progress = "QUEUED", 0
        done = status == "FINISHED"
        return {
            "GroupId": self.group_id or str(self.room_id),
            "RoomId": self.room_id,
            "TaskId": self.task_id,
            "Progress": progress,
            "Status": status,
            "TotalTime": max((v["VideoPlayTime"] + v["VideoDuration"] for v in self.videos), default=0)
            if done
            else 0,
            "VideoInfos": video_info(),
            "VideoInfoList": [dict(v) for v in self.videos] if done else [],
        }

    def changes(self) -> Changes:
        created = self.processing_from if self.created is None else self.created
        # Progress moves within PROCESSING too, but only Status changes count as changes of state.
        return _timeline(
            (created, "QUEUED"), (self.processing_from, "PROCESSING"), (self.finishes, "FINISHED")
        )


def video_info(**values: Any) -> Fields:
    """A VideoInfo with every field present; the zero value is what TIW puts in the disused one."""
    info: Fields = {
        "VideoPlayTime": 0,
        "VideoSize": 0,
        "VideoFormat": "",
        "VideoDuration": 0,
        "VideoUrl": "",
        "VideoId": "",
        "VideoType": 0,
        "UserId": "",
        "Width": 0,
        "Height": 0,
    }
    info.update(values)
    return info


Task = SnapshotTask | PushTask | VideoTask


@dataclass(frozen=True)
class TaskRecord:
    kind: str  # snapshot | push | video
    sdk_app_id: int
    task_id: str
    changes: Changes
