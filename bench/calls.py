"""What the benchmarks send: one TIW request per action, in TIW's own JSON.

The same dictionaries feed both clients: the official SDK (``from_json_string``) and the facade's
gRPC stubs (``json_format.ParseDict``: every proto field's json_name is the TIW parameter name).
The task IDs are the documentation's examples, which the emulator seeds (see ``emulator/tasks.py``);
the benchmark's emulator runs with zero task durations, so each Describe answer is the complete,
final one (a finished snapshot with its images, a stopped push, a finished video). A final answer is
the facade's to keep (its answer cache serves it to every later call): the sections that measure
the way to TIW ask each call about a task of its own instead (``bench/mirror.py``, with ``KINDS``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

CREATE_SNAPSHOT_TASK: Final = "CreateSnapshotTask"
DESCRIBE_SNAPSHOT_TASK: Final = "DescribeSnapshotTask"
DESCRIBE_WHITEBOARD_PUSH: Final = "DescribeWhiteboardPush"
STOP_WHITEBOARD_PUSH: Final = "StopWhiteboardPush"
DESCRIBE_VIDEO_GENERATION_TASK: Final = "DescribeVideoGenerationTask"

ACTIONS: Final = (
    CREATE_SNAPSHOT_TASK,
    DESCRIBE_SNAPSHOT_TASK,
    DESCRIBE_WHITEBOARD_PUSH,
    STOP_WHITEBOARD_PUSH,
    DESCRIBE_VIDEO_GENERATION_TASK,
)
# The actions that can be repeated on the same request with the same (successful) answer.
REPEATABLE: Final = tuple(action for action in ACTIONS if action != STOP_WHITEBOARD_PUSH)

PUSH_SDK_APP_ID: Final = 1400000001

PARAMS: Final[dict[str, dict[str, Any]]] = {
    CREATE_SNAPSHOT_TASK: {
        "Whiteboard": {"Width": 1280, "Height": 720, "InitParams": '{"ratio":"16:9"}'},
        "SdkAppId": 1400123480,
        "RoomId": 12345,
        "CallbackURL": "http://example.com/callback",
        "COS": {
            "Uin": 130001358,
            "Region": "ap-guangzhou",
            "Bucket": "test-123070000",
            "TargetDir": "snapshot/",
            "Domain": "xxx.file.com",
        },
    },
    DESCRIBE_SNAPSHOT_TASK: {"SdkAppId": 1400127230, "TaskID": "f2e1728c-6e87-4481-abe1-cde8542a5a10"},
    DESCRIBE_WHITEBOARD_PUSH: {"SdkAppId": PUSH_SDK_APP_ID, "TaskId": "g42lfmu5uc3lpoqrqvvb"},
    # Overhead: every call stops a fresh push task (bench/mirror.py). Quota: the same seeded task
    # each time, so all but the first get TaskHasAlreadyStopped.
    STOP_WHITEBOARD_PUSH: {"SdkAppId": PUSH_SDK_APP_ID, "TaskId": "ghucnligqtgtvk2624mb"},
    DESCRIBE_VIDEO_GENERATION_TASK: {"SdkAppId": PUSH_SDK_APP_ID, "TaskId": "00e1jv8ve0jcqk7da9lb"},
}

# Local path: rejected by the facade's validation before any upstream call (no TaskId).
INVALID_DESCRIBE_PUSH: Final[dict[str, Any]] = {"SdkAppId": PUSH_SDK_APP_ID}


def stop_params(task_id: str) -> dict[str, Any]:
    return {"SdkAppId": PUSH_SDK_APP_ID, "TaskId": task_id}


# The Describe actions as the benchmarks drive them: which emulator task each asks about.
@dataclasses.dataclass(frozen=True)
class Kind:
    """One Describe action as this bench drives it: its emulator task kind and states, in order."""

    name: str  # the emulator's task kind
    action: str
    id_field: str
    states: tuple[str, ...]
    # The emulator's durations, one per state but the last (seconds in each state).
    durations: tuple[str, ...]

    def params(self, task_id: str) -> dict[str, Any]:
        return {"SdkAppId": PARAMS[self.action]["SdkAppId"], self.id_field: task_id}

    def rank(self, state: str) -> int:
        """How far along ``state`` is (-1: not one of ours)."""
        return self.states.index(state) if state in self.states else -1


SNAPSHOT = Kind("snapshot", DESCRIBE_SNAPSHOT_TASK, "TaskID", ("Running", "Finished"), ("RunSeconds",))
PUSH = Kind(
    "push",
    DESCRIBE_WHITEBOARD_PUSH,
    "TaskId",
    ("PREPARED", "PUSHING", "STOPPED"),
    ("PrepareSeconds", "PushSeconds"),
)
VIDEO = Kind(
    "video",
    DESCRIBE_VIDEO_GENERATION_TASK,
    "TaskId",
    ("QUEUED", "PROCESSING", "FINISHED"),
    ("QueueSeconds", "ProcessSeconds"),
)

KINDS: Final = {kind.action: kind for kind in (SNAPSHOT, PUSH, VIDEO)}
