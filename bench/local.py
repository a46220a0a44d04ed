"""The local path: answers the facade gives without calling TIW, vs a bare grpc.aio echo server.

Same client harness for all three (one grpc.aio client process, 32 calls in flight, 0.5 s
deadlines), rounds interleaved:

- a bare grpc.aio unary echo server (``bench.roles echo``: same message in and out, on uvloop like
  the facade, no interceptors);
- the facade answering INVALID_ARGUMENT: ``DescribeWhiteboardPush`` without ``TaskId``;
- the facade answering RESOURCE_EXHAUSTED at once: ``TIW_RATE_LIMIT=1`` and the one token held by a
  call to an upstream that never answers (a socket that accepts and never reads), so every other
  call's slot lies beyond its 0.5 s deadline.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.calls import DESCRIBE_WHITEBOARD_PUSH, INVALID_DESCRIBE_PUSH, PARAMS
from bench.common import Budget, Goal, Section, fmt, fmt_ratio, grpc_call, rotated, table
from bench.procs import (
    HOST,
    BenchError,
    Proc,
    Processes,
    Worker,
    blackhole,
    facade_environment,
    free_port,
    get_text,
)
from bench.roles import ECHO_METHOD
from bench.stats import median, paired, parse_prometheus, ratio

ECHO = "bare grpc.aio echo"
INVALID = "facade → INVALID_ARGUMENT"
EXHAUSTED = "facade → RESOURCE_EXHAUSTED"
PATHS = (ECHO, INVALID, EXHAUSTED)
EXPECTED = {ECHO: "OK", INVALID: "INVALID_ARGUMENT", EXHAUSTED: "RESOURCE_EXHAUSTED"}
DEADLINE = 0.5
GOAL = 0.5


def run(procs: Processes, budget: Budget) -> Section:
    with procs.scope(), blackhole() as hole:
        return _measure(procs, budget, hole)


VALID_CALL = grpc_call(DESCRIBE_WHITEBOARD_PUSH, PARAMS[DESCRIBE_WHITEBOARD_PUSH])
INVALID_CALL = grpc_call(DESCRIBE_WHITEBOARD_PUSH, INVALID_DESCRIBE_PUSH)
ECHO_CALL = {
    "method": ECHO_METHOD,
    "request": "DescribeWhiteboardPushRequest",
    "response": "DescribeWhiteboardPushRequest",
    "params": PARAMS[DESCRIBE_WHITEBOARD_PUSH],
}


def exhausted_facade(
    procs: Processes, hole: int, worker: Worker, *, profile: Path | None = None
) -> tuple[Proc, str]:
    """A facade whose one `DescribeWhiteboardPush` token is held by a call the upstream never answers.

    Returns the facade's process and gRPC target; every other valid call of that action is now
    refused at once with RESOURCE_EXHAUSTED (checked).
    """
    grpc_port, http_port = free_port(), free_port()
    env = facade_environment(f"http://{HOST}:{hole}", grpc_port, http_port, TIW_RATE_LIMIT="1")
    facade = procs.facade(env, profile=profile)
    target = f"{HOST}:{grpc_port}"
    # The held call asks about another task: the same request would be shared with it (docs/answers.md).
    held = grpc_call(DESCRIBE_WHITEBOARD_PUSH, {**PARAMS[DESCRIBE_WHITEBOARD_PUSH], "TaskId": "held-forever"})
    worker.request({"op": "hold", "target": target, "call": held, "timeout": 600}, timeout=10)
    _until_admitted(f"http://{HOST}:{http_port}/metrics", DESCRIBE_WHITEBOARD_PUSH)
    probe = worker.request(
        {"op": "seq", "target": target, "call": VALID_CALL, "params": [VALID_CALL["params"]], "warmup": 0,
         "n": 3, "timeout": DEADLINE},
        timeout=30,
    )  # fmt: skip
    if set(probe["codes"]) != {"RESOURCE_EXHAUSTED"}:
        raise BenchError(f"the RESOURCE_EXHAUSTED path answered {probe['codes']} instead")
    return facade, target


def conc_command(target: str, call: dict[str, Any], budget: Budget, seconds: float) -> dict[str, Any]:
    return {
        "op": "conc",
        "targets": [target],
        "calls": [call],
        "concurrency": budget.concurrency,
        "seconds": seconds,
        "warmup_seconds": 0.3,
        "timeout": DEADLINE,
    }


def _measure(procs: Processes, budget: Budget, hole: int) -> Section:
    echo, echo_target = procs.echo()
    worker = procs.worker("load-local", "grpc")
    facade, facade_target = exhausted_facade(procs, hole, worker)
    specs: dict[str, tuple[str, dict[str, Any]]] = {
        ECHO: (echo_target, ECHO_CALL),
        INVALID: (facade_target, INVALID_CALL),
        EXHAUSTED: (facade_target, VALID_CALL),
    }

    rates: dict[str, list[float]] = defaultdict(list)
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    cpu: dict[tuple[str, str], list[float]] = defaultdict(list)  # (path, server|client) -> µs per call
    for turn in range(budget.rounds):
        for path in rotated(PATHS, turn):
            target, call = specs[path]
            roles = {"server": echo if path == ECHO else facade, "client": worker}
            before = {role: proc.cpu_seconds() for role, proc in roles.items()}
            result = worker.request(conc_command(target, call, budget, budget.local_seconds), timeout=60)
            for role, proc in roles.items():
                cpu[path, role].append((proc.cpu_seconds() - before[role]) / result["calls_total"] * 1e6)
            rates[path].append(result["per_second"])
            outcomes[path].update(result["codes"])
    worker.request({"op": "release"}, timeout=30)
    return _section(budget, rates, outcomes, cpu)


def _until_admitted(metrics_url: str, action: str, timeout: float = 10.0) -> None:
    """Wait until the facade's limiter has admitted a call of ``action`` (the held one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = parse_prometheus(get_text(metrics_url), "tiw_limiter_admitted_total")
        if any(labels.get("action") == action and value >= 1 for labels, value in samples):
            return
        time.sleep(0.05)
    raise BenchError(f"the held {action} call was not admitted within {timeout:.0f}s")


HEADER = ("path", "requests/s", "÷ echo", "answers", "server CPU µs/call", "client CPU µs/call", "per round")


def _section(
    budget: Budget,
    rates: dict[str, list[float]],
    outcomes: dict[str, Counter[str]],
    cpu: dict[tuple[str, str], list[float]],
) -> Section:
    medians = {path: median(rates[path]) for path in PATHS}
    ratios = {path: paired(rates[path], rates[ECHO]) for path in PATHS}
    per_call = {key: median(values) for key, values in cpu.items()}
    rows = []
    for path in PATHS:
        share = outcomes[path][EXPECTED[path]] / max(1, sum(outcomes[path].values()))
        rows.append([
            path,
            fmt(medians[path], 0),
            f"**{fmt_ratio(ratios[path])}**",
            f"{share:.1%} {EXPECTED[path]}",
            fmt(per_call[path, "server"], 0),
            fmt(per_call[path, "client"], 0),
            ", ".join(fmt(v, 0) for v in rates[path]),
        ])  # fmt: skip
    goals = [
        Goal(
            f"Local path: {path} ≥ {GOAL}x bare echo",
            ratios[path] >= GOAL,
            f"{fmt_ratio(ratios[path], 3)} ({fmt(medians[path], 0)} vs {fmt(medians[ECHO], 0)} req/s)",
        )
        for path in (INVALID, EXHAUSTED)
    ]

    def whole(path: str) -> float:
        return per_call[path, "server"] + per_call[path, "client"]

    cpu_ratios = "; ".join(
        f"{path}: server {fmt_ratio(ratio(per_call[path, 'server'], per_call[ECHO, 'server']))}, "
        f"server + client {fmt_ratio(ratio(whole(path), whole(ECHO)))}"
        for path in (INVALID, EXHAUSTED)
    )
    body = f"""\
One grpc.aio client process, {budget.concurrency} calls in flight, {DEADLINE:g} s deadlines,
{budget.local_seconds:g} s per path per round after 0.3 s warm-up, {budget.rounds} rounds, the paths taking
turns within each round; requests/s are medians of the rounds, ratios medians of the rounds'
ratios. The echo server is `python -m bench.roles echo` (uvloop, no interceptors); the facade is
`tiw-facade serve` with `TIW_RATE_LIMIT=1` and its endpoint a socket that accepts and never
answers, whose one `DescribeWhiteboardPush` token is held by a call left in flight, so every
other valid call is refused at once; the invalid ones (no `TaskId`) never reach the limiter.

{table(HEADER, rows)}

CPU per call: user + system time of the server's and the client's process (all threads, from
`/proc`) over each measurement, warm-up included, ÷ the calls completed; medians of the rounds.
It moves less than requests/s with other work on the machine. CPU per call ÷ the echo's —
{cpu_ratios}. Client and server share the machine's cores, so the inverse of the last figure is
about the requests/s ratio to expect when the CPU is the limit.
"""
    return Section("Local path: answers without an upstream call", body, goals, notes=ratios)
