"""Fairness: a caller that floods one action with 10x its quota does not starve a light one.

One action (``DescribeWhiteboardPush``, each call about a push task of its own, so only TIW can
answer it: ``bench/mirror.py``), two callers that name themselves with
the ``tiw-caller`` metadata: ``flood`` offers 200 calls/s (10x the limit) and ``light`` 2 calls/s,
both open loops (calls start on schedule whatever the answers do) with 3 s deadlines, spread over
the replicas in turn, each caller on its own turn. The facades serve the waiting calls of one action
by caller in weighted round robin (``TIW_CALLER_WEIGHTS="flood=1,light=1"``, which also gives each
caller its own series in the ``tiw_limiter_caller_*`` metrics). Two set-ups, as in the quota section:
one replica (in-process limiter), and three replicas sharing one redis-server.

The light caller's latencies are measured by the caller itself (call start to answer), over the
whole run; the emulator's counters (arrivals per 1 s window, throttles, utilization in a window)
are read as ``bench/quota.py`` reads them, and checked as it checks them: each call TIW answered one
request to it, a refused one none.

Run as ``python -m bench.fairness``, this module is the load generator: ``bench/worker.py``'s
``open`` sends no metadata and one rate for every call, and here each caller has its own name and
rate. One JSON command in on stdin, one JSON answer out, like the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import sys
import time
from collections import Counter, defaultdict
from typing import Any

from bench import mirror
from bench.calls import DESCRIBE_WHITEBOARD_PUSH, PARAMS
from bench.common import Budget, Goal, Section, fmt, grpc_call, table
from bench.procs import (
    HOST,
    PYTHON,
    Proc,
    Processes,
    TaskAdmin,
    Worker,
    facade_environment,
    free_port,
)
from bench.quota import SETUPS, Setup, Snapshot, arrivals_goal, drive, lead
from bench.stats import histogram_buckets, histogram_quantile, percentile

JSON = dict[str, Any]

LIMIT = 20
ACTION = DESCRIBE_WHITEBOARD_PUSH
DEADLINE = 3.0
TAIL = 0.5  # load continues this long past the second snapshot, so the window ends saturated
WAIT_GOAL = 1.0  # the light caller's p99, seconds
UTILIZATION_GOAL = 0.97
ADMITTED = "tiw_limiter_caller_admitted_total"
REJECTED = "tiw_limiter_caller_rejected_total"
CALLER_WAIT = "tiw_limiter_caller_wait_seconds"


@dataclasses.dataclass(frozen=True)
class Caller:
    name: str
    rate: float  # calls offered per second


FLOOD = Caller("flood", 10 * LIMIT)
LIGHT = Caller("light", 2)
CALLERS = (FLOOD, LIGHT)
WEIGHTS = ",".join(f"{caller.name}=1" for caller in CALLERS)

EMULATOR_HEADER = (
    "set-up",
    "max/1 s",
    "throttled",
    "utilization",
    "arrivals at TIW",
    "CPU in the window (cores)",
)
CALLER_HEADER = (
    "set-up",
    "caller",
    "offered",
    "OK / refused / late",
    "wait p50 / p99",
    "limiter wait p50 / p99",
    "admitted / refused (facades)",
)


@dataclasses.dataclass(frozen=True)
class Run:
    """What one set-up measured: every call's record, and the counters at three moments."""

    setup: Setup
    records: list[list[Any]]  # [caller index, start (monotonic), latency ms, outcome]
    start: dict[str, dict[str, int]]  # the emulator's counters before the first call
    first: Snapshot  # the utilization window's start
    second: Snapshot  # its end
    final: Snapshot  # after every answer and every token back

    @property
    def window(self) -> float:
        return self.second.at - self.first.at


def run(procs: Processes, budget: Budget) -> Section:
    runs = []
    for setup in SETUPS:
        with procs.scope():
            runs.append(_measure(procs, budget, setup))
    emulator_rows, caller_rows, goals = [], [], []
    for measured in runs:
        row, setup_goals = _emulator_row(measured)
        emulator_rows.append(row)
        caller_rows += [_caller_row(measured, index) for index in range(len(CALLERS))]
        goals += setup_goals + _light_goals(measured)
    seconds = budget.quota_warmup + budget.quota_seconds + TAIL
    body = f"""\
The emulator at its strict default ({LIMIT} per action in any 1 s, counted on arrival); the facades
at `TIW_RATE_LIMIT={LIMIT}`, `TIW_CALLER_WEIGHTS="{WEIGHTS}"`. One action, `{ACTION}`, each
call about a push task of its own, over from the start (created beforehand through the emulator's
control API, `POST /_emulator/tasks`), so neither the answer cache nor a shared request can answer
it. Caller `{FLOOD.name}` offers {FLOOD.rate:g} calls/s ({FLOOD.rate / LIMIT:g}x the limit),
caller `{LIGHT.name}` {LIGHT.rate:g} calls/s, each naming itself with `tiw-caller`, for {seconds:g} s:
open loops from one load-generator process, each call with a {DEADLINE:g} s deadline, spread over the
replicas in turn (each caller on its own turn).

- **max/1 s**, **throttled**: at the emulator, whole run (first call to last answer), as in the quota
  section; **utilization**: accepted arrivals (both callers) between two snapshots
  ({budget.quota_warmup:g} s after the load starts and {budget.quota_seconds:g} s later) ÷ ({LIMIT} x the
  time between them).
- **OK / refused / late**: the callers' outcomes, whole run: OK, `RESOURCE_EXHAUSTED` (the facade
  found no slot within the deadline), `DEADLINE_EXCEEDED`.
- **wait p50 / p99**: from the call's start to its answer, measured by the caller, every call of the
  run whatever its outcome. **limiter wait**: the same from the facades' `{CALLER_WAIT}`
  histogram (summed over replicas, interpolated inside its buckets, so coarse).
- **admitted / refused (facades)**: the facades' `{ADMITTED}` and `{REJECTED}` (all reasons), whole run.
- **arrivals at TIW**: the emulator's count of requests, whole run, checked against the callers'
  outcomes: each call answered OK was one request to TIW, a refused one none, a late one one or none.

{table(EMULATOR_HEADER, emulator_rows)}

{table(CALLER_HEADER, caller_rows)}
"""
    return Section("Fairness: a light caller beside one flooding 10x the quota", body, goals)


def _measure(procs: Processes, budget: Budget, setup: Setup) -> Run:
    emulator, url = procs.emulator(rate_limit=LIMIT)
    admin = TaskAdmin(url)
    roles: dict[str, list[Proc]] = defaultdict(list)  # for the CPU each role used
    roles["emulator"].append(emulator)
    extra = {"TIW_RATE_LIMIT": str(LIMIT), "TIW_CALLER_WEIGHTS": WEIGHTS}
    if setup.shared:
        redis, redis_url = procs.redis()
        roles["redis-server"].append(redis)
        extra |= {"TIW_REDIS_URL": redis_url, "TIW_EXPECTED_REPLICAS": str(setup.replicas)}
    targets, metrics_urls = [], []
    for _ in range(setup.replicas):
        grpc_port, http_port = free_port(), free_port()
        roles["facades"].append(procs.facade(facade_environment(url, grpc_port, http_port, **extra)))
        targets.append(f"{HOST}:{grpc_port}")
        metrics_urls.append(f"http://{HOST}:{http_port}/metrics")
    worker = procs.spawn(
        Worker, f"load-fairness-{setup.replicas}", [PYTHON, "-m", "bench.fairness"], None, pipes=True
    )
    assert isinstance(worker, Worker)
    roles["load generator"].append(worker)
    admin.reset()

    seconds = budget.quota_warmup + budget.quota_seconds + TAIL
    calls = sum(int(seconds * caller.rate) for caller in CALLERS)
    each = mirror.per_call(admin, ACTION, calls)
    start = admin.stats()
    begin = time.monotonic() + lead(calls)  # the worker prepares the requests, connects to every replica
    command = {
        "begin": begin,
        "seconds": seconds,
        "targets": targets,
        "call": grpc_call(ACTION, PARAMS[ACTION]),
        "each": each,
        "callers": [dataclasses.asdict(caller) for caller in CALLERS],
        "timeout": DEADLINE,
    }
    records, first, second, final = drive(
        "fairness",
        worker,
        command=command,
        seconds=seconds,
        begin=begin,
        budget=budget,
        admin=admin,
        metrics_urls=metrics_urls,
        roles=roles,
    )
    return Run(setup, records, start, first, second, final)


# --- the report ---------------------------------------------------------------------------------


def _emulator_row(measured: Run) -> tuple[list[str], list[Goal]]:
    first, second, final = measured.first, measured.second, measured.final
    accepted = second.stats[ACTION]["accepted"] - first.stats[ACTION]["accepted"]
    utilization = accepted / (LIMIT * measured.window)
    most = final.stats[ACTION]["max_in_window"]
    throttled = final.stats[ACTION]["throttled"]
    cores = ", ".join(
        f"{role} {(second.cpu[role] - first.cpu[role]) / measured.window:.2f}" for role in sorted(second.cpu)
    )
    name = measured.setup.name
    arrived = mirror.arrived_between(measured.start, final.stats)
    row = [
        name,
        f"**{most}**",
        f"**{throttled}**",
        f"**{utilization:.1%}**",
        str(arrived[ACTION]),
        f"{cores} (of {os.cpu_count()})",
    ]
    goals = [
        Goal(
            f"Fairness ({name}): ≤ {LIMIT} arrivals in any 1 s, zero throttles",
            most <= LIMIT and throttled == 0,
            f"max {most} accepted, {throttled} throttled",
        ),
        Goal(
            f"Fairness ({name}): utilization ≥ {UTILIZATION_GOAL:.0%}",
            utilization >= UTILIZATION_GOAL,
            f"{utilization:.2%}",  # two decimals: a figure just under the bar never reads as on it
        ),
        arrivals_goal(f"Fairness ({name})", {ACTION: Counter(str(r[3]) for r in measured.records)}, arrived),
    ]
    return row, goals


def _calls(measured: Run, index: int) -> list[list[Any]]:
    return [record for record in measured.records if record[0] == index]


def _outcomes(calls: list[list[Any]]) -> tuple[Counter[str], str]:
    """The count of each outcome, and ``OK / refused / late`` (and any other outcome) to show."""
    codes = Counter(code for *_, code in calls)
    other = {k: v for k, v in codes.items() if k not in {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}}
    shown = f"{codes['OK']} / {codes['RESOURCE_EXHAUSTED']} / {codes['DEADLINE_EXCEEDED']}"
    return codes, shown + (f" / other {other}" if other else "")


def _caller_row(measured: Run, index: int) -> list[str]:
    caller = CALLERS[index]
    calls = _calls(measured, index)
    latencies = [latency / 1000 for _, _, latency, _ in calls]
    _, outcomes = _outcomes(calls)
    final = measured.final
    waits: dict[float, float] = {}
    for text in final.metrics:
        for bound, count in histogram_buckets(text, CALLER_WAIT, action=ACTION, caller=caller.name).items():
            waits[bound] = waits.get(bound, 0.0) + count
    admitted = final.metric_sum(ADMITTED, action=ACTION, caller=caller.name)
    rejected = final.metric_sum(REJECTED, action=ACTION, caller=caller.name)
    bold = "**" if caller is LIGHT else ""  # the light caller's figures are the goals
    return [
        measured.setup.name,
        f"`{caller.name}` ({caller.rate:g}/s)",
        str(len(calls)),
        f"{bold}{outcomes}{bold}",
        f"{fmt(percentile(latencies, 50))} / {bold}{fmt(percentile(latencies, 99))}{bold} s",
        f"{fmt(histogram_quantile(waits, 0.5))} / {fmt(histogram_quantile(waits, 0.99))} s",
        f"{admitted:.0f} / {rejected:.0f}",
    ]


def _light_goals(measured: Run) -> list[Goal]:
    calls = _calls(measured, CALLERS.index(LIGHT))
    p99 = percentile([latency / 1000 for _, _, latency, _ in calls], 99)
    codes, shown = _outcomes(calls)
    name = measured.setup.name
    return [
        Goal(
            f"Fairness ({name}): `{LIGHT.name}`'s p99 wait ≤ {WAIT_GOAL:g} s",
            p99 <= WAIT_GOAL,  # NaN (no calls) is a miss
            f"p99 {fmt(p99, 3)} s over {len(calls)} calls",
        ),
        Goal(
            f"Fairness ({name}): none of `{LIGHT.name}`'s calls refused",
            bool(calls) and codes["OK"] == len(calls),
            f"OK / refused / late {shown}",
        ),
    ]


# --- the load generator (``python -m bench.fairness``) ------------------------------------------


async def offer(command: JSON) -> JSON:
    """Each caller's open loop: its call i starts at begin + i / rate, on replica i mod n."""
    import grpc
    from google.protobuf import json_format
    from tiw_facade._proto.tiw.v20190919 import tiw_pb2
    from tiw_facade.identity import CALLER_KEY

    spec: JSON = command["call"]
    request_type, response_type = getattr(tiw_pb2, spec["request"]), getattr(tiw_pb2, spec["response"])
    # The requests the calls send, in the order they start (callers interleaved): one each, from
    # ``each``, or the call's one request every time.
    messages = [
        json_format.ParseDict(params, request_type()) for params in command.get("each") or [spec["params"]]
    ]
    sent = itertools.count()
    timeout = float(command["timeout"])
    begin, seconds = float(command["begin"]), float(command["seconds"])
    channels = [grpc.aio.insecure_channel(target) for target in command["targets"]]
    stubs = [
        channel.unary_unary(
            spec["method"],
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        for channel in channels
    ]
    records: list[list[Any]] = []

    async def one(stub: Any, index: int, metadata: tuple[tuple[str, str], ...]) -> None:
        message = messages[next(sent) % len(messages)]
        started = time.monotonic()
        try:
            await stub(message, timeout=timeout, metadata=metadata)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = str(exc.code().name)
        records.append([index, round(started, 6), round((time.monotonic() - started) * 1000, 4), code])

    async def open_loop(index: int, name: str, rate: float) -> None:
        metadata = ((CALLER_KEY, name),)
        calls = []
        for tick in range(int(seconds * rate)):
            delay = begin + tick / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            calls.append(asyncio.create_task(one(stubs[tick % len(stubs)], index, metadata)))
        await asyncio.gather(*calls)

    try:
        for channel in channels:  # connected before the first scheduled call
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        await asyncio.gather(
            *(open_loop(index, c["name"], float(c["rate"])) for index, c in enumerate(command["callers"]))
        )
    finally:
        for channel in channels:
            await channel.close()
    return {"records": records}


def main() -> int:
    for line in sys.stdin:
        answer = asyncio.run(offer(json.loads(line)))
        sys.stdout.write(json.dumps(answer, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
