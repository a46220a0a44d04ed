"""Callbacks: the same watched tasks three times in one run, polling alone and with TIW's callbacks.

Two facade replicas share one redis-server, in front of one emulator (``tiw-facade emulator``, the
product's own command) at its strict default of 20 requests per action in any 1 s. 40 tasks (14
snapshot, 13 push, 13 video: ``bench.answers``' tasks) change state at random times inside the
measuring window, at the emulator's own record of each change (``GET /_emulator/tasks``); each task
has four ``TaskWatcher`` streams, two on each replica, from ``bench.answers``' load generators. Each
mode starts its own processes, with the same schedule of changes (relative to its window):

- **polling alone**: no callbacks; the watched answers are refreshed with spare quota once 90% of
  TIW_MAX_STALENESS old, and the other replica's watchers read Redis every 0.25 s;
- **with callbacks**: the emulator posts each change's callback (``--callback-url``) to one replica's
  intake, as an Ingress would send it to one of them; both replicas have TIW_CALLBACK_PORT and the
  key (TIW_CALLBACK_KEYS). The intake's replica confirms with one Describe at once; the other follows
  the event log and looks for the confirmed answer in Redis every 20 ms;
- **with callbacks, refresh after 10 s**: the same, with TIW_REFRESH_AFTER_WITH_CALLBACKS=10 on both.

Measured per change: the delay from the emulator's record to each watcher's receipt of that state
(or a later one), and to the last of its watchers; per mode, the Describe requests TIW received in
the window (the emulator's counts), split by the facades' ``tiw_refreshes_total`` and
``tiw_callback_confirms_total{outcome="sent"}``. Every mode's figures are set against polling alone's.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from tiw_facade.emulator import DEMO_CALLBACK_KEY

from bench import answers
from bench.answers import JSON, Fleet, Stream, Task, quantile
from bench.calls import PARAMS, PUSH, SNAPSHOT, VIDEO, Kind
from bench.common import Budget, Goal, Section, fmt, fmt_ratio, table
from bench.procs import (
    HOST,
    PYTHON,
    BenchError,
    Proc,
    Processes,
    TaskAdmin,
    facade_environment,
    free_port,
    wait_http,
)
from bench.quota import Snapshot

KINDS: tuple[Kind, ...] = (SNAPSHOT, PUSH, VIDEO)
ACTIONS = tuple(kind.action for kind in KINDS)
REPLICAS = 2
WATCHERS_PER_TASK = 4  # half on each replica
RAMP = 1.0  # seconds over which the streams open
# After the streams open, before the window: one unwatched task per kind changes meanwhile, so that
# callbacks of every action are already coming when the window opens (TIW_REFRESH_AFTER_WITH_CALLBACKS
# applies only while they come); without callbacks, the same tasks change for nothing.
WARMUP = 2.0
PRIMER_AT = 0.5  # after the streams have opened
EDGE = 0.5  # the window's changes fall at least this long after it opens and before it ends
STARTUP = 1.0  # from spawning the load generators to the streams' first opening
CONFIRM_INTERVAL = 1.0  # the facades' default TIW_CALLBACK_CONFIRM_INTERVAL
SEEN_GOAL = 0.3  # seconds, p95 of a change seen by every watcher (the issue's)
REFRESH_SHARE_GOAL = 0.5  # the slower refresh's refresh requests/s, at most this share of polling's
SLOWER_REFRESH = 10.0
CALLBACK_KEY = DEMO_CALLBACK_KEY
SEED = 11  # the same schedule of changes in every mode and every run


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    callbacks: bool  # the emulator posts its callbacks to the first replica's intake
    settings: Mapping[str, str] = dataclasses.field(default_factory=dict)  # both replicas'


POLLING = Mode("polling alone", False)
CALLBACKS = Mode("with callbacks", True)
SLOWER = Mode(
    f"with callbacks, refresh after {SLOWER_REFRESH:g} s",
    True,
    {"TIW_REFRESH_AFTER_WITH_CALLBACKS": f"{SLOWER_REFRESH:g}"},
)
MODES = (POLLING, CALLBACKS, SLOWER)


class CallbackAdmin(TaskAdmin):
    def callback_stats(self) -> dict[str, int]:
        """The emulator's callbacks since its last reset: sent, delivered, failed, in_flight …"""
        stats: dict[str, int] = self._request("GET", "callbacks/stats")
        return stats


# --- the set-up: one emulator, one redis-server, two facades -------------------------------------


def callback_keys() -> str:
    """TIW_CALLBACK_KEYS for the SdkAppIds the tasks use: the emulator's key for each."""
    apps = sorted({int(PARAMS[kind.action]["SdkAppId"]) for kind in KINDS})
    return ",".join(f"{app}={CALLBACK_KEY}" for app in apps)


def start_emulator(procs: Processes, callback_url: str) -> tuple[Proc, str]:
    """``tiw-facade emulator`` at the strict default, posting callbacks to ``callback_url`` ("": none).
    bench.roles' emulator has no callbacks; this is the product's command, as an operator runs it."""
    port = free_port()
    argv = [PYTHON, "-m", "tiw_facade.cli", "emulator", "--port", str(port)]
    argv += ["--rate-limit", str(answers.LIMIT), "--log-level", "WARNING"]
    if callback_url:
        argv += ["--callback-url", callback_url]
    proc = procs.spawn(Proc, f"emulator-{port}", argv, {"TIW_EMULATOR_CALLBACK_KEY": CALLBACK_KEY})
    url = f"http://{HOST}:{port}"
    wait_http(proc, f"{url}/_emulator/stats")
    return proc, url


def start_fleet(procs: Processes, mode: Mode) -> tuple[Fleet, CallbackAdmin]:
    intakes = [free_port() for _ in range(REPLICAS)] if mode.callbacks else []
    callback_url = f"http://{HOST}:{intakes[0]}" if intakes else ""
    emulator, url = start_emulator(procs, callback_url)
    redis, redis_url = procs.redis()
    roles: dict[str, list[Proc]] = defaultdict(list)
    roles["emulator"].append(emulator)
    roles["redis-server"].append(redis)
    shared = {"TIW_REDIS_URL": redis_url, "TIW_EXPECTED_REPLICAS": str(REPLICAS), **mode.settings}
    targets, metrics_urls = [], []
    for index in range(REPLICAS):
        grpc_port, http_port = free_port(), free_port()
        extra = dict(shared)
        if intakes:
            extra |= {"TIW_CALLBACK_PORT": str(intakes[index]), "TIW_CALLBACK_KEYS": callback_keys()}
        roles["facades"].append(procs.facade(facade_environment(url, grpc_port, http_port, **extra)))
        targets.append(f"{HOST}:{grpc_port}")
        metrics_urls.append(f"http://{HOST}:{http_port}/metrics")
    admin = CallbackAdmin(url)
    admin.reset()  # and the callback counters with it
    return Fleet(admin, targets, metrics_urls, list(roles["facades"]), roles), admin


def add_primers(admin: TaskAdmin, at: float) -> None:
    """One task per kind whose first change (and its callback) comes at ``at``, then none for an hour."""
    bodies = []
    for kind in KINDS:
        first, *rest = kind.durations
        durations = {first: max(0.0, at - time.time()), **{name: 3600.0 for name in rest}}
        bodies.append({"Kind": kind.name, "SdkAppId": PARAMS[kind.action]["SdkAppId"], **durations})
    admin.add_tasks(bodies)


def watch_spec(kind: Kind, task_id: str) -> JSON:
    """The TaskWatcher stream of ``kind``'s task (bench.answers.watch_spec, for any kind)."""
    name = kind.action.removeprefix("Describe")
    return {
        "method": f"/{answers.WATCHER}/Watch{name}",
        "request": f"Watch{name}Request",
        "response": f"{kind.action}Response",
        "params": {"request": kind.params(task_id)},
    }


def watch_commands(targets: Sequence[str], specs: list[JSON], begin: float, seconds: float) -> list[JSON]:
    """One generator per replica, each holding WATCHERS_PER_TASK / REPLICAS streams of every task."""
    streams = WATCHERS_PER_TASK * len(specs)
    commands = answers.watch_commands(list(targets), specs, begin, seconds, streams=streams, ramp=RAMP)
    if len(commands) != len(targets):
        raise BenchError(f"{len(commands)} load generators for {len(targets)} replicas")
    return [
        {**command, "targets": [target], "channels": 1}
        for command, target in zip(commands, targets, strict=True)
    ]


# --- one mode ------------------------------------------------------------------------------------


def window_seconds(budget: Budget) -> float:
    """The measuring window of each mode: the quota runs' (30 s full, 5 s quick). Three modes of
    answers_seconds' 10 s would take a quick run past a minute."""
    return budget.quota_seconds


@dataclasses.dataclass
class Run:
    mode: Mode
    tasks: list[Task]
    streams: list[Stream]
    window: tuple[float, float]  # wall times
    first: Snapshot
    second: Snapshot
    final: Snapshot
    sent: dict[str, int]  # the emulator's callback stats at the end


def run_mode(procs: Processes, budget: Budget, mode: Mode) -> Run:
    seconds = window_seconds(budget)
    with procs.scope():
        fleet, admin = start_fleet(procs, mode)
        workers = answers.generators(procs, fleet, f"callbacks-{MODES.index(mode)}")
        begin = time.time() + STARTUP
        start = begin + RAMP + WARMUP
        add_primers(admin, begin + RAMP + PRIMER_AT)
        rng = random.Random(SEED)  # every mode: the same changes at the same offsets into its window
        tasks = answers.create_tasks(admin, KINDS, start + EDGE, start + seconds - EDGE, rng)
        specs = [watch_spec(task.kind, task.task_id) for task in tasks]
        commands = watch_commands(fleet.targets, specs, begin, RAMP + WARMUP + seconds)
        replies: list[JSON] = []
        timeout = STARTUP + RAMP + WARMUP + seconds + 60
        driver = threading.Thread(
            target=lambda: replies.extend(answers.in_parallel(workers, commands, timeout)), daemon=True
        )
        driver.start()
        answers.sleep_until_wall(start)
        opened, first = fleet.mark()
        answers.sleep_until_wall(start + seconds)
        closed, second = fleet.mark()
        driver.join()
        if len(replies) != len(workers):
            raise BenchError(f"the watch load generators failed; logs in {procs.dir}")
        time.sleep(1.1)  # every token back, every callback delivered
        _, final = fleet.mark()
        answers.read_changes(admin, tasks)
        sent = admin.callback_stats()
    streams = [Stream(*record) for reply in replies for record in reply["records"]]
    return Run(mode, tasks, streams, (opened, closed), first, second, final, sent)


# --- from changes to receipts --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Receipt:
    """One change of a task, and its watchers' delays (s) from the change to their first message
    showing that state or a later one (inf: a watcher that never did)."""

    since_previous: float  # since the task's previous change (inf: its first since it was created)
    delays: list[float]

    @property
    def by_every_watcher(self) -> float:
        """Until its last watcher had it (inf: one never did, or it had no watcher)."""
        return max(self.delays, default=math.inf)


def receipts(tasks: Sequence[Task], streams: Sequence[Stream], start: float, end: float) -> list[Receipt]:
    """Each change in [start, end] of each task (a task's first record, its creation, is no change).

    A state at or past the change's can only be shown once the change happened, so the first such
    message is the receipt (its time is rounded to 0.1 ms: a delay may be a hair below 0)."""
    watchers: dict[int, list[Stream]] = defaultdict(list)
    for stream in streams:
        watchers[stream.task].append(stream)
    found = []
    for index, task in enumerate(tasks):
        previous = math.nan
        for at, state in task.changes[1:]:
            if start <= at <= end:
                rank = task.kind.rank(state)
                delays = [
                    next((when - at for when, shown in s.seen if task.kind.rank(shown) >= rank), math.inf)
                    for s in watchers[index]
                ]
                found.append(Receipt(math.inf if math.isnan(previous) else at - previous, delays))
            previous = at
    return found


def redis_errors(final: Snapshot) -> str:
    """The facades' errors talking to Redis, whole mode: with any, a replica served from its own
    process for a while (its watchers saw the other's answers late), so the delays are not this code's
    alone (a busy machine: Redis did not answer in time)."""
    limiter = final.metric_sum("tiw_limiter_backend_errors_total")
    stores = final.metric_sum("tiw_store_errors_total")
    errors = f"Redis errors: limiter {limiter:.0f}, answers and events {stores:.0f}"
    return errors if limiter + stores == 0 else f"**{errors}**"


def ended_final(stream: Stream, tasks: Sequence[Task]) -> bool:
    """The stream ended OK on its task's final state, as every stream here should."""
    final = tasks[stream.task].kind.states[-1]
    return stream.code == "OK" and bool(stream.seen) and stream.seen[-1][1] == final


def spread(values: Sequence[float]) -> str:
    """p50 / p95 / max, in seconds; inf (a change not seen) shows as such."""
    figures = [quantile(values, 50), quantile(values, 95), max(values, default=math.nan)]
    return " / ".join("never" if math.isinf(v) else fmt(v, 3) for v in figures) + " s"


# --- the Describe requests TIW received ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Requests:
    """Describe requests in the window, per second: at TIW (the emulator), and the facades' refreshes
    and confirmations among them (both replicas)."""

    at_tiw: dict[str, float]
    refreshes: dict[str, float]
    confirms: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.at_tiw.values())

    @property
    def refresh_total(self) -> float:
        return sum(self.refreshes.values())

    @property
    def confirm_total(self) -> float:
        return sum(self.confirms.values())


def requests(first: Snapshot, second: Snapshot) -> Requests:
    window = second.at - first.at

    def rate(value: Any) -> float:
        return float(value) / window

    def metric(name: str, action: str, **where: str) -> float:
        return rate(
            second.metric_sum(name, action=action, **where) - first.metric_sum(name, action=action, **where)
        )

    return Requests(
        at_tiw={a: rate(second.stats[a]["accepted"] - first.stats[a]["accepted"]) for a in ACTIONS},
        refreshes={a: metric("tiw_refreshes_total", a) for a in ACTIONS},
        confirms={a: metric("tiw_callback_confirms_total", a, outcome="sent") for a in ACTIONS},
    )


def within_one_per_change(ours: Requests, polling: Requests, changes_per_second: float) -> bool:
    """The callbacks' bound: no more Describe requests/s than polling alone plus one per change."""
    return ours.total <= polling.total + changes_per_second


# --- the section ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Figures:
    run: Run
    receipts: list[Receipt]
    requests: Requests
    seconds: float  # the window

    @property
    def pairs(self) -> list[float]:
        """Every (change, watcher)'s delay."""
        return [d for r in self.receipts for d in r.delays]

    @property
    def every(self) -> list[float]:
        return [r.by_every_watcher for r in self.receipts]

    @property
    def apart(self) -> list[float]:
        """``every`` of the changes at least CONFIRM_INTERVAL after their task's previous one: those
        a confirmation's turn cannot hold back."""
        return [r.by_every_watcher for r in self.receipts if r.since_previous >= CONFIRM_INTERVAL]

    @property
    def changes(self) -> int:
        return len(self.receipts)

    @property
    def changes_per_second(self) -> float:
        return self.changes / self.seconds


def figures(run: Run) -> Figures:
    start, end = run.window
    return Figures(
        run, receipts(run.tasks, run.streams, start, end), requests(run.first, run.second), end - start
    )


SUMMARY_HEADER = (
    "mode",
    "each watcher p50 / p95 / max",
    "every watcher p50 / p95 / max",
    "÷ polling (every, p95)",
    f"every watcher p95, changes ≥ {CONFIRM_INTERVAL:g} s apart (n)",
    "Describe at TIW /s",
    "÷ polling",
    "refreshes /s",
    "÷ polling",
    "confirmations /s",
    "callbacks sent / taken",
    "max/1 s, throttled",
    "streams OK",
)
ACTION_HEADER = ("mode", "action", "Describe at TIW /s", "refreshes /s", "confirmations /s", "other /s")


def summary_row(f: Figures, polling: Figures) -> list[str]:
    run, req = f.run, f.requests
    base = polling.requests
    every_ratio = quantile(f.every, 95) / quantile(polling.every, 95)
    taken = run.final.metric_sum("tiw_callbacks_total", result="accepted")
    most = max(run.final.stats[a]["max_in_window"] for a in ACTIONS)
    throttled = sum(run.final.stats[a]["throttled"] for a in ACTIONS)
    terminal_ok = sum(ended_final(s, run.tasks) for s in run.streams)
    return [
        run.mode.name,
        spread(f.pairs),
        f"**{spread(f.every)}**",
        fmt_ratio(every_ratio, 3),
        f"{fmt(quantile(f.apart, 95), 3)} s ({len(f.apart)})",
        fmt(req.total, 1),
        fmt_ratio(req.total / base.total if base.total else math.nan, 2),
        fmt(req.refresh_total, 1),
        f"**{fmt_ratio(req.refresh_total / base.refresh_total if base.refresh_total else math.nan, 2)}**",
        fmt(req.confirm_total, 2),
        f"{run.sent.get('sent', 0)} / {taken:.0f}",
        f"{most}, {throttled}",
        f"{terminal_ok} of {len(run.streams)}",
    ]


def action_rows(f: Figures) -> list[list[str]]:
    req = f.requests
    return [
        [
            f.run.mode.name,
            f"`{action}`",
            fmt(req.at_tiw[action], 2),
            fmt(req.refreshes[action], 2),
            fmt(req.confirms[action], 2),
            fmt(req.at_tiw[action] - req.refreshes[action] - req.confirms[action], 2),
        ]
        for action in ACTIONS
    ]


def seen_goal(f: Figures, polling: Figures) -> Goal:
    p95 = quantile(f.every, 95)
    unseen = sum(math.isinf(d) for d in f.every)
    return Goal(
        f"Callbacks ({f.run.mode.name}): a change seen by every watcher ≤ {SEEN_GOAL:g} s p95, "
        f"{REPLICAS} replicas",
        bool(f.every) and p95 <= SEEN_GOAL,
        f"p95 {fmt(p95, 3)} s, max {fmt(max(f.every, default=math.nan), 3)} s over {f.changes} changes"
        + (f", {unseen} not seen by all" if unseen else "")
        + f" ({fmt(quantile(f.apart, 95), 3)} s over the {len(f.apart)} ≥ {CONFIRM_INTERVAL:g} s after their "
        "task's previous)" + f"; polling alone p95 {fmt(quantile(polling.every, 95), 3)} s",
    )


def goals(measured: Sequence[Figures]) -> list[Goal]:
    polling, with_callbacks, slower = measured
    base = polling.requests
    bound = base.total + with_callbacks.changes_per_second
    refresh_share = slower.requests.refresh_total / base.refresh_total if base.refresh_total else math.nan
    return [
        seen_goal(with_callbacks, polling),
        seen_goal(slower, polling),
        Goal(
            f"Callbacks ({with_callbacks.run.mode.name}): Describe requests at TIW ≤ polling alone's "
            "+ one per change",
            within_one_per_change(with_callbacks.requests, base, with_callbacks.changes_per_second),
            f"{fmt(with_callbacks.requests.total, 2)}/s vs {fmt(base.total, 2)}/s + "
            f"{fmt(with_callbacks.changes_per_second, 2)} changes/s = {fmt(bound, 2)}/s "
            f"({fmt(with_callbacks.requests.confirm_total, 2)}/s of them confirmations)",
        ),
        Goal(
            f"Callbacks ({slower.run.mode.name}): refresh requests/s ≤ {REFRESH_SHARE_GOAL:g}x "
            "polling alone's",
            refresh_share <= REFRESH_SHARE_GOAL,
            f"{fmt_ratio(refresh_share, 3)}: {fmt(slower.requests.refresh_total, 2)}/s vs "
            f"{fmt(base.refresh_total, 2)}/s; Describe at TIW {fmt(slower.requests.total, 2)}/s vs "
            f"{fmt(base.total, 2)}/s",
        ),
    ]


def run(procs: Processes, budget: Budget) -> Section:
    measured = []
    for mode in MODES:
        print(f"bench:   callbacks: {mode.name} ...", file=sys.stderr, flush=True)
        measured.append(figures(run_mode(procs, budget, mode)))
    polling = measured[0]
    notes = "\n".join(
        f"- {f.run.mode.name}: window {f.seconds:.2f} s, {f.changes} changes in it; CPU in cores: "
        f"{answers.cores(f.run.first, f.run.second)}; {redis_errors(f.run.final)}."
        for f in measured
    )
    streams = WATCHERS_PER_TASK * answers.TASKS
    body = f"""\
The same workload three times in one run, each mode on processes of its own: one emulator
(`tiw-facade emulator`, {answers.LIMIT} requests per action in any 1 s), one redis-server, {REPLICAS} facade
replicas sharing it, at their defaults otherwise (`TIW_MAX_STALENESS` 2 s: a watched answer is
refreshed with spare quota once 1.8 s old; `TIW_CALLBACK_CONFIRM_INTERVAL` {CONFIRM_INTERVAL:g} s).
{answers.TASKS} tasks (14 snapshot, 13 push, 13 video, created through `POST /_emulator/tasks`) change
state at random times in the {window_seconds(budget):g} s window, from {EDGE:g} s after it opens to {EDGE:g} s
before it ends, the same offsets in every mode: a snapshot once (Finished), a push and a video twice
(PUSHING, STOPPED; PROCESSING, FINISHED), the last change final (the streams end there).
{WATCHERS_PER_TASK} `TaskWatcher` streams per task ({streams}), {WATCHERS_PER_TASK // REPLICAS} on each
replica, from two load-generator processes (one per replica), opened over {RAMP:g} s; the window
opens {WARMUP:g} s later.

- **{POLLING.name}**: the emulator sends no callbacks.
- **{CALLBACKS.name}**: the emulator posts each change's callback (`--callback-url`, signed with the
  demo key) to the first replica's intake only, as an Ingress sends each callback to one replica; both
  replicas have `TIW_CALLBACK_PORT` and `TIW_CALLBACK_KEYS`. One intake throughout: the tasks live in
  one emulator, which posts to one URL.
- **{SLOWER.name}**: the same, with `TIW_REFRESH_AFTER_WITH_CALLBACKS={SLOWER_REFRESH:g}` on both
  replicas. It applies while callbacks of the action came in the last minute, so one unwatched task
  per kind changes {PRIMER_AT:g} s after the streams open, in every mode: callbacks of every action are
  coming when the window opens.

- **each watcher**: for every (change in the window, watcher of its task), from the change at the
  emulator's record (`GET /_emulator/tasks`) to the watcher's first message showing that state or a
  later one, at the load generator (one wall clock for every process); **every watcher**: per change,
  until its last watcher had it ("never": one did not); **changes ≥ {CONFIRM_INTERVAL:g} s apart**: the same,
  without the changes that came within `TIW_CALLBACK_CONFIRM_INTERVAL` of their task's previous one
  (see the caveats), and how many are left.
- **Describe at TIW**: the emulator's accepted Describe requests in the window (three actions), per
  second; **refreshes**: the facades' `tiw_refreshes_total` (both replicas, any outcome);
  **confirmations**: `tiw_callback_confirms_total{{outcome="sent"}}`; ÷ polling: against polling alone,
  this run. **callbacks sent / taken**: the emulator's, whole mode (the primers' three included), and
  the intake's `tiw_callbacks_total{{result="accepted"}}`. **max/1 s, throttled**: the emulator's,
  whole mode, the most of one action. **streams OK**: streams that ended OK on their task's final state.

{table(SUMMARY_HEADER, [summary_row(f, polling) for f in measured])}

Per action, in the window (other: Describe at TIW minus the two, e.g. a stream's first answer; below
0 when a refresh or confirmation counted got its answer without a request of its own, from another's):

{table(ACTION_HEADER, [row for f in measured for row in action_rows(f)])}

{notes}

Caveats:

- The emulator posts a callback within milliseconds of the change, over loopback, to a replica
  otherwise idle; TIW's cross the internet and may take seconds, which adds to every delay "with
  callbacks" here (and a lost one leaves the change to the periodic refresh: 1.8 s, or
  {SLOWER_REFRESH:g} s with the slower refresh).
- One replica takes every callback; the other's watchers see a change through the event log and Redis.
- A task's confirmations are at most one per `TIW_CALLBACK_CONFIRM_INTERVAL` across replicas: a
  push's or video's second change within {CONFIRM_INTERVAL:g} s of its first is confirmed at the end of that
  turn, so it reaches the watchers up to {CONFIRM_INTERVAL:g} s late, by design (the bound on what a
  forged or replayed callback may cost): those changes are the tail of "every watcher".
- The tasks finish through the window, so the requests/s are averages over fewer and fewer live
  tasks, alike in every mode.

Run as `.venv/bin/python -m bench --only callbacks` (this section alone, into
`bench/RESULTS-partial.md`; `--quick`: a {Budget.quick().quota_seconds:g} s window), or with every section by
`make bench`."""
    return Section(
        "Callbacks: change to watcher, polling alone vs TIW's callbacks, two replicas",
        body,
        goals(measured),
    )
