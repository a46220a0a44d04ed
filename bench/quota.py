"""Quota: under 5x overload, at most 20 arrivals per action in any 1-second window at a strict TIW.

The emulator runs at its strict default (20 requests per action in any 1 s, counted on arrival).
Callers offer 100 calls/s on each of the five actions (an open loop: calls start on schedule
whatever the answers do), each with a 3 s deadline, spread over the replicas in turn; each Describe
call asks about a task of its own (``bench/mirror.py``), so only TIW can answer it. Two set-ups:
one replica (in-process limiter), and three replicas sharing one redis-server.

Measured at the emulator (``/_emulator/stats``): the most accepted arrivals in any 1 s window and
the throttles (``RequestLimitExceeded``), over the whole run from the first call to the last
answer; accepted arrivals between two snapshots taken ``quota_warmup`` s after the load starts and
``quota_seconds`` later, for utilization. A throttled arrival is never accepted, so with zero
throttles every arrival was accepted and the accepted maximum is the arrival maximum. The
emulator's counts, whole run, are checked against the callers' outcomes: each call TIW answered one
request to it (none from the cache, none shared), a refused one none (``mirror.answered_arrived``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

from bench import mirror
from bench.calls import ACTIONS, KINDS, PARAMS
from bench.common import Budget, Goal, Section, fmt, grpc_call, table
from bench.procs import (
    HOST,
    BenchError,
    EmulatorAdmin,
    Proc,
    Processes,
    TaskAdmin,
    Worker,
    facade_environment,
    free_port,
    get_text,
)
from bench.stats import histogram_buckets, histogram_quantile, parse_prometheus, percentile, subtract

LIMIT = 20
OFFERED = 100  # calls per second per action: 5x the limit
DEADLINE = 3.0
TAIL = 0.5  # load continues this long past the second snapshot, so the window ends saturated
UTILIZATION_GOAL = 0.97
REFUSED = frozenset({"RESOURCE_EXHAUSTED"})  # by the facade, at once: no request to TIW
# Answers that come from TIW: the call was admitted. StopWhiteboardPush stops the same task every
# time, so all but the first are TIW's UnsupportedOperation.TaskHasAlreadyStopped (FAILED_PRECONDITION).
ANSWERED = frozenset({"OK", "FAILED_PRECONDITION"})
WAIT_METRIC = "tiw_limiter_wait_seconds"
TIMEOUTS = "tiw_upstream_requests_total"


HEADER = (
    "action",
    "max/1 s",
    "throttled",
    "utilization",
    "admission p50 / p99",
    "limiter wait p50 / p99",
    "answered / refused / late",
    "arrivals at TIW",
    "tokens spent on time-outs",
)


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    replicas: int
    shared: bool  # the limiter shares its tokens through a redis-server


SETUPS = (Setup("1 replica, in-process limiter", 1, False), Setup("3 replicas sharing Redis", 3, True))


def run(procs: Processes, budget: Budget) -> Section:
    parts = []
    goals: list[Goal] = []
    for setup in SETUPS:
        part, part_goals = _run_setup(procs, budget, setup)
        parts.append(part)
        goals += part_goals
    body = f"""\
The emulator at its strict default ({LIMIT} per action in any 1 s, counted on arrival); the facades at
their default `TIW_RATE_LIMIT={LIMIT}`. Callers offer {OFFERED} calls/s on each of the five actions
({OFFERED // LIMIT}x the limit) for {budget.quota_warmup + budget.quota_seconds + TAIL:g} s, an open loop
from one load-generator process, each call with a {DEADLINE:g} s deadline, spread over the replicas in turn.

- **max/1 s**: the most arrivals the emulator accepted in any 1 s window, whole run (first call to
  last answer); **throttled**: arrivals it answered `RequestLimitExceeded`, whole run. A throttled
  arrival is not accepted, so with 0 throttled the maximum covers every arrival.
- **utilization**: accepted arrivals between two snapshots of the emulator's counters
  ({budget.quota_warmup:g} s after the load starts and {budget.quota_seconds:g} s later) ÷ ({LIMIT} x the
  time between them).
- **admission p50 / p99**: from the call's start to its answer, measured by the caller, for calls
  that started in that window and were answered by TIW (OK; and for `StopWhiteboardPush`, which
  stops the same push task each time, TIW's `TaskHasAlreadyStopped`: an arrival like any other).
  **limiter wait**: the same percentiles from the facades' `{WAIT_METRIC}` histogram (summed
  over replicas, interpolated inside its buckets, so coarse), over the same window.
- Each Describe call asks about a task of its own, over from the start (created beforehand through
  the emulator's control API, `POST /_emulator/tasks`), so neither the facades' answer cache nor a
  shared request can answer it: TIW answers it OK. `CreateSnapshotTask` creates tasks.
- **TIW's arrivals**: the emulator's count of requests (accepted, throttled or rejected), whole run,
  checked against the callers' outcomes: each call answered by TIW (OK, `TaskHasAlreadyStopped`) was
  one request, a refused one none, a late one one or none.
- **tokens spent on time-outs**: upstream attempts that ended in a time-out, in the window (the
  facades' `tiw_upstream_requests_total{{code="UPSTREAM_TIMEOUT"}}`): each took a token that came back only a
  window later, mostly without reaching TIW (a caller admitted with almost none of its deadline
  left), so each is about one slot of the quota lost.
- **refused**: calls answered `RESOURCE_EXHAUSTED` by the facade (no slot within the deadline: at
  once, no upstream call); **late**: `DEADLINE_EXCEEDED` (a caller queued and still missed its deadline).

{chr(10).join(parts)}"""
    return Section("Quota: the 20-per-second invariant under 5x overload", body, goals)


def _run_setup(procs: Processes, budget: Budget, setup: Setup) -> tuple[str, list[Goal]]:
    with procs.scope():
        return _measure(procs, budget, setup)


def _measure(procs: Processes, budget: Budget, setup: Setup) -> tuple[str, list[Goal]]:
    emulator, url = procs.emulator(rate_limit=LIMIT)
    admin = TaskAdmin(url)
    roles: dict[str, list[Proc]] = defaultdict(list)  # for the CPU each role used
    roles["emulator"].append(emulator)
    extra: dict[str, str] = {}
    if setup.shared:
        redis, redis_url = procs.redis()
        roles["redis-server"].append(redis)
        extra = {"TIW_REDIS_URL": redis_url, "TIW_EXPECTED_REPLICAS": str(setup.replicas)}
    targets, metrics_urls = [], []
    for _ in range(setup.replicas):
        grpc_port, http_port = free_port(), free_port()
        roles["facades"].append(procs.facade(facade_environment(url, grpc_port, http_port, **extra)))
        targets.append(f"{HOST}:{grpc_port}")
        metrics_urls.append(f"http://{HOST}:{http_port}/metrics")
    worker = procs.worker(f"load-quota-{setup.replicas}", "grpc")
    roles["load generator"].append(worker)
    admin.reset()

    seconds = budget.quota_warmup + budget.quota_seconds + TAIL
    calls = int(seconds * OFFERED)  # of each action
    specs = open_calls({action: mirror.per_call(admin, action, calls) for action in KINDS})
    start = admin.stats()
    begin = time.monotonic() + lead(len(KINDS) * calls)
    command = {
        "op": "open",
        "begin": begin,
        "targets": targets,
        "calls": specs,
        "rate": OFFERED,
        "seconds": seconds,
        "timeout": DEADLINE,
    }
    records, first, second, final = drive(
        "quota",
        worker,
        command=command,
        seconds=seconds,
        begin=begin,
        budget=budget,
        admin=admin,
        metrics_urls=metrics_urls,
        roles=roles,
    )
    return _report(setup, budget, records=records, start=start, first=first, second=second, final=final)


def open_calls(each: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The worker's ``open`` calls, one per action: with ``each``, a TIW request per call (the
    Describe actions: a task of their own each); else the action's one request, every call."""
    calls = []
    for action in ACTIONS:
        call = grpc_call(action, PARAMS[action])
        if action in each:
            call["each"] = each[action]
        calls.append(call)
    return calls


def lead(messages: int) -> float:
    """How long before its first call to hand a load generator its command: it connects to every
    replica and prepares ``messages`` requests (ParseDict, well under 0.1 ms each) first."""
    return 0.5 + messages * 1e-4


def drive(
    section: str,
    worker: Worker,
    *,
    command: dict[str, Any],
    seconds: float,
    begin: float,
    budget: Budget,
    admin: EmulatorAdmin,
    metrics_urls: list[str],
    roles: dict[str, list[Proc]],
) -> tuple[Any, Snapshot, Snapshot, Snapshot]:
    """Run the load generator's ``command`` and snapshot the counters at the measuring window's two
    ends and once every token is back: (the generator's records, first, second, final)."""
    reply: dict[str, Any] = {}

    def request() -> None:
        reply.update(worker.request(command, timeout=seconds + DEADLINE + 60))

    driver = threading.Thread(target=request, name=f"{section}-driver")
    driver.start()
    sleep_until(begin + budget.quota_warmup)
    first = snapshot(admin, metrics_urls, roles)
    sleep_until(begin + budget.quota_warmup + budget.quota_seconds)
    second = snapshot(admin, metrics_urls, roles)
    driver.join()
    if not reply:
        raise BenchError(f"the {section} load generator did not answer; see {worker.log}")
    sleep_until(time.monotonic() + 1.1)  # every token back: nothing else will arrive
    final = snapshot(admin, metrics_urls, roles)
    return reply["records"], first, second, final


def sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class Snapshot:
    """The emulator's counters, the facades' /metrics pages and each role's CPU seconds at one moment."""

    def __init__(
        self, at: float, stats: dict[str, dict[str, int]], metrics: list[str], cpu: dict[str, float]
    ) -> None:
        self.at = at
        self.stats = stats
        self.metrics = metrics
        self.cpu = cpu

    def metric_sum(self, name: str, **where: str) -> float:
        """The sum over replicas of the samples of ``name`` whose labels match ``where``."""
        return sum(
            value
            for text in self.metrics
            for labels, value in parse_prometheus(text, name)
            if all(labels.get(k) == v for k, v in where.items())
        )

    def wait_buckets(self, action: str) -> dict[float, float]:
        total: dict[float, float] = {}
        for text in self.metrics:
            for bound, count in histogram_buckets(text, WAIT_METRIC, action=action).items():
                total[bound] = total.get(bound, 0.0) + count
        return total


def snapshot(admin: EmulatorAdmin, metrics_urls: list[str], roles: dict[str, list[Proc]]) -> Snapshot:
    before = time.monotonic()
    stats = admin.stats()
    after = time.monotonic()
    cpu = {role: sum(proc.cpu_seconds() for proc in procs) for role, procs in roles.items()}
    return Snapshot((before + after) / 2, stats, [get_text(u) for u in metrics_urls], cpu)


def _report(
    setup: Setup,
    budget: Budget,
    *,
    records: list[list[Any]],
    start: dict[str, dict[str, int]],
    first: Snapshot,
    second: Snapshot,
    final: Snapshot,
) -> tuple[str, list[Goal]]:
    window = second.at - first.at
    by_action: dict[int, list[list[Any]]] = defaultdict(list)
    for record in records:
        by_action[record[0]].append(record)
    rows = []
    goals: list[Goal] = []
    worst_max, total_throttled, worst_util = 0, 0, math.inf
    arrived = mirror.arrived_between(start, final.stats)
    codes: dict[str, Counter[str]] = {}
    for index, action in enumerate(ACTIONS):
        accepted = second.stats[action]["accepted"] - first.stats[action]["accepted"]
        utilization = accepted / (LIMIT * window)
        max_in_window = final.stats[action]["max_in_window"]
        throttled = final.stats[action]["throttled"]
        calls = by_action[index]
        outcomes = codes[action] = Counter(code for _, _, _, code in calls)
        in_window = [r for r in calls if first.at <= r[1] < second.at and r[3] in ANSWERED]
        latencies = [r[2] for r in in_window]
        waits = subtract(second.wait_buckets(action), first.wait_buckets(action))
        timeouts = second.metric_sum(TIMEOUTS, action=action, code="UPSTREAM_TIMEOUT") - first.metric_sum(
            TIMEOUTS, action=action, code="UPSTREAM_TIMEOUT"
        )
        other = {
            k: v
            for k, v in outcomes.items()
            if k not in ANSWERED | {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
        }
        rows.append(
            [
                f"`{action}`",
                f"**{max_in_window}**",
                f"**{throttled}**",
                f"**{utilization:.1%}**",
                f"{fmt(percentile(latencies, 50) / 1000)} / {fmt(percentile(latencies, 99) / 1000)} s",
                f"{fmt(histogram_quantile(waits, 0.5))} / {fmt(histogram_quantile(waits, 0.99))} s",
                f"{sum(outcomes[c] for c in ANSWERED)} / {outcomes['RESOURCE_EXHAUSTED']} / "
                f"{outcomes['DEADLINE_EXCEEDED']}" + (f" / other {dict(other)}" if other else ""),
                str(arrived[action]),
                f"{timeouts:.0f} ({timeouts / (LIMIT * window):.1%} of the quota)",
            ]
        )
        worst_max = max(worst_max, max_in_window)
        total_throttled += throttled
        worst_util = min(worst_util, utilization)
    goals = [
        Goal(
            f"Quota ({setup.name}): ≤ {LIMIT} arrivals per action in any 1 s",
            worst_max <= LIMIT and total_throttled == 0,
            f"max {worst_max} accepted, {total_throttled} throttled"
            + (" (so some windows saw more than the limit)" if total_throttled else ""),
        ),
        Goal(
            f"Quota ({setup.name}): zero Tencent-side throttles",
            total_throttled == 0,
            f"{total_throttled} throttled",
        ),
        Goal(
            f"Quota ({setup.name}): utilization ≥ {UTILIZATION_GOAL:.0%}",
            worst_util >= UTILIZATION_GOAL,
            f"lowest {worst_util:.1%}",
        ),
        arrivals_goal(f"Quota ({setup.name})", codes, arrived),
    ]
    cores = ", ".join(
        f"{role} {(second.cpu[role] - first.cpu[role]) / window:.2f}" for role in sorted(second.cpu)
    )
    redis_errors = final.metric_sum("tiw_limiter_backend_errors_total")
    pauses = final.metric_sum("tiw_limiter_pauses_total")
    part = f"""
### {setup.name}

Window {window:.2f} s; {len(records)} calls offered in all. CPU used in the window, in cores:
{cores} (of {os.cpu_count()}). From the facades' /metrics, whole run: Redis errors
(`tiw_limiter_backend_errors_total`) {redis_errors:.0f}, admissions paused after a TIW throttle
(`tiw_limiter_pauses_total`) {pauses:.0f}.

{table(HEADER, rows)}
"""
    return part, goals


def arrivals_goal(name: str, codes: Mapping[str, Mapping[str, int]], arrived: Mapping[str, int]) -> Goal:
    """The claim of the quota section (and the fairness one): each call TIW answered was one request
    to it, a call the facade refused none, whole run, every action."""
    problems = mirror.answered_arrived(codes, arrived, answered=ANSWERED, refused=REFUSED)
    answered = sum(n for outcomes in codes.values() for code, n in outcomes.items() if code in ANSWERED)
    return mirror.goal(
        f"{name}: each call TIW answered one request to it (no cache, no shared request)",
        problems,
        f"{answered} calls answered by TIW, {sum(arrived.values())} arrivals",
    )
