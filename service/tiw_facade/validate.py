"""Request validation, as data: checked before any upstream call, so bad input costs no quota.

``RULES`` maps a message type and a TIW field name to the checks that field must pass. Nested
messages (Whiteboard, COS) are checked by their own rows. Violations name each field by its TIW
path (``Whiteboard.Width``), as callers see it in TIW's docs and in the proto's json_names.
"""

from __future__ import annotations

import functools
import json
import re
import urllib.parse
from collections.abc import Callable
from typing import Any, NamedTuple

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb

# A check gets a field's value (only when the field is present) and returns a problem, or None.
Check = Callable[[Any], str | None]

MAX_TASK_ID_LENGTH = 128
MAX_DIMENSION = 2560  # TIW's documented bound for SnapshotWhiteboard Width and Height
SNAPSHOT_MODES = ("AllMarks", "LatestMarksOnly")
# How deep InitParams may nest arrays and objects: a whiteboard's parameters are a flat object or
# close to it, and an unbounded depth is a RecursionError (a bug's status) rather than a violation.
MAX_JSON_DEPTH = 32


class Violation(NamedTuple):
    field: str  # the TIW path, e.g. "COS.Uin"
    description: str


REQUIRED = "required"  # a marker, not a check: the field must be present (non-zero for plain scalars)


def positive(value: int) -> str | None:
    return None if value > 0 else "must be greater than 0"


def at_most(bound: int) -> Check:
    def check(value: int) -> str | None:
        return None if 0 <= value <= bound else f"must be between 0 and {bound}"

    return check


def not_blank(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")


def task_id(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if len(value) > MAX_TASK_ID_LENGTH:
        return f"must be at most {MAX_TASK_ID_LENGTH} characters"
    if _SPACE_OR_CONTROL.search(value):
        return "must not contain spaces or control characters"
    return None


def json_text(value: str) -> str | None:
    try:
        parsed = json.loads(value, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        return f"must be JSON text ({exc.msg} at position {exc.pos})"
    except RecursionError:  # deeper than the parser's stack: 1 KB of "[" is enough
        return f"must be JSON nested at most {MAX_JSON_DEPTH} deep"
    except _NotJson as exc:
        return f"must be JSON text ({exc})"
    except ValueError:  # int() refuses more than 4300 digits (sys.get_int_max_str_digits)
        return "must be JSON text (a number of too many digits)"
    if _deeper_than(parsed, MAX_JSON_DEPTH):
        return f"must be JSON nested at most {MAX_JSON_DEPTH} deep"
    return None


class _NotJson(ValueError):
    pass


def _not_json(constant: str) -> Any:
    """Python's json reads NaN, Infinity and -Infinity; JSON has no such values."""
    raise _NotJson(f"{constant} is not JSON")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests arrays and objects more than ``limit`` deep; without recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def http_url(value: str) -> str | None:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http or https URL"
    return None


def one_of(*allowed: str) -> Check:
    def check(value: str) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"

    return check


RULES: dict[str, dict[str, tuple[Check | str, ...]]] = {
    pb.CreateSnapshotTaskRequest.DESCRIPTOR.full_name: {
        "Whiteboard": (REQUIRED,),
        "SdkAppId": (REQUIRED, positive),
        "RoomId": (REQUIRED, positive),
        "CallbackURL": (http_url,),
        "SnapshotMode": (one_of(*SNAPSHOT_MODES),),
    },
    pb.SnapshotWhiteboard.DESCRIPTOR.full_name: {
        "Width": (at_most(MAX_DIMENSION),),
        "Height": (at_most(MAX_DIMENSION),),
        "InitParams": (json_text,),
    },
    pb.SnapshotCOS.DESCRIPTOR.full_name: {
        "Uin": (REQUIRED, positive),
        "Region": (REQUIRED, not_blank),
        "Bucket": (REQUIRED, not_blank),
    },
    pb.DescribeSnapshotTaskRequest.DESCRIPTOR.full_name: {
        "TaskID": (REQUIRED, task_id),
        "SdkAppId": (REQUIRED, positive),
    },
    **{
        message.DESCRIPTOR.full_name: {"SdkAppId": (REQUIRED, positive), "TaskId": (REQUIRED, task_id)}
        for message in (
            pb.DescribeWhiteboardPushRequest,
            pb.StopWhiteboardPushRequest,
            pb.DescribeVideoGenerationTaskRequest,
        )
    },
}


class _FieldPlan(NamedTuple):
    name: str  # the proto field name, for getattr/HasField
    json_name: str
    presence: str  # "has" (HasField), "len" (repeated), "truthy" (proto3 scalar without presence)
    required: bool
    nested: bool  # a singular message: its own rows apply
    checks: tuple[Check, ...]


@functools.cache
def _plan(descriptor: Descriptor) -> tuple[_FieldPlan, ...]:
    """What to check on a message type, worked out once: validation runs on every call."""
    rules = RULES.get(descriptor.full_name, {})
    plan = []
    for field in descriptor.fields:
        row = rules.get(field.json_name, ())
        nested = field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated
        if not row and not nested:
            continue
        presence = "has" if field.has_presence else "len" if field.is_repeated else "truthy"
        checks = tuple(check for check in row if callable(check))
        plan.append(_FieldPlan(field.name, field.json_name, presence, REQUIRED in row, nested, checks))
    return tuple(plan)


def violations(message: Message, path: str = "") -> list[Violation]:
    """Every rule ``message`` breaks, nested messages included; empty when it is valid."""
    found: list[Violation] = []
    for field in _plan(message.DESCRIPTOR):
        if field.presence == "has":
            present = message.HasField(field.name)
        else:
            # proto3 scalars without presence: the zero value is indistinguishable from "not given".
            present = bool(
                len(getattr(message, field.name)) if field.presence == "len" else getattr(message, field.name)
            )
        if not present:
            if field.required:
                found.append(Violation(_where(path, field.json_name), "is required"))
            continue
        value = getattr(message, field.name)
        if field.nested:
            found.extend(violations(value, _where(path, field.json_name)))
        for check in field.checks:
            if (problem := check(value)) is not None:
                found.append(Violation(_where(path, field.json_name), problem))
                break  # one clear problem per field
    return found


def _where(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
