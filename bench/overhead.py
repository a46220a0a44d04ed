"""Overhead: each RPC through the facade vs the same call made with Tencent's official Python SDK.

Both clients call the same emulator (rate limit raised far above the load, as is the facade's, so
the limiter never waits). Sequential: ``seq_calls`` calls per RPC per round, one at a time, after a
warm-up. In flight: 32 callers for ``conc_seconds`` (facade: a grpc.aio client with 32 tasks; SDK:
32 threads, each with its own client and connection pool), rotating over the four repeatable RPCs.
Rounds interleave the clients (their order rotates); figures are medians over rounds.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from typing import Any

from bench.calls import ACTIONS, PARAMS, PUSH_SDK_APP_ID, REPEATABLE, STOP_WHITEBOARD_PUSH, stop_params
from bench.common import Budget, Goal, Section, fmt, fmt_ratio, grpc_call, rotated, sdk_call, table
from bench.procs import HOST, EmulatorAdmin, Proc, Processes, Worker, facade_environment, free_port
from bench.stats import median, paired, percentile

UNLIMITED = 100_000
SEQ_HEADER = (
    "RPC",
    "SDK p50 / p99 ms",
    "facade p50 / p99 ms",
    "facade ÷ SDK p50 / p99",
    "facade on asyncio ÷ SDK",
)
SDK = "SDK"
FACADE = "facade"
FACADE_ASYNCIO = "facade, asyncio loop"
CLIENTS = (SDK, FACADE, FACADE_ASYNCIO)
TIMEOUT = 5.0
P50_BAR, P50_GOAL, THROUGHPUT_BAR = 1.25, 1.0, 2.0


def run(procs: Processes, budget: Budget) -> Section:
    with procs.scope():
        return _measure(procs, budget)


def _measure(procs: Processes, budget: Budget) -> Section:
    emulator, url = procs.emulator(rate_limit=UNLIMITED)
    admin = EmulatorAdmin(url)
    targets: dict[str, str] = {}
    servers: dict[str, Proc] = {}
    for client, loop in ((FACADE, "uvloop"), (FACADE_ASYNCIO, "asyncio")):
        grpc_port = free_port()
        env = facade_environment(url, grpc_port, free_port(), TIW_RATE_LIMIT=str(UNLIMITED))
        servers[client] = procs.facade(env, loop=loop)
        targets[client] = f"{HOST}:{grpc_port}"
    grpc_worker = procs.worker("load-grpc", "grpc")
    sdk_worker = procs.worker("load-sdk", "sdk", url.removeprefix("http://"))

    def worker(client: str) -> Worker:
        return sdk_worker if client == SDK else grpc_worker

    # (client, action) -> one (p50, p99) per round; client -> calls/s per round; outcomes seen;
    # (client, role) -> CPU µs per call in flight, per round.
    latency: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    throughput: dict[str, list[float]] = defaultdict(list)
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    cpu: dict[tuple[str, str], list[float]] = defaultdict(list)

    for turn in range(budget.rounds):
        for index, action in enumerate(ACTIONS):
            for client in rotated(CLIENTS, turn + index):
                count = budget.seq_warmup + budget.seq_calls
                if action == STOP_WHITEBOARD_PUSH:  # a fresh push task for every call, on both sides
                    params = [stop_params(t) for t in admin.add_push_tasks(count, PUSH_SDK_APP_ID)]
                else:
                    params = [PARAMS[action]]
                command = _seq_command(client, action, params, budget, targets)
                result = worker(client).request(command, timeout=30 + count * 0.1)
                samples = result["latencies_ms"]
                latency[client, action].append((percentile(samples, 50), percentile(samples, 99)))
                outcomes[client].update(result["codes"])
        for client in rotated(CLIENTS, turn):
            command = _conc_command(client, budget, targets)
            roles = {"client": worker(client), "emulator": emulator}
            if client != SDK:
                roles["facade"] = servers[client]
            before = {role: proc.cpu_seconds() for role, proc in roles.items()}
            result = worker(client).request(command, timeout=60 + budget.conc_seconds * 2)
            for role, proc in roles.items():
                cpu[client, role].append((proc.cpu_seconds() - before[role]) / result["calls_total"] * 1e6)
            throughput[client].append(result["per_second"])
            outcomes[client].update(result["codes"])

    return _section(budget, latency, throughput, outcomes, cpu)


def _seq_command(
    client: str, action: str, params: list[dict[str, Any]], budget: Budget, targets: dict[str, str]
) -> dict[str, Any]:
    command: dict[str, Any] = {
        "op": "seq",
        "params": params,
        "warmup": budget.seq_warmup,
        "n": budget.seq_calls,
        "timeout": TIMEOUT,
    }
    if client == SDK:
        command["call"] = sdk_call(action, {})
    else:
        command["call"] = grpc_call(action, {})
        command["target"] = targets[client]
    return command


def _conc_command(client: str, budget: Budget, targets: dict[str, str]) -> dict[str, Any]:
    make = sdk_call if client == SDK else grpc_call
    command: dict[str, Any] = {
        "op": "conc",
        "calls": [make(action, PARAMS[action]) for action in REPEATABLE],
        "concurrency": budget.concurrency,
        "seconds": budget.conc_seconds,
        "warmup_seconds": budget.conc_warmup,
        "timeout": TIMEOUT,
    }
    if client != SDK:
        command["targets"] = [targets[client]]
    return command


def _section(
    budget: Budget,
    latency: dict[tuple[str, str], list[tuple[float, float]]],
    throughput: dict[str, list[float]],
    outcomes: dict[str, Counter[str]],
    cpu: dict[tuple[str, str], list[float]],
) -> Section:
    def rounds(client: str, action: str, which: int) -> list[float]:
        return [pair[which] for pair in latency[client, action]]

    def vs_sdk(client: str, action: str, which: int) -> float:
        return paired(rounds(client, action, which), rounds(SDK, action, which))

    rows = []
    p50_ratios: dict[str, float] = {}
    for action in ACTIONS:
        p50_ratios[action] = vs_sdk(FACADE, action, 0)
        absolute = {client: [fmt(median(rounds(client, action, w))) for w in (0, 1)] for client in CLIENTS}
        rows.append([
            f"`{action}`",
            " / ".join(absolute[SDK]),
            " / ".join(absolute[FACADE]),
            f"**{fmt_ratio(p50_ratios[action])}** / {fmt_ratio(vs_sdk(FACADE, action, 1))}",
            " / ".join(fmt_ratio(vs_sdk(FACADE_ASYNCIO, action, which)) for which in (0, 1)),
        ])  # fmt: skip
    sequential = table(SEQ_HEADER, rows)

    rates = {client: median(throughput[client]) for client in CLIENTS}
    rate_ratios = {client: paired(throughput[client], throughput[SDK]) for client in CLIENTS}
    in_flight = table(
        ["client", f"calls/s at {budget.concurrency} in flight", "÷ SDK", "per round"],
        [
            [client, fmt(rates[client], 0), fmt_ratio(rate_ratios[client]),
             ", ".join(fmt(v, 0) for v in throughput[client])]
            for client in CLIENTS
        ],
    )  # fmt: skip

    per_call = {key: median(values) for key, values in cpu.items()}
    cpu_table = table(
        ["client", "client process µs/call", "facade process µs/call", "emulator µs/call"],
        [
            [client, *(fmt(per_call[client, role], 0) if (client, role) in per_call else "—"
                       for role in ("client", "facade", "emulator"))]
            for client in CLIENTS
        ],
    )  # fmt: skip

    unexpected = {
        client: dict(bad) for client, counts in outcomes.items() if (bad := +Counter({**counts, "OK": 0}))
    }
    worst_action = max(p50_ratios, key=lambda a: -math.inf if math.isnan(p50_ratios[a]) else p50_ratios[a])
    worst = p50_ratios[worst_action]
    within_goal = sum(1 for r in p50_ratios.values() if r <= P50_GOAL)
    goals = [
        Goal(
            f"Overhead bar: facade p50 ≤ {P50_BAR}x SDK p50, every RPC",
            worst <= P50_BAR,
            f"worst {fmt_ratio(worst, 3)} (`{worst_action}`); all: "
            + ", ".join(fmt_ratio(r, 3) for r in p50_ratios.values()),
        ),
        Goal(
            f"Overhead goal: facade p50 ≤ {P50_GOAL}x SDK p50, every RPC",
            worst <= P50_GOAL,
            f"{within_goal} of {len(ACTIONS)} RPCs within; worst {fmt_ratio(worst, 3)} (`{worst_action}`)",
        ),
        Goal(
            f"Throughput bar: facade ≥ {THROUGHPUT_BAR}x SDK at {budget.concurrency} in flight",
            rate_ratios[FACADE] >= THROUGHPUT_BAR,
            f"{fmt_ratio(rate_ratios[FACADE], 3)} ({fmt(rates[FACADE], 0)} vs {fmt(rates[SDK], 0)} calls/s)",
        ),
    ]
    asyncio_p50 = median(paired(rounds(FACADE_ASYNCIO, a, 0), rounds(FACADE, a, 0)) for a in ACTIONS)
    body = f"""\
Same emulator for both clients (its rate limit and the facade's `TIW_RATE_LIMIT` at {UNLIMITED}, so
the limiter never waits). Sequential: {budget.seq_calls} calls per RPC per round after {budget.seq_warmup}
warm-up calls, {budget.rounds} rounds; within a round the clients take turns on each RPC (their order
rotates). Absolute figures are medians of the rounds' p50 (p99); ratios are medians of the rounds'
ratios. `StopWhiteboardPush` stops a fresh push task on every call, on both sides (tasks added
through the emulator's admin endpoint before each batch), so both take the success path.

{sequential}

With {budget.concurrency} in flight for {budget.conc_seconds:g} s per round (after {budget.conc_warmup:g} s
warm-up), rotating over the four repeatable RPCs (all but `StopWhiteboardPush`). Facade: one
grpc.aio channel, {budget.concurrency} tasks. SDK: {budget.concurrency} threads, each with its own
`TiwClient`, so its own `requests` connection pool (one shared session would open new connections
past 10).

{in_flight}

CPU time per call while {budget.concurrency} are in flight (user + system, all threads, from `/proc`,
warm-up included; medians of the rounds). The SDK's process does everything the facade does (sign,
send, parse) plus the caller's own work; on the facade path that work is split between the
caller's gRPC client and the facade.

{cpu_table}

{_bounds(budget, per_call, rates)}

The facade on the stock asyncio loop instead of uvloop (same code, `python -m bench.roles facade
--loop asyncio`): sequential p50 {fmt_ratio(asyncio_p50)} the uvloop facade's (median over RPCs),
{fmt_ratio(paired(throughput[FACADE_ASYNCIO], throughput[FACADE]))} its calls/s in flight.
"""
    if unexpected:
        body += f"\nOutcomes other than OK (there should be none): {unexpected}\n"
    return Section(
        "Overhead: facade vs the official SDK",
        body,
        goals,
        notes={"worst_p50_ratio": worst, "throughput_ratio": rate_ratios[FACADE]},
    )


def _bounds(budget: Budget, per_call: dict[tuple[str, str], float], rates: dict[str, float]) -> str:
    """What the CPU figures say about the in-flight throughput on this machine."""
    sdk = per_call.get((SDK, "client"), math.nan)
    facade = per_call.get((FACADE, "facade"), math.nan)
    path = sum(per_call.get((FACADE, role), math.nan) for role in ("client", "facade", "emulator"))
    cores = os.cpu_count() or 1
    target = THROUGHPUT_BAR * rates[SDK]
    return f"""\
What bounds these figures: the SDK's {budget.concurrency} threads share one GIL, and at {fmt(sdk, 0)} µs of
CPU per call one core allows ~{fmt(1e6 / sdk, 0)} calls/s. The facade serves from one event loop, and at
{fmt(facade, 0)} µs per call one core allows ~{fmt(1e6 / facade, 0)} calls/s; but the caller, the facade
and the emulator share {cores} cores, {fmt(path, 0)} µs of CPU per call in all, so at most
~{fmt(cores * 1e6 / path, 0)} calls/s even with perfect overlap. {THROUGHPUT_BAR:g}x the SDK here
({fmt(target, 0)} calls/s) needs the whole path below {fmt(cores * 1e6 / target, 0)} µs per call and
the facade's own part below {fmt(1e6 / target, 0)} µs."""
