"""TIW's wire protocol as the emulator checks it: actions, parameter tables, JSON types, envelopes.

Written from Tencent's API documentation of the five actions (summarised in ``docs/tiw-api.md``),
not from the facade's proto: the emulator must catch a facade that gets TIW wrong.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

# From TIW's documentation, deliberately not imported from the facade's signing.py: the emulator is an oracle.
VERSION: Final = "2019-09-19"

CREATE_SNAPSHOT_TASK: Final = "CreateSnapshotTask"
DESCRIBE_SNAPSHOT_TASK: Final = "DescribeSnapshotTask"
DESCRIBE_WHITEBOARD_PUSH: Final = "DescribeWhiteboardPush"
STOP_WHITEBOARD_PUSH: Final = "StopWhiteboardPush"
DESCRIBE_VIDEO_GENERATION_TASK: Final = "DescribeVideoGenerationTask"

# The SDK only parses an error envelope when the content type is exactly this (no charset).
CONTENT_TYPE: Final = "application/json"


class EmulatedTiwError(Exception):
    """An error the emulated API answers (TIW's, or STS's in the same envelope): ``Code`` and
    ``Message`` of the error envelope. Not the facade's ``failures.TiwError``, which is such an
    answer as the facade receives it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Kind(enum.Enum):
    STRING = "string"
    U64 = "u64"
    I64 = "i64"
    OBJECT = "object"

    @property
    def label(self) -> str:
        """The type's name in TIW's documentation and messages."""
        return _LABELS[self]


_LABELS: Final = {Kind.STRING: "String", Kind.U64: "Integer", Kind.I64: "Integer", Kind.OBJECT: "Object"}

_RANGES: Final = {Kind.U64: (0, 2**64 - 1), Kind.I64: (-(2**63), 2**63 - 1)}


@dataclass(frozen=True)
class Param:
    kind: Kind
    required: bool = False
    fields: Mapping[str, Param] | None = None


def _string(required: bool = False) -> Param:
    return Param(Kind.STRING, required)


def _u64(required: bool = False) -> Param:
    return Param(Kind.U64, required)


def _i64(required: bool = False) -> Param:
    return Param(Kind.I64, required)


SNAPSHOT_WHITEBOARD: Final[Mapping[str, Param]] = {
    "Width": _u64(),
    "Height": _u64(),
    "InitParams": _string(),
}
SNAPSHOT_COS: Final[Mapping[str, Param]] = {
    "Uin": _u64(required=True),
    "Region": _string(required=True),
    "Bucket": _string(required=True),
    "TargetDir": _string(),
    "Domain": _string(),
}
# The three push/video actions take the same two parameters (note `TaskId`, not `TaskID`).
_TASK_ID_QUERY: Final[Mapping[str, Param]] = {
    "SdkAppId": _i64(required=True),
    "TaskId": _string(required=True),
}

# Request parameters per action: the one table every check is driven by.
REQUESTS: Final[Mapping[str, Mapping[str, Param]]] = {
    CREATE_SNAPSHOT_TASK: {
        "Whiteboard": Param(Kind.OBJECT, required=True, fields=SNAPSHOT_WHITEBOARD),
        "SdkAppId": _u64(required=True),
        "RoomId": _u64(required=True),
        "CallbackURL": _string(),
        "COS": Param(Kind.OBJECT, fields=SNAPSHOT_COS),
        "SnapshotMode": _string(),
    },
    DESCRIBE_SNAPSHOT_TASK: {"TaskID": _string(required=True), "SdkAppId": _u64(required=True)},
    DESCRIBE_WHITEBOARD_PUSH: _TASK_ID_QUERY,
    STOP_WHITEBOARD_PUSH: _TASK_ID_QUERY,
    DESCRIBE_VIDEO_GENERATION_TASK: _TASK_ID_QUERY,
}


def _type_matches(param: Param, value: object) -> bool:
    if param.kind is Kind.STRING:
        return isinstance(value, str)
    if param.kind is Kind.OBJECT:
        return isinstance(value, dict)
    # `type(...) is int`: JSON true/false arrive as bool (an int subclass), 1.0 as float.
    low, high = _RANGES[param.kind]
    return type(value) is int and low <= value <= high


def check(schema: Mapping[str, Param], params: object, prefix: str = "") -> None:
    """Raise the ``EmulatedTiwError`` TIW answers for ``params``, if any.

    Unknown names first, then missing required ones, then types, as a gateway that knows the
    action's parameter list would. Nested objects are checked the same way, named ``Outer.Inner``.
    """
    if not isinstance(params, dict):
        raise EmulatedTiwError("InvalidParameter", "The request body must be a JSON object.")
    for name in params:
        if name not in schema:
            raise EmulatedTiwError("UnknownParameter", f"The parameter `{prefix}{name}` is not recognized.")
    for name, param in schema.items():
        if name not in params:
            if param.required:
                raise EmulatedTiwError(
                    "MissingParameter", f"The request is missing a required parameter `{prefix}{name}`."
                )
            continue
        value = params[name]
        if not _type_matches(param, value):
            raise EmulatedTiwError(
                "InvalidParameter.BodyParameterTypeUnmatched",
                f"The type of parameter `{prefix}{name}` should be {param.kind.label}.",
            )
        if param.fields is not None:
            check(param.fields, value, f"{prefix}{name}.")


def parse_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise EmulatedTiwError("InvalidParameter", "The request body is not valid JSON.") from None


# One encoder for every answer: json.dumps with options builds a new one per call.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dump(document: object) -> bytes:
    return _ENCODER.encode(document).encode("utf-8")


def success(fields: dict[str, Any], request_id: str) -> bytes:
    fields["RequestId"] = request_id
    return _dump({"Response": fields})


def failure(code: str, message: str, request_id: str) -> bytes:
    return _dump({"Response": {"Error": {"Code": code, "Message": message}, "RequestId": request_id}})
