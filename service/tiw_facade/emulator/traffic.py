"""What happens to traffic before and after an action runs: the rate window, counters, faults."""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


def max_in_any_window(timestamps: Iterable[float], window: float = 1.0) -> int:
    """The most timestamps in any half-open window ``(t - window, t]``: the limiter's own measure."""
    ordered = sorted(timestamps)
    most = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window:
            start += 1
        most = max(most, end - start + 1)
    return most


@dataclass(frozen=True)
class ActionStats:
    """Counters of one action since the last reset."""

    accepted: int  # admitted by the rate limit (then executed, or answered a parameter error)
    throttled: int  # answered RequestLimitExceeded; not executed, not counted in the window
    rejected: int  # answered an error before the rate limit (signature, version, region)
    faulted: int  # answered by an injected http_status, malformed or error_code fault
    tasks_created: int
    max_in_window: int  # most accepted arrivals in any one rate window


class ActionTraffic:
    """The sliding window limiter of one action plus its counters, updated in O(1) per request."""

    __slots__ = (
        "_recent",
        "accepted",
        "arrivals",
        "faulted",
        "limit",
        "max_in_window",
        "rejected",
        "tasks_created",
        "throttled",
        "window",
    )

    def __init__(self, limit: int, window: float, history: int) -> None:
        self.limit = limit
        self.window = window
        self._recent: deque[float] = deque()
        self.arrivals: deque[float] = deque(maxlen=history)
        self.accepted = self.throttled = self.rejected = self.faulted = self.tasks_created = 0
        self.max_in_window = 0

    def admit(self, now: float) -> bool:
        """Accept ``now`` unless ``limit`` arrivals were accepted in ``(now - window, now]``."""
        recent = self._recent
        horizon = now - self.window
        while recent and recent[0] <= horizon:
            recent.popleft()
        if len(recent) >= self.limit:
            self.throttled += 1
            return False
        recent.append(now)
        self.arrivals.append(now)
        self.accepted += 1
        self.max_in_window = max(self.max_in_window, len(recent))
        return True

    def snapshot(self) -> ActionStats:
        return ActionStats(
            self.accepted, self.throttled, self.rejected, self.faulted, self.tasks_created, self.max_in_window
        )


class FaultKind(enum.StrEnum):
    LATENCY = "latency"  # execute, then answer `delay` seconds late
    DROP = "drop"  # execute, then close the connection without answering
    HTTP_STATUS = "http_status"  # answer `status` with a non-JSON body; not executed
    MALFORMED = "malformed"  # answer 200 with a body that is not a TIW envelope; not executed
    ERROR_CODE = "error_code"  # answer the TIW error `code`; not executed


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "action": str,
    "count": int,
    "delay": (int, float),
    "status": int,
    "code": str,
    "message": str,
}

# Faults answered instead of executing the action.
PRE_EXECUTION = frozenset({FaultKind.HTTP_STATUS, FaultKind.MALFORMED, FaultKind.ERROR_CODE})


@dataclass
class Fault:
    """A fault for requests of ``action`` (``None``: every action), for the next ``count`` of them
    (``None``: until cleared)."""

    kind: FaultKind
    action: str | None = None
    count: int | None = None
    delay: float = 1.0
    status: int = 502
    code: str = "InternalError"
    message: str = "Internal error (injected by the emulator)."

    def __post_init__(self) -> None:
        self.kind = FaultKind(self.kind)
        if self.count is not None and self.count < 1:
            raise ValueError("count must be >= 1 (or absent: until cleared)")
        if self.delay < 0:
            raise ValueError("delay must not be negative")
        if not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")
        if not self.code:
            raise ValueError("code must not be empty")

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Fault:
        """A fault from the admin endpoint's JSON, field names as in this class."""
        return fault_from_json(cls, document, _JSON_TYPES, may_be_null={"action", "count"})


class Counted(Protocol):
    count: int | None


F = TypeVar("F", bound=Counted)


def fault_from_json(
    cls: Callable[..., F],
    document: Mapping[str, Any],
    types: Mapping[str, type | tuple[type, ...]],
    *,
    may_be_null: set[str],
    what: str = "fault",
) -> F:
    """A fault of ``cls`` from an admin endpoint's JSON: only the fields ``types`` names, each of its
    type (never a boolean for a number; null only for ``may_be_null``), then ``cls``'s own checks.
    Every refusal is a ValueError saying why."""
    unknown = set(document) - set(types)
    if unknown:
        raise ValueError(f"unknown {what} fields: {sorted(unknown)}")
    for name, value in document.items():
        if value is None and name in may_be_null:
            continue
        if isinstance(value, bool) or not isinstance(value, types[name]):
            raise ValueError(f"{what} field {name!r} has the wrong type")
    try:
        return cls(**document)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


class FaultList(Generic[F]):
    """The active faults of one kind: the newest that applies (``applies(fault, target)``) is taken,
    counting it against its ``count``; ``scope(fault)`` is the target it was added for (None: all)."""

    def __init__(self, scope: Callable[[F], str | None], applies: Callable[[F, str], bool]) -> None:
        self._faults: list[F] = []
        self._scope = scope
        self._applies = applies

    def __bool__(self) -> bool:
        return bool(self._faults)

    def add(self, fault: F) -> None:
        # A copy: `take` counts down `count`, which must not change the caller's object.
        self._faults.append(dataclasses.replace(fault))  # type: ignore[type-var]

    def clear(self, target: str | None = None) -> None:
        """Clear every fault, or only those added for ``target``."""
        self._faults = [] if target is None else [f for f in self._faults if self._scope(f) != target]

    def take(self, target: str) -> F | None:
        """The fault for ``target``'s next request (or callback), if any."""
        for index in range(len(self._faults) - 1, -1, -1):
            fault = self._faults[index]
            if self._applies(fault, target):
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count == 0:
                        del self._faults[index]
                return fault
        return None

    def active(self) -> list[F]:
        return [dataclasses.replace(f) for f in self._faults]  # type: ignore[type-var]


class Faults(FaultList[Fault]):
    """The active faults of requests; the newest for the request's action (or every action) applies."""

    def __init__(self) -> None:
        super().__init__(lambda fault: fault.action, lambda fault, action: fault.action in (None, action))
