"""The mirror path: calls only TIW can answer, and the check that each of them reached it.

The facade answers a Describe of a task that is over from its cache, whatever ``tiw-max-age-ms``
says (docs/answers.md: final answers are final), and identical Describe calls in flight share one
request. A benchmark that repeats one request therefore measures the cache, not the way to TIW.
The sections that measure that way (overhead, quota, fairness) instead ask each Describe call about
a task of its own, created beforehand through the emulator's control API (``POST
/_emulator/tasks``), over from the start: its answer is the final one, like the documentation's
examples, TIW is asked once for it, and the facade never refreshes a final answer, so no request
reaches TIW but the callers'. ``StopWhiteboardPush`` stops a fresh push task of its own (the
success path); ``CreateSnapshotTask`` is a write, never shared, so its one request serves.

Each section then reads the emulator's counters (``/_emulator/stats``) and checks them against
what it claims, with the functions at the end: ``one_arrival_each`` (overhead, throughput: every
call one request to TIW) and ``answered_arrived`` (quota, fairness: every call TIW answered one
request to it, a refused call none).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from bench.calls import KINDS, PARAMS, PUSH, PUSH_SDK_APP_ID, STOP_WHITEBOARD_PUSH, stop_params
from bench.common import Goal
from bench.procs import TaskAdmin

JSON = dict[str, Any]
Stats = Mapping[str, Mapping[str, int]]

# Every request that reached the emulator counts in one of these (``/_emulator/stats``).
ARRIVAL_COUNTERS = ("accepted", "throttled", "rejected", "faulted")


def task_bodies(action: str, count: int) -> list[JSON]:
    """What to ask the emulator for (``POST /_emulator/tasks``): a task for each of ``count`` calls
    of ``action``; none for an action whose one request serves every call."""
    if action in KINDS:
        kind = KINDS[action]
        over = dict.fromkeys(kind.durations, 0)  # every state's time zero: over from the start
        return [{"Kind": kind.name, "SdkAppId": PARAMS[action]["SdkAppId"], **over} for _ in range(count)]
    if action == STOP_WHITEBOARD_PUSH:  # pushing until the call stops it
        return [{"Kind": PUSH.name, "SdkAppId": PUSH_SDK_APP_ID} for _ in range(count)]
    return []


def requests_for(action: str, task_ids: Sequence[str], count: int) -> list[JSON]:
    """The TIW requests of ``count`` calls of ``action``, given the tasks ``task_bodies`` asked for."""
    if action in KINDS:
        requests = [KINDS[action].params(task_id) for task_id in task_ids]
    elif action == STOP_WHITEBOARD_PUSH:
        requests = [stop_params(task_id) for task_id in task_ids]
    else:
        requests = [PARAMS[action]] * count
    if len(requests) != count:
        raise ValueError(f"{count} calls of {action} need {count} tasks, not {len(task_ids)}")
    return requests


def per_call(admin: TaskAdmin, action: str, count: int) -> list[JSON]:
    """``count`` requests of ``action`` that only TIW can answer, each about a task of its own."""
    return requests_for(action, admin.add_tasks(task_bodies(action, count)), count)


def arrivals(stats: Stats) -> Counter[str]:
    """Requests that reached the emulator, per action, from its counters."""
    return Counter(
        {action: sum(counts[name] for name in ARRIVAL_COUNTERS) for action, counts in stats.items()}
    )


def arrived_between(before: Stats, after: Stats) -> Counter[str]:
    """Requests that reached the emulator between two readings of its counters, per action."""
    first, second = arrivals(before), arrivals(after)
    return Counter({action: second[action] - first[action] for action in second})


def one_arrival_each(calls: Mapping[str, int], arrived: Mapping[str, int]) -> list[str]:
    """Overhead's claim (and throughput's): each call made was one request to TIW, no more (nothing
    else sent), no fewer (no answer from the cache, no shared request). What contradicts it, per
    action; empty when the claim holds."""
    problems = []
    for action in sorted({*calls, *(a for a, n in arrived.items() if n)}):
        made, seen = calls.get(action, 0), arrived.get(action, 0)
        if made != seen:
            problems.append(f"`{action}`: {made} calls, {seen} arrivals at TIW")
    return problems


def answered_arrived(
    codes: Mapping[str, Mapping[str, int]],
    arrived: Mapping[str, int],
    *,
    answered: Collection[str],
    refused: Collection[str],
) -> list[str]:
    """Quota's claim (and fairness's): each call TIW answered was a request of its own to TIW (no
    answer from the cache, no shared request), and a call refused by the facade was none; so per
    action, calls answered by TIW ≤ arrivals ≤ calls not refused (a late call may or may not have
    arrived). ``codes``: per action, the outcomes of its calls. What contradicts it, per action."""
    problems = []
    for action in sorted({*codes, *(a for a, n in arrived.items() if n)}):
        outcomes = codes.get(action, {})
        by_tiw = sum(outcomes.get(code, 0) for code in answered)
        ceiling = sum(outcomes.values()) - sum(outcomes.get(code, 0) for code in refused)
        seen = arrived.get(action, 0)
        if not by_tiw <= seen <= ceiling:
            problems.append(
                f"`{action}`: {seen} arrivals at TIW for {by_tiw} calls answered by TIW and "
                f"{ceiling} not refused"
            )
    return problems


def goal(name: str, problems: Sequence[str], numbers: str) -> Goal:
    """The goal of a section's claim about TIW's arrivals: met when nothing contradicts it."""
    return Goal(name, not problems, "; ".join(problems) if problems else numbers)
