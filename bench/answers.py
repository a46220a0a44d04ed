"""Answers: 25x the quota served from coalesced, cached and watched answers, and nobody refused.

The emulator at its strict default (20 requests per action in any 1 s, counted on arrival) holds
tasks whose states change at random times chosen here and fixed when each task is created; it
records them (``GET /_emulator/tasks``), so the time from each change to the first caller who saw
it is measured against TIW's own record, on the wall clock every process on the machine shares.

- **Polling**: 1,000 callers per action, each polling one of 40 live tasks every 2 s (500 calls/s
  per action, 25x its quota) with a 5 s deadline and the default freshness bound (no
  ``tiw-max-age-ms``), from two load-generator processes, callers spread over the replicas in
  turn. ``DescribeSnapshotTask`` alone (tasks go Running → Finished), then the three Describe
  actions at once (also PREPARED → PUSHING → STOPPED, QUEUED → PROCESSING → FINISHED), each on
  one replica and on three replicas sharing one redis-server.
- **Watch**: 10,000 ``WatchSnapshotTask`` streams over 40 tasks on one replica, opened over a few
  seconds from two processes; the tasks finish at random times afterwards.
- **Cache hit**: ``DescribeSnapshotTask`` of a Finished task (cached) vs the bare grpc.aio echo
  server of ``bench/local.py``, rounds interleaved, with ``bench/local.py``'s harness.

Run as ``python -m bench.answers``, this module is the load generator of the first two (one JSON
command in on stdin, one JSON answer out, as ``bench/worker.py``): a caller here reads each
answer's initial metadata (``tiw-source``, ``tiw-age-ms``) and status, which the worker does not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tiw_facade.budget import WATCH_COST

from bench import local
from bench.calls import DESCRIBE_SNAPSHOT_TASK, PARAMS, PUSH, SNAPSHOT, VIDEO, Kind
from bench.common import Budget, Goal, Section, fmt, fmt_ratio, grpc_call, rotated, table
from bench.heap import Heap, grown_by_file, largest_differences
from bench.procs import (
    HOST,
    PYTHON,
    BenchError,
    Proc,
    Processes,
    TaskAdmin,
    Worker,
    facade_environment,
    free_port,
)
from bench.quota import Snapshot, snapshot
from bench.roles import ANSWER_METADATA, BARE_WATCH_SECONDS, ECHO_WITH_METADATA_METHOD
from bench.stats import median, paired, percentile

JSON = dict[str, Any]

LIMIT = 20
# The polling workload; "the same spread over the three Describe actions" is these same
# 1,000 callers and 40 tasks, split between the actions (14 + 13 + 13 tasks).
TASKS = 40
CALLERS = 1000
PERIOD = 2.0  # each caller's poll interval: 1,000 / 2 s = 500 calls/s = 25x the quota
DEADLINE = 5.0
WARMUP = 2.0  # every caller has made its first call (their phases spread over one period)
GENERATORS = 2  # load-generator processes
WATCHES = 10_000
WATCH_RAMP = 4.0  # seconds over which the streams open
WATCH_CHANNELS = 8  # per generator process: HTTP/2 connections, so no one carries every stream
SEEN_MARGIN = 4.0  # the last change is this long before the load ends, so it can be seen
SAMPLE_EVERY = 0.25  # the facade's RSS, while the streams are open

# The default caps (from TIW_MEMORY_BUDGET: 2,184 streams a replica, 546 a caller) are below
# WATCHES, and the generators name no caller (all one share): lifted, to measure what WATCHES cost.
WATCH_ENV = {"TIW_MAX_WATCHES": str(WATCHES), "TIW_MAX_WATCHES_PER_CALLER": str(WATCHES)}

STALE_P50, STALE_P95 = 1.5, 3.0
PER_UPSTREAM_GOAL = 20.0
# The two bars for 10,000 streams: against the bare grpc.aio server holding as many in the
# same run, and absolute. And what the budget assumes a stream costs (the caps derive from it).
RSS_GOAL_RATIO = 1.1
RSS_GOAL_MB = 200.0
RSS_BUDGET_MB = WATCHES * WATCH_COST / (1 << 20)
# The heap pass: fewer streams, since tracemalloc makes every allocation slower.
HEAP_STREAMS = 2_000
HEAP_RAMP = 2.0
HEAP_FILES = 8  # the files whose share differs most, in the table
HIT_GOAL = 0.75

SOURCES = ("upstream", "coalesced", "cache")
MAX_STALENESS = 2.0  # the facade's default TIW_MAX_STALENESS
WATCHER = "tiw.facade.v1.TaskWatcher"


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    replicas: int  # more than one: they share one redis-server
    kinds: tuple[Kind, ...]


PLANS = (
    Plan("snapshot, 1 replica", 1, (SNAPSHOT,)),
    Plan("snapshot, 3 replicas sharing Redis", 3, (SNAPSHOT,)),
    Plan("three actions, 1 replica", 1, (SNAPSHOT, PUSH, VIDEO)),
    Plan("three actions, 3 replicas sharing Redis", 3, (SNAPSHOT, PUSH, VIDEO)),
)


@dataclasses.dataclass
class Task:
    kind: Kind
    task_id: str
    changes: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # from the emulator


def create_tasks(
    admin: TaskAdmin, kinds: Sequence[Kind], first: float, last: float, rng: random.Random
) -> list[Task]:
    """``TASKS`` tasks split between the kinds, whose changes all fall at random wall times in
    [first, last]."""
    tasks: list[Task] = []
    for index, kind in enumerate(kinds):
        bodies = []
        for _ in range(TASKS // len(kinds) + (index < TASKS % len(kinds))):
            now = time.time()
            times = sorted(rng.uniform(first, last) for _ in kind.durations)
            spans = [b - a for a, b in zip([now, *times], times, strict=False)]
            durations = dict(zip(kind.durations, spans, strict=True))
            bodies.append({"Kind": kind.name, "SdkAppId": PARAMS[kind.action]["SdkAppId"], **durations})
        tasks += [Task(kind, task_id) for task_id in admin.add_tasks(bodies)]
    return tasks


def read_changes(admin: TaskAdmin, tasks: Sequence[Task]) -> None:
    record = admin.changes()
    for task in tasks:
        task.changes = record[task.task_id]


# --- the set-up: an emulator, facades, perhaps a redis-server ------------------------------------


@dataclasses.dataclass
class Fleet:
    admin: TaskAdmin
    targets: list[str]
    metrics_urls: list[str]
    facades: list[Proc]
    roles: dict[str, list[Proc]]  # for the CPU each role used

    def mark(self) -> tuple[float, Snapshot]:
        """The wall time, and the emulator's counters, the facades' metrics and the CPU at that time."""
        taken = snapshot(self.admin, self.metrics_urls, self.roles)
        return time.time() - (time.monotonic() - taken.at), taken


def start_fleet(
    procs: Processes, replicas: int, settings: Mapping[str, str] | None = None, *, heap: Path | None = None
) -> Fleet:
    """``replicas`` facades on one emulator (and one redis-server for more than one), each with
    ``settings`` (environment variables) besides the defaults; ``heap``: one facade, tracing its heap
    (bench.heap)."""
    emulator, url = procs.emulator(rate_limit=LIMIT)
    roles: dict[str, list[Proc]] = defaultdict(list)
    roles["emulator"].append(emulator)
    extra: dict[str, str] = dict(settings or {})
    if replicas > 1:
        redis, redis_url = procs.redis()
        roles["redis-server"].append(redis)
        extra |= {"TIW_REDIS_URL": redis_url, "TIW_EXPECTED_REPLICAS": str(replicas)}
    targets, metrics_urls = [], []
    for _ in range(replicas):
        grpc_port, http_port = free_port(), free_port()
        roles["facades"].append(
            procs.facade(facade_environment(url, grpc_port, http_port, **extra), heap=heap)
        )
        targets.append(f"{HOST}:{grpc_port}")
        metrics_urls.append(f"http://{HOST}:{http_port}/metrics")
    admin = TaskAdmin(url)
    admin.reset()  # forgets the facades' start-up traffic (none to TIW, but to be sure)
    return Fleet(admin, targets, metrics_urls, list(roles["facades"]), roles)


def generators(procs: Processes, fleet: Fleet, name: str) -> list[Worker]:
    workers = []
    for index in range(GENERATORS):
        worker = procs.spawn(
            Worker, f"load-{name}-{index}", [PYTHON, "-m", "bench.answers"], None, pipes=True
        )
        assert isinstance(worker, Worker)
        workers.append(worker)
    fleet.roles["load generators"] += workers
    return workers


def in_parallel(workers: Sequence[Worker], commands: Sequence[JSON], timeout: float) -> list[JSON]:
    """Send each worker its command at once; their answers, once every one has answered."""
    answers: list[JSON | None] = [None] * len(workers)

    def ask(index: int) -> None:
        answer = workers[index].request(commands[index], timeout=timeout)
        if "file" in answer:  # the records, too big for one line on a pipe: see main()
            path = Path(answer["file"])
            answer = json.loads(path.read_text())
            path.unlink()
        answers[index] = answer

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    return _joined(threads, answers, workers)


def _joined(
    threads: list[threading.Thread], answers: list[JSON | None], workers: Sequence[Worker]
) -> list[JSON]:
    for thread in threads:
        thread.join()
    missing = [w.name for w, a in zip(workers, answers, strict=True) if a is None]
    if missing:
        raise BenchError(f"load generators {missing} did not answer; see {[str(w.log) for w in workers]}")
    return [a for a in answers if a is not None]


def sleep_until_wall(when: float) -> None:
    delay = when - time.time()
    if delay > 0:
        time.sleep(delay)


def task_specs(tasks: Sequence[Task]) -> list[JSON]:
    return [grpc_call(task.kind.action, task.kind.params(task.task_id)) for task in tasks]


# --- staleness: from each change at TIW to the first caller who saw it ----------------------------


def staleness(
    tasks: Sequence[Task], sightings: dict[int, list[tuple[float, str]]], start: float, end: float
) -> list[float]:
    """For each change in [start, end] of each task in ``sightings`` (task index -> (an answer's
    arrival, its state)), seconds until an answer first showed that state or a later one; inf if none did.
    """
    delays = []
    for index, seen in sightings.items():
        kind = tasks[index].kind
        ordered = sorted(seen)
        for at, state in tasks[index].changes:
            if start <= at <= end:
                rank = kind.rank(state)
                first = next((when for when, s in ordered if when >= at and kind.rank(s) >= rank), math.inf)
                delays.append(first - at)
    return delays


def quantile(values: Sequence[float], q: float) -> float:
    """``percentile``, with a change nobody saw (inf) counted as the slowest, not as NaN."""
    ordered = sorted(values)
    if ordered and math.isinf(ordered[min(len(ordered) - 1, math.ceil((len(ordered) - 1) * q / 100))]):
        return math.inf
    return percentile(ordered, q)


def staleness_goal(name: str, delays: list[float]) -> Goal:
    p50, p95 = quantile(delays, 50), quantile(delays, 95)
    unseen = sum(math.isinf(d) for d in delays)
    return Goal(
        f"Answers ({name}): a change first seen ≤ {STALE_P50:g} s p50, ≤ {STALE_P95:g} s p95",
        bool(delays) and p50 <= STALE_P50 and p95 <= STALE_P95,
        f"p50 {fmt(p50, 3)} s, p95 {fmt(p95, 3)} s, max {fmt(max(delays, default=math.nan), 3)} s over "
        f"{len(delays)} changes" + (f", {unseen} never seen" if unseen else ""),
    )


def quota_goal(name: str, actions: Sequence[str], final: Snapshot) -> Goal:
    most = {a: final.stats[a]["max_in_window"] for a in actions}
    throttled = sum(final.stats[a]["throttled"] for a in actions)
    return Goal(
        f"Answers ({name}): ≤ {LIMIT} upstream requests per action in any 1 s, 0 throttled",
        max(most.values()) <= LIMIT and throttled == 0,
        f"max {max(most.values())} in 1 s, {throttled} throttled",
    )


def cores(first: Snapshot, second: Snapshot) -> str:
    window = second.at - first.at
    used = ", ".join(
        f"{role} {(second.cpu[role] - first.cpu[role]) / window:.2f}" for role in sorted(second.cpu)
    )
    return f"{used} (of {os.cpu_count()})"


# --- polling ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Polled:
    plan: Plan
    tasks: list[Task]
    records: list[list[Any]]  # [task index, started, answered (wall), code, source, age ms, status]
    window: tuple[float, float]  # wall times of the measuring window
    first: Snapshot
    second: Snapshot
    final: Snapshot


def poll(procs: Processes, budget: Budget, plan: Plan, rng: random.Random) -> Polled:
    with procs.scope():
        fleet = start_fleet(procs, plan.replicas)
        workers = generators(procs, fleet, f"poll-{len(plan.kinds)}-{plan.replicas}")
        seconds = budget.answers_seconds
        begin = time.time() + 1.0  # the generators connect to every replica first
        tasks = create_tasks(
            fleet.admin, plan.kinds, begin + WARMUP + 0.5, begin + WARMUP + seconds - SEEN_MARGIN, rng
        )
        specs = task_specs(tasks)
        callers = CALLERS
        share = math.ceil(callers / GENERATORS)
        commands = [
            {
                "op": "poll",
                "begin": begin,
                "seconds": WARMUP + seconds,
                "targets": fleet.targets,
                "tasks": specs,
                "callers": [index * share, min(callers, (index + 1) * share)],
                "period": PERIOD,
                "timeout": DEADLINE,
            }
            for index in range(GENERATORS)
        ]
        answers: list[JSON] = []
        driver = threading.Thread(
            target=lambda: answers.extend(in_parallel(workers, commands, WARMUP + seconds + DEADLINE + 60)),
            daemon=True,
        )
        driver.start()
        sleep_until_wall(begin + WARMUP)
        start, first = fleet.mark()
        sleep_until_wall(begin + WARMUP + seconds)
        end, second = fleet.mark()
        driver.join()
        if len(answers) != GENERATORS:
            raise BenchError(f"the polling load generators failed; logs in {procs.dir}")
        time.sleep(1.1)  # every token back: nothing else arrives
        _, final = fleet.mark()
        read_changes(fleet.admin, tasks)
    records = [record for answer in answers for record in answer["records"]]
    return Polled(plan, tasks, records, (start, end), first, second, final)


POLL_HEADER = (
    "set-up",
    "action",
    "calls (OK / other)",
    "upstream in window (/s)",
    "max/1 s, throttled",
    "calls per upstream",
    "upstream / coalesced / cache",
    "age, not final p50 / p99 / max (> 2 s)",
    "latency p50 / p99",
    "first seen p50 / p95 / max",
)


class Call(NamedTuple):
    """One polling call, as the load generator records it."""

    task: int  # index into the run's tasks
    started: float  # wall time
    answered: float  # wall time the answer (or error) arrived
    code: str  # OK or the gRPC code's name
    source: str  # tiw-source ("" without an answer)
    age_ms: float  # tiw-age-ms (-1 without)
    status: str  # the answer's Status


def spread(values: Sequence[float], *quantiles: float, scale: float = 1.0, unit: str = "s") -> str:
    """``p50 / p99 / max unit``-style figures: each quantile, then the maximum."""
    figures = [quantile(values, q) * scale for q in quantiles] + [max(values, default=math.nan) * scale]
    return " / ".join(fmt(v, 2 if unit == "s" else 1) for v in figures) + f" {unit}"


def others(codes: Counter[str]) -> dict[str, int]:
    return {code: n for code, n in codes.items() if code != "OK"}


@dataclasses.dataclass
class KindFigures:
    row: list[str]
    codes: Counter[str]
    per_upstream: float
    delays: list[float]


def kind_figures(run: Polled, kind: Kind, calls: list[Call]) -> KindFigures:
    start, end = run.window
    codes = Counter(c.code for c in calls)
    answered = [c for c in calls if c.code == "OK"]
    upstream = run.second.stats[kind.action]["accepted"] - run.first.stats[kind.action]["accepted"]
    in_window = sum(start <= c.started < end for c in answered)
    per_upstream = in_window / upstream if upstream else math.inf
    sources = Counter(c.source for c in answered)
    odd = {s: n for s, n in sources.items() if s not in SOURCES}
    # A final answer may be any age; any other, at most TIW_MAX_STALENESS.
    ages = [c.age_ms / 1000 for c in answered if c.status != kind.states[-1]]
    # Every task of the kind, so a task nobody saw counts as never seen.
    sightings: dict[int, list[tuple[float, str]]] = {i: [] for i, t in enumerate(run.tasks) if t.kind is kind}
    for c in answered:
        sightings[c.task].append((c.answered, c.status))
    delays = staleness(run.tasks, sightings, start, end)
    final = run.final.stats[kind.action]
    row = [
        run.plan.name,
        f"`{kind.action}`",
        f"{codes['OK']} / **{sum(others(codes).values())}**" + (f" {others(codes)}" if others(codes) else ""),
        f"{upstream} ({upstream / (end - start):.1f})",
        f"**{final['max_in_window']}**, **{final['throttled']}**",
        f"**{fmt(per_upstream, 1)}**",
        " / ".join(f"{sources[s] / max(1, len(answered)):.1%}" for s in SOURCES)
        + (f" (other {odd})" if odd else ""),
        f"{spread(ages, 50, 99)} ({sum(age > MAX_STALENESS for age in ages)})",
        spread([c.answered - c.started for c in calls], 50, 99, scale=1000, unit="ms"),
        f"**{spread(delays, 50, 95)}** ({len(delays)})",
    ]
    return KindFigures(row, codes, per_upstream, delays)


def poll_report(run: Polled) -> tuple[list[list[str]], list[Goal], str]:
    calls = [Call(*record) for record in run.records]
    figures = [
        kind_figures(run, kind, [c for c in calls if run.tasks[c.task].kind is kind])
        for kind in run.plan.kinds
    ]
    codes = sum((f.codes for f in figures), Counter[str]())
    worst = min(f.per_upstream for f in figures)
    name = run.plan.name
    refused = sum(others(codes).values())
    goals = [
        Goal(
            f"Answers ({name}): 0 calls refused",
            refused == 0 and codes["OK"] > 0,
            f"{codes['OK']} OK, {refused} not" + (f": {others(codes)}" if refused else ""),
        ),
        quota_goal(name, [k.action for k in run.plan.kinds], run.final),
        Goal(
            f"Answers ({name}): ≥ {PER_UPSTREAM_GOAL:g} caller calls per upstream request, every action",
            worst >= PER_UPSTREAM_GOAL,
            f"lowest {fmt(worst, 2)} (OK calls begun in the window ÷ TIW arrivals in it)",
        ),
        staleness_goal(name, [d for f in figures for d in f.delays]),
    ]
    redis = run.final.metric_sum("tiw_limiter_backend_errors_total")
    note = (
        f"- {name}: window {run.window[1] - run.window[0]:.2f} s; CPU in cores: "
        f"{cores(run.first, run.second)}; Redis errors {redis:.0f}."
    )
    return [f.row for f in figures], goals, note


# --- watching ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Watched:
    tasks: list[Task]
    records: list[list[Any]]  # [task index, opened, ended (wall), code, messages, [[when, state], ...]]
    rss_before: float  # MB
    rss_peak: float
    window: tuple[float, float]
    first: Snapshot
    second: Snapshot
    final: Snapshot
    bare_growth: float  # MB: a bare grpc.aio server holding as many streams
    heap: HeapShares


def rss_mb(proc: Proc) -> float:
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def watch(procs: Processes, budget: Budget, rng: random.Random) -> Watched:
    with procs.scope():
        fleet = start_fleet(procs, 1, WATCH_ENV)
        [facade] = fleet.facades
        workers = generators(procs, fleet, "watch")
        seconds = budget.answers_seconds
        baseline = bare_stream_memory(procs, workers, seconds)
        shares = heap_shares(procs, workers, rng)
        begin = time.time() + 1.0
        opened = begin + WATCH_RAMP
        tasks = create_tasks(fleet.admin, (SNAPSHOT,), opened + 1.0, opened + seconds - SEEN_MARGIN, rng)
        specs = [watch_spec(task.task_id) for task in tasks]
        commands = watch_commands(fleet.targets, specs, begin, seconds)
        rss_before = rss_mb(facade)
        answers: list[JSON] = []
        driver = threading.Thread(
            target=lambda: answers.extend(in_parallel(workers, commands, WATCH_RAMP + seconds + 90)),
            daemon=True,
        )
        driver.start()
        peak = rss_before
        marks: list[tuple[float, Snapshot]] = []
        for when in (opened, opened + seconds):
            while time.time() < when:
                peak = max(peak, rss_mb(facade))
                time.sleep(min(SAMPLE_EVERY, max(0.0, when - time.time())))
            marks.append(fleet.mark())
        while driver.is_alive():
            peak = max(peak, rss_mb(facade))
            driver.join(SAMPLE_EVERY)
        if len(answers) != GENERATORS:
            raise BenchError(f"the watch load generators failed; logs in {procs.dir}")
        time.sleep(1.1)
        _, final = fleet.mark()
        read_changes(fleet.admin, tasks)
    (start, first), (end, second) = marks
    records = [record for answer in answers for record in answer["records"]]
    return Watched(tasks, records, rss_before, peak, (start, end), first, second, final, baseline, shares)


def watch_spec(task_id: str) -> JSON:
    name = SNAPSHOT.action.removeprefix("Describe")
    return {
        "method": f"/{WATCHER}/Watch{name}",
        "request": f"Watch{name}Request",
        "response": f"{SNAPSHOT.action}Response",
        "params": {"request": SNAPSHOT.params(task_id)},
    }


def watch_commands(
    targets: list[str],
    specs: list[JSON],
    begin: float,
    seconds: float,
    *,
    streams: int = WATCHES,
    ramp: float = WATCH_RAMP,
) -> list[JSON]:
    """Each generator's share of ``streams`` streams, opened over ``ramp`` seconds from ``begin``."""
    share = math.ceil(streams / GENERATORS)
    return [
        {
            "op": "watch",
            "begin": begin,
            "ramp": ramp,
            "targets": targets,
            "tasks": specs,
            "streams": [index * share, min(streams, (index + 1) * share)],
            "total": streams,
            "channels": WATCH_CHANNELS,
            "timeout": ramp + seconds + 30,
        }
        for index in range(GENERATORS)
    ]


def bare_environment() -> dict[str, str]:
    """The environment of a facade as the watch bench runs it, for the bare server's grpc options."""
    return facade_environment(f"http://{HOST}:1", free_port(), free_port(), **WATCH_ENV)


def all_ended_ok(answers: Sequence[JSON], streams: int, messages: int) -> str | None:
    """None when all ``streams`` streams ended OK after ``messages`` messages each; else what went wrong."""
    records = [Stream(*record) for answer in answers for record in answer["records"]]
    outcomes = Counter((s.code, s.messages) for s in records)
    if len(records) == streams and outcomes == Counter({("OK", messages): streams}):
        return None
    return f"{len(records)} of {streams} streams; (code, messages): {dict(outcomes)}"


def bare_stream_memory(procs: Processes, workers: Sequence[Worker], seconds: float) -> float:
    """The RSS growth (MB) of a bare grpc.aio server (bench.roles' echo, its plain WatchSnapshotTask,
    with the facade's grpc options) holding as many streams from the same generators: what grpc.aio
    itself costs per stream. Every stream must end OK after both messages, or this is no baseline."""
    server, target = procs.echo(as_facade=bare_environment())
    try:
        specs = [watch_spec(f"bare-{index}") for index in range(TASKS)]
        bare = watch_commands([target], specs, time.time() + 1.0, seconds)
        before = peak = rss_mb(server)
        answers: list[JSON] = []
        driver = threading.Thread(
            target=lambda: answers.extend(in_parallel(workers, bare, WATCH_RAMP + 60)), daemon=True
        )
        driver.start()
        while driver.is_alive():
            peak = max(peak, rss_mb(server))
            driver.join(SAMPLE_EVERY)
        if len(answers) != len(workers):
            raise BenchError(f"the bare-stream baseline failed; logs in {procs.dir}")
        wrong = all_ended_ok(answers, WATCHES, 2)
        if wrong is not None:
            raise BenchError(f"the bare server did not hold every stream: {wrong}; logs in {procs.dir}")
        return peak - before
    finally:
        procs.stop(server)


@dataclasses.dataclass
class HeapShares:
    """Python's heap held per open stream (bytes), by the file that allocated it: facade and bare."""

    facade: dict[str, float]
    bare: dict[str, float]


def heap_shares(procs: Processes, workers: Sequence[Worker], rng: random.Random) -> HeapShares:
    """HEAP_STREAMS streams held open by the bare server, then by a facade, each tracing its heap:
    the bytes per stream that each file holds while they are all open (bench.heap)."""
    began = time.time()
    bare_path, facade_path = procs.dir / "heap-bare", procs.dir / "heap-facade"
    server, target = procs.echo(as_facade=bare_environment(), heap=bare_path)
    try:
        specs = [watch_spec(f"bare-{index}") for index in range(TASKS)]
        bare = held_heap(Heap(server, bare_path), workers, [target], specs, messages=2)
    finally:
        procs.stop(server)
    with procs.scope():
        fleet = start_fleet(procs, 1, WATCH_ENV, heap=facade_path)
        # Every task stays Running until after the snapshot (the streams are all open then), then
        # finishes, so every stream ends OK with two messages, as on the bare server.
        finish = time.time() + 1.0 + HEAP_RAMP + 3.0
        tasks = create_tasks(fleet.admin, (SNAPSHOT,), finish, finish + 1.0, rng)
        specs = [watch_spec(task.task_id) for task in tasks]
        facade = held_heap(Heap(fleet.facades[0], facade_path), workers, fleet.targets, specs, messages=2)
    print(f"bench:   answers: heap pass {time.time() - began:.0f} s", file=sys.stderr, flush=True)
    return HeapShares(facade, bare)


def held_heap(
    heap: Heap, workers: Sequence[Worker], targets: list[str], specs: list[JSON], *, messages: int
) -> dict[str, float]:
    """Bytes per stream by file: a snapshot before HEAP_STREAMS streams open, one once all are."""
    before = heap.take()
    begin = time.time() + 1.0
    commands = watch_commands(targets, specs, begin, 10.0, streams=HEAP_STREAMS, ramp=HEAP_RAMP)
    answers: list[JSON] = []
    driver = threading.Thread(target=lambda: answers.extend(in_parallel(workers, commands, 90)), daemon=True)
    driver.start()
    time.sleep(max(0.0, begin + HEAP_RAMP + 1.0 - time.time()))
    taken = time.time()
    during = heap.take()
    driver.join(90)
    if len(answers) != len(workers):
        raise BenchError("the heap pass's load generators failed")
    wrong = all_ended_ok(answers, HEAP_STREAMS, messages)
    records = [Stream(*record) for answer in answers for record in answer["records"]]
    if wrong is None and not all(s.opened < taken < s.ended for s in records):
        wrong = "not every stream was open at the snapshot"
    if wrong is not None:
        raise BenchError(f"the heap pass: {wrong}")
    return grown_by_file(before, during, HEAP_STREAMS)


class Stream(NamedTuple):
    """One watch stream, as the load generator records it."""

    task: int
    opened: float  # wall times
    ended: float
    code: str  # how it ended: OK or the gRPC code's name
    messages: int
    seen: list[list[Any]]  # [[wall time, status], ...] at each change of the status it sent


WATCH_HEADER = (
    "first message after opening p50 / p95 / max",
    "first stream to see Finished p50 / p95 / max",
    "every stream p50 / p95 / max",
    "messages per stream p50 / max",
    "facade RSS before / peak",
    "CPU in the window (cores)",
)


def watch_report(run: Watched) -> tuple[str, list[Goal]]:
    start, end = run.window
    streams = [Stream(*record) for record in run.records]
    terminal = SNAPSHOT.states[-1]
    sightings: dict[int, list[tuple[float, str]]] = {i: [] for i in range(len(run.tasks))}
    for stream in streams:
        sightings[stream.task] += [(when, state) for when, state in stream.seen]
    delays = staleness(run.tasks, sightings, start, end)
    # The same for every stream, not only the first of each task: how long until the last one saw it.
    finished = {i: at for i, task in enumerate(run.tasks) for at, state in task.changes if state == terminal}
    per_stream = [
        next((when - finished[s.task] for when, state in s.seen if state == terminal), math.inf)
        for s in streams
        if start <= finished[s.task] <= end
    ]
    codes = Counter(s.code for s in streams)
    ended_ok = sum(s.code == "OK" and bool(s.seen) and s.seen[-1][1] == terminal for s in streams)
    growth = run.rss_peak - run.rss_before
    ratio = growth / run.bare_growth if run.bare_growth > 0 else math.inf
    extra_per_stream = (growth - run.bare_growth) * 1024 / WATCHES  # KiB
    action = SNAPSHOT.action
    upstream = run.second.stats[action]["accepted"] - run.first.stats[action]["accepted"]
    name = "watch, 1 replica"
    goals = [
        staleness_goal(name, delays),
        Goal(
            f"Answers ({name}): facade RSS growth ≤ {RSS_GOAL_RATIO}x a bare grpc.aio server's, "
            f"{WATCHES:,} streams",
            ratio <= RSS_GOAL_RATIO,
            f"{fmt_ratio(ratio, 2)}: {growth:.0f} MB ({run.rss_before:.0f} → peak {run.rss_peak:.0f} MB) vs "
            f"the bare server's {run.bare_growth:.0f} MB",
        ),
        Goal(
            f"Answers ({name}): facade RSS growth ≤ {RSS_GOAL_MB:.0f} MB with {WATCHES:,} streams",
            growth <= RSS_GOAL_MB,
            f"{growth:.0f} MB; the bare grpc.aio server alone: {run.bare_growth:.0f} MB"
            + (
                " (this bar is below what grpc.aio itself needs here)"
                if run.bare_growth > RSS_GOAL_MB
                else ""
            ),
        ),
        Goal(
            f"Answers ({name}): facade RSS growth within the budget's {WATCH_COST // 1024} KiB a stream",
            growth <= RSS_BUDGET_MB,
            f"{growth:.0f} MB of {RSS_BUDGET_MB:.0f} MB",
        ),
        Goal(
            f"Answers ({name}): every stream ends OK after its task's terminal state",
            ended_ok == WATCHES == len(streams),
            f"{ended_ok} of {WATCHES}; outcomes {dict(codes)}",
        ),
        quota_goal(name, [action], run.final),
    ]
    messages = [s.messages for s in streams]
    # How long the facade took to answer a new stream at all: a backlog of openings delays every change.
    first_message = [s.seen[0][0] - s.opened if s.seen else math.inf for s in streams]
    row = [
        spread(first_message, 50, 95),
        f"**{spread(delays, 50, 95)}**",
        spread(per_stream, 50, 95),
        f"{fmt(percentile(messages, 50), 0)} / {max(messages, default=0)}",
        f"{run.rss_before:.0f} / **{run.rss_peak:.0f}** MB",
        cores(run.first, run.second),
    ]
    stats = run.final.stats[action]
    body = f"""\
### Watch: {WATCHES:,} streams over {TASKS} snapshot tasks, one replica

`{WATCHER}/WatchSnapshotTask` streams opened over {WATCH_RAMP:g} s from {GENERATORS} processes
({WATCH_CHANNELS} connections each), stream i on task i mod {TASKS}, each with a deadline well past the
run; each task goes Running → Finished at a random time from 1 s after the window starts (once every
stream should be open) to {SEEN_MARGIN:g} s before its end ({end - start:.1f} s). TIW's arrivals of `{action}`
in the window: {upstream} ({upstream / (end - start):.1f}/s); whole run: max {stats["max_in_window"]} in 1 s,
{stats["throttled"]} throttled. First stream: as for polling, the first message of any stream of the
task that showed Finished; every stream: the same for each stream; first message: from the caller's
start of the stream to its first message (the state at once). RSS: the facade's `VmRSS` before
the first stream opened and its peak, sampled every {SAMPLE_EVERY:g} s until the last stream ended;
the baseline, measured first in the same run by the same generators: a bare grpc.aio server
(`bench.roles` echo: Running, an {BARE_WATCH_SECONDS:g} s wait, Finished; the facade's grpc options
and cap on calls, without which grpc's own cap cancels thousands of the streams; every stream must
end OK) holding as many streams grew by {run.bare_growth:.0f} MB. The facade's extra:
{growth - run.bare_growth:+.0f} MB, {extra_per_stream:+.1f} KiB a stream.

{table(WATCH_HEADER, [row])}

{heap_report(run.heap)}
"""
    return body, goals


def heap_report(shares: HeapShares) -> str:
    """Where a stream's Python memory goes on the facade and on the bare server."""
    facade, bare = sum(shares.facade.values()), sum(shares.bare.values())
    rows = [
        [f"`{name}`", str(round(ours)), str(round(theirs)), f"{round(ours - theirs):+d}"]
        for name, ours, theirs in largest_differences(shares.facade, shares.bare, HEAP_FILES)
    ]
    rows.append(["**all files**", f"**{facade:.0f}**", f"**{bare:.0f}**", f"**{facade - bare:+.0f}**"])
    return f"""\
Where a stream's memory goes: {HEAP_STREAMS:,} streams held open, first by the bare server, then
by a facade, each tracing its own heap (tracemalloc); a snapshot before the first stream opens and one
while all are open ({HEAP_RAMP:g} s ramp, then 1 s), the difference by the file that allocated it, per
stream. This is Python's heap only: grpc's C core (each call's arena, its HTTP/2 stream and buffers)
is outside it, about the same on both servers, and makes up the rest of the RSS. The
{HEAP_FILES} files whose share differs most:

{table(("file", "facade B/stream", "bare B/stream", "facade - bare"), rows)}

What the facade's files hold for each stream: `identity.py` and `interceptor.py`, the caller check's
and the observer's wrappers around the watcher's stream (an async generator and its frame each);
`_weakrefset.py`, the event loop's weak set of live async generators, which holds three per stream
on the facade (those two and the watcher's) and one on the bare server; `answers/_topics.py`, the
stream's `Watch` and its wait among its task's watchers; `asyncio/tasks.py` and `bench/roles.py`
on the bare server, its handler's frame and its `asyncio.sleep`."""


# --- the cache-hit path ----------------------------------------------------------------------------

HIT = "facade → cached `DescribeSnapshotTask` (Finished)"
ECHO_WITH_METADATA = "bare grpc.aio echo, sending initial metadata first"
HIT_PATHS = (local.ECHO, ECHO_WITH_METADATA, HIT)
# The seeded Finished task: a terminal answer, kept for good.
HIT_CALL = grpc_call(DESCRIBE_SNAPSHOT_TASK, PARAMS[DESCRIBE_SNAPSHOT_TASK], fresh=False)


def cache_hit(procs: Processes, budget: Budget) -> tuple[str, list[Goal]]:
    with procs.scope():
        fleet = start_fleet(procs, 1)
        _, echo_target = procs.echo()
        worker = procs.worker("load-answers-hit", "grpc")
        first = worker.request(
            {"op": "seq", "target": fleet.targets[0], "call": HIT_CALL, "params": [HIT_CALL["params"]],
             "warmup": 0, "n": 3, "timeout": DEADLINE},
            timeout=30,
        )  # fmt: skip
        if set(first["codes"]) != {"OK"}:
            raise BenchError(f"the cached DescribeSnapshotTask answered {first['codes']}")
        before = fleet.admin.stats()[DESCRIBE_SNAPSHOT_TASK]["accepted"]
        specs: dict[str, tuple[str, JSON]] = {
            local.ECHO: (echo_target, local.ECHO_CALL),
            ECHO_WITH_METADATA: (echo_target, {**local.ECHO_CALL, "method": ECHO_WITH_METADATA_METHOD}),
            HIT: (fleet.targets[0], HIT_CALL),
        }
        rates: dict[str, list[float]] = defaultdict(list)
        outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        for turn in range(budget.rounds):
            for path in rotated(HIT_PATHS, turn):
                target, call = specs[path]
                result = worker.request(
                    local.conc_command(target, call, budget, budget.local_seconds), timeout=60
                )
                rates[path].append(result["per_second"])
                outcomes[path].update(result["codes"])
        upstream = fleet.admin.stats()[DESCRIBE_SNAPSHOT_TASK]["accepted"] - before
    ratio = paired(rates[HIT], rates[local.ECHO])
    with_metadata = paired(rates[ECHO_WITH_METADATA], rates[local.ECHO])
    rows = [
        [
            path,
            fmt(median(rates[path]), 0),
            f"**{fmt_ratio(paired(rates[path], rates[local.ECHO]))}**",
            f"{outcomes[path]['OK'] / max(1, sum(outcomes[path].values())):.1%} OK",
            ", ".join(fmt(v, 0) for v in rates[path]),
        ]
        for path in HIT_PATHS
    ]
    body = f"""\
### Cache hit: a terminal answer vs the bare grpc.aio echo

`bench/local.py`'s harness: one grpc.aio client process, {budget.concurrency} calls in flight,
{local.DEADLINE:g} s deadlines, {budget.local_seconds:g} s per path per round, {budget.rounds} rounds taking
turns; medians of the rounds, the ratio the median of the rounds' ratios. The task is the seeded
Finished one, asked once before the rounds; TIW saw {upstream} `DescribeSnapshotTask` requests during them.

{table(("path", "requests/s", "÷ echo", "answers", "per round"), rows)}

A shared answer carries its `tiw-source` and `tiw-age-ms` in initial metadata, and grpc.aio sends
initial metadata a handler gives it in a batch of its own, before the answer's (its unary handlers
have no way to add it to the answer's batch); the second row is the bare echo doing only that,
sending `{dict(ANSWER_METADATA)}`: {fmt_ratio(with_metadata, 3)} the plain echo's requests/s. Against
that echo the cache hit is {fmt_ratio(paired(rates[HIT], rates[ECHO_WITH_METADATA]), 3)}: the rest is
the facade's own work (interceptor, caller check, validation, the lookup, the access-log line).
"""
    goal = Goal(
        f"Answers: cache-hit `DescribeSnapshotTask` ≥ {HIT_GOAL}x bare echo",
        ratio >= HIT_GOAL,
        f"{fmt_ratio(ratio, 3)} ({fmt(median(rates[HIT]), 0)} vs {fmt(median(rates[local.ECHO]), 0)} req/s)",
    )
    return body, [goal]


# --- the section -----------------------------------------------------------------------------------


def run(procs: Processes, budget: Budget) -> Section:
    rng = random.Random(9)  # the same schedule of changes every run
    rows, goals, notes = [], [], []
    for plan in PLANS:
        print(f"bench:   answers: polling, {plan.name} ...", file=sys.stderr, flush=True)
        plan_rows, plan_goals, note = poll_report(poll(procs, budget, plan, rng))
        rows += plan_rows
        goals += plan_goals
        notes.append(note)
    print("bench:   answers: watching ...", file=sys.stderr, flush=True)
    watch_body, watch_goals = watch_report(watch(procs, budget, rng))
    print("bench:   answers: cache hit ...", file=sys.stderr, flush=True)
    hit_body, hit_goals = cache_hit(procs, budget)
    goals += watch_goals + hit_goals
    body = f"""\
The emulator at its strict default ({LIMIT} per action in any 1 s, counted on arrival); the facades at
their defaults (`TIW_MAX_STALENESS` 2 s and the rest). Tasks are created through the emulator's
`POST /_emulator/tasks` with random durations, so each change of state falls at a random time inside
the measuring window (not in its last {SEEN_MARGIN:g} s); `GET /_emulator/tasks` gives the time of each.

### Polling: {CALLERS:,} callers, every {PERIOD:g} s, over {TASKS} tasks

Each caller polls one task (caller i: task i mod {TASKS}) every {PERIOD:g} s ({CALLERS / PERIOD:.0f} calls/s,
{CALLERS / PERIOD / LIMIT:g}x one action's quota). In the "snapshot" runs all {TASKS} tasks are snapshot
tasks; in the "three actions" runs the same callers and tasks are split between the three Describe
actions (14 snapshot, 13 push, 13 video tasks: about 8x each action's quota). Each call has its
phase spread over the period, with a {DEADLINE:g} s deadline and no `tiw-max-age-ms`; callers from
{GENERATORS} processes, spread over the replicas in turn. {WARMUP:g} s of warm-up, then a
{budget.answers_seconds:g} s window.

- **calls**: every call of the run: OK / any other outcome (by gRPC code).
- **upstream in window**: TIW's arrivals of the action between the window's two snapshots of the emulator's
  counters; **max/1 s, throttled**: most arrivals in any 1 s and `RequestLimitExceeded` answers, whole run.
- **calls per upstream**: OK calls begun in the window ÷ upstream in window.
- **upstream / coalesced / cache**: the share of OK answers by their `tiw-source`; **age, not final**:
  the `tiw-age-ms` of OK answers in a state that is not the last (a final answer may be any age), and
  (how many were older than the default `TIW_MAX_STALENESS`, {MAX_STALENESS:g} s); **latency**: call start
  to answer, at the caller.
- **first seen**: for each change of a task's state in the window (at the emulator's record), the time
  until the first answer (any caller's, at its arrival) showing that state or a later one; (n) changes.

{table(POLL_HEADER, rows)}

{chr(10).join(notes)}

{watch_body}
{hit_body}"""
    return Section("Answers: coalesced, cached and watched Describe answers at 25x the quota", body, goals)


# --- the load generator (``python -m bench.answers``) ----------------------------------------------

GOLDEN = 0.6180339887498949  # caller phases: i * golden mod 1 spreads any run of callers evenly


def _types(spec: JSON) -> tuple[Any, Any]:
    from tiw_facade._proto.tiw.v20190919 import tiw_pb2

    return _message_type(spec["request"], tiw_pb2), _message_type(spec["response"], tiw_pb2)


def _message_type(name: str, tiw_pb2: Any) -> Any:
    """A message class of the TIW mirror, or else of the facade's own protos (the watch request)."""
    found = getattr(tiw_pb2, name, None)
    if found is not None:
        return found
    import importlib
    import pkgutil

    from tiw_facade._proto.tiw import facade as facade_protos

    for info in pkgutil.walk_packages(facade_protos.__path__, f"{facade_protos.__name__}."):
        if info.name.endswith("_pb2"):
            found = getattr(importlib.import_module(info.name), name, None)
            if found is not None:
                return found
    raise LookupError(f"no message {name} in the facade's protos")


def _stubs(
    channels: Sequence[Any], specs: Sequence[JSON], streaming: bool
) -> tuple[list[list[Any]], list[Any]]:
    """One callable per (channel, task), and each task's request message."""
    from google.protobuf import json_format

    stubs: list[list[Any]] = [[] for _ in channels]
    messages = []
    for spec in specs:
        request, response = _types(spec)
        messages.append(json_format.ParseDict(spec["params"], request()))
        for own, channel in zip(stubs, channels, strict=True):
            make = channel.unary_stream if streaming else channel.unary_unary
            own.append(make(spec["method"], request_serializer=request.SerializeToString,
                            response_deserializer=response.FromString))  # fmt: skip
    return stubs, messages


async def offer_polls(command: JSON) -> JSON:
    """Callers [first, last): caller i polls task i mod len(tasks) on target i mod len(targets)."""
    import grpc

    channels = [grpc.aio.insecure_channel(target) for target in command["targets"]]
    stubs, messages = _stubs(channels, command["tasks"], streaming=False)
    begin, end, period = (
        float(command["begin"]),
        float(command["begin"]) + float(command["seconds"]),
        float(command["period"]),
    )
    timeout = float(command["timeout"])
    records: list[list[Any]] = []

    async def one(stub: Any, message: Any) -> list[Any]:
        call = stub(message, timeout=timeout)
        try:
            metadata = await call.initial_metadata()
            response = await call
        except grpc.aio.AioRpcError as exc:
            return [exc.code().name, "", -1.0, ""]
        found = {key: value for key, value in (metadata or ())}
        age = found.get("tiw-age-ms")
        return ["OK", found.get("tiw-source", ""), float(age) if age is not None else -1.0, response.status]

    async def caller(index: int) -> None:
        task = index % len(messages)
        stub, message = stubs[index % len(channels)][task], messages[task]
        due = begin + period * ((index * GOLDEN) % 1.0)
        while due < end:
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            started = time.time()
            outcome = await one(stub, message)
            records.append([task, round(started, 4), round(time.time(), 4), *outcome])
            due = max(due + period, time.time())  # a call that overran its period: the next at once

    try:
        for channel in channels:  # connected before the first scheduled call
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        first, last = command["callers"]
        await asyncio.gather(*(caller(index) for index in range(first, last)))
    finally:
        for channel in channels:
            await channel.close()
    return {"records": records}


async def offer_watches(command: JSON) -> JSON:
    """Streams [first, last) of ``total``: stream i watches task i mod len(tasks), opened at
    begin + ramp * i / total, over this process's own connections in turn."""
    import grpc

    # Own subchannels: channels to one target would otherwise share one connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(target, options=options)
        for target in command["targets"]
        for _ in range(int(command["channels"]))
    ]
    stubs, messages = _stubs(channels, command["tasks"], streaming=True)
    begin, ramp, total = float(command["begin"]), float(command["ramp"]), int(command["total"])
    timeout = float(command["timeout"])
    records: list[list[Any]] = []

    async def stream(index: int) -> None:
        task = index % len(messages)
        delay = begin + ramp * index / total - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        opened = time.time()
        seen: list[list[Any]] = []
        count = 0
        try:
            async for response in stubs[index % len(channels)][task](messages[task], timeout=timeout):
                count += 1
                if not seen or seen[-1][1] != response.status:
                    seen.append([round(time.time(), 4), response.status])
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        records.append([task, round(opened, 4), round(time.time(), 4), code, count, seen])

    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        first, last = command["streams"]
        await asyncio.gather(*(stream(index) for index in range(first, last)))
    finally:
        for channel in channels:
            await channel.close()
    return {"records": records}


OFFERS: dict[str, Callable[[JSON], Any]] = {"poll": offer_polls, "watch": offer_watches}


def main() -> int:
    for line in sys.stdin:
        import uvloop  # as the facade runs: the generators' own overhead stays small

        command = json.loads(line)
        answer = uvloop.run(OFFERS[command["op"]](command))
        # Megabytes of records go through a file: a reply that size on the pipe once left the
        # driver's readline waiting for good (seen twice, never explained).
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as out:
            json.dump(answer, out, separators=(",", ":"))
        sys.stdout.write(json.dumps({"file": out.name}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
