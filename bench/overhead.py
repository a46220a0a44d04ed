"""Overhead: each RPC through the facade vs the same call made with Tencent's official Python SDK.

Both clients call the same emulator (rate limit raised far above the load, as is the facade's, so
the limiter never waits), and every call is one request to TIW: each Describe call asks about a task
of its own, each ``StopWhiteboardPush`` stops one of its own (``bench/mirror.py``), so the facade's
cache and its shared requests never answer one, and the emulator's counters are checked to say so.
Sequential: ``seq_calls`` calls per RPC per round, one at a time, after a warm-up; the same client
process as the facade's also calls a bare grpc.aio echo server (``bench.roles echo``), the physical
floor of one gRPC hop that the facade's added latency (facade - SDK) is compared with. In flight:
32 callers for ``conc_seconds`` (facade: a grpc.aio client with 32 tasks; SDK: 32 threads, each
with its own client and connection pool), rotating over the four repeatable RPCs. Rounds interleave
the clients (their order rotates); figures are medians over rounds.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from bench import local
from bench.calls import ACTIONS, DESCRIBE_WHITEBOARD_PUSH, KINDS, PARAMS, REPEATABLE
from bench.common import Budget, Goal, Section, fmt, fmt_ratio, grpc_call, rotated, sdk_call, table
from bench.mirror import arrived_between, goal, one_arrival_each, per_call
from bench.procs import HOST, Proc, Processes, TaskAdmin, Worker, facade_environment, free_port
from bench.stats import median, paired, percentile, ratio

UNLIMITED = 100_000
SEQ_HEADER = (
    "RPC",
    "SDK p50 / p99 ms",
    "facade p50 / p99 ms",
    "facade ÷ SDK p50 / p99",
    "added (facade - SDK) p50 / p99 ms",
    "added ÷ bare hop p50 / p99",
    "facade on asyncio ÷ SDK",
)
SDK = "SDK"
FACADE = "facade"
FACADE_ASYNCIO = "facade, asyncio loop"
CLIENTS = (SDK, FACADE, FACADE_ASYNCIO)
ECHO = "bare grpc.aio echo"  # takes its turn in the sequential rounds beside the clients
TIMEOUT = 5.0
P50_BAR, P50_GOAL, THROUGHPUT_BAR = 1.25, 1.0, 2.0
HOP_GOAL = 1.2  # the facade's added latency, at most this many bare grpc.aio hops
P50, P99 = 0, 1  # which of a round's (p50, p99)
# In flight the callers call again as soon as they can, so the calls a round makes (and the tasks
# it needs) are known only once one has run: a client's first round has tasks for this many calls/s
# (well above any on 2 cores), its next ones CONC_HEADROOM x the most it made in one round.
CONC_CEILING = 1500
CONC_HEADROOM = 1.5


@dataclasses.dataclass
class Tally:
    """What one part (sequential, in flight) claims of TIW's arrivals: each call one request to TIW."""

    calls: int = 0
    arrivals: int = 0
    batches: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def add(self, label: str, calls: Mapping[str, int], arrived: Mapping[str, int]) -> None:
        """One batch of calls (``label``), per action, and the arrivals the emulator counted meanwhile."""
        self.batches += 1
        self.calls += sum(calls.values())
        self.arrivals += sum(arrived.values())
        self.problems += [f"{label}: {problem}" for problem in one_arrival_each(calls, arrived)]

    def goal(self, name: str) -> Goal:
        return goal(
            name, self.problems, f"{self.calls} calls, {self.arrivals} arrivals, in {self.batches} batches"
        )


@dataclasses.dataclass
class Measured:
    """What ``measure`` gathered. latency: (client or ECHO, action) -> one (p50, p99) per round;
    throughput: client -> calls/s in flight, per round; outcomes: client -> outcomes seen; cpu:
    (client, role) -> CPU µs per call in flight, per round."""

    clients: tuple[str, ...]
    latency: dict[tuple[str, str], list[tuple[float, float]]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    throughput: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    outcomes: dict[str, Counter[str]] = dataclasses.field(default_factory=lambda: defaultdict(Counter))
    cpu: dict[tuple[str, str], list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    sequential: Tally = dataclasses.field(default_factory=Tally)
    in_flight: Tally = dataclasses.field(default_factory=Tally)
    tasks: int = 0  # created at the emulator for the calls


def run(procs: Processes, budget: Budget) -> Section:
    with procs.scope():
        return _section(budget, measure(procs, budget))


def measure(procs: Processes, budget: Budget, clients: Sequence[str] = CLIENTS) -> Measured:
    """Every round of ``clients`` (``SDK`` among them: it is the baseline) and the echo."""
    emulator, url = procs.emulator(rate_limit=UNLIMITED)
    setup = _Setup(emulator, TaskAdmin(url))
    for client, loop in ((FACADE, "uvloop"), (FACADE_ASYNCIO, "asyncio")):
        if client not in clients:
            continue
        grpc_port = free_port()
        env = facade_environment(url, grpc_port, free_port(), TIW_RATE_LIMIT=str(UNLIMITED))
        setup.servers[client] = procs.facade(env, loop=loop)
        setup.targets[client] = f"{HOST}:{grpc_port}"
    setup.echo, setup.targets[ECHO] = procs.echo()
    setup.workers[FACADE] = procs.worker("load-grpc", "grpc")
    setup.workers[SDK] = procs.worker("load-sdk", "sdk", url.removeprefix("http://"))

    m = Measured(tuple(clients))
    for turn in range(budget.rounds):
        for index, action in enumerate(ACTIONS):
            for path in rotated([*clients, ECHO], turn + index):
                _sequential(setup, budget, m, path, action, label=f"{path}, round {turn + 1}")
        for client in rotated(clients, turn):
            _in_flight(setup, budget, m, client, f"{client}, round {turn + 1}")
        _echo_in_flight(setup, budget, m)
    m.tasks = setup.admin.created
    return m


@dataclasses.dataclass
class _Setup:
    emulator: Proc
    admin: TaskAdmin
    echo: Proc | None = None
    servers: dict[str, Proc] = dataclasses.field(default_factory=dict)  # the facades, by client
    targets: dict[str, str] = dataclasses.field(default_factory=dict)  # gRPC targets (and the echo's)
    workers: dict[str, Worker] = dataclasses.field(default_factory=dict)  # SDK, and FACADE: every gRPC
    most: dict[str, int] = dataclasses.field(default_factory=dict)  # the most calls a round in flight made

    def worker(self, path: str) -> Worker:
        return self.workers[SDK if path == SDK else FACADE]


def _sequential(setup: _Setup, budget: Budget, m: Measured, path: str, action: str, *, label: str) -> None:
    """One batch: ``path`` (a client or the echo) calls ``action`` one call at a time."""
    admin = setup.admin
    count = budget.seq_warmup + budget.seq_calls
    expected: dict[str, int] = {}  # the echo: no request to TIW at all
    params: list[dict[str, Any]] = [PARAMS[DESCRIBE_WHITEBOARD_PUSH]]  # the echo's (local.ECHO_CALL)
    if path != ECHO:
        admin.reset()  # the tasks of earlier batches go: the emulator stays small
        params = per_call(admin, action, count)
        expected = {action: count}
    before = admin.stats()
    command = _seq_command(path, action, params, budget, setup.targets)
    result = setup.worker(path).request(command, timeout=30 + count * 0.1)
    m.sequential.add(label, expected, arrived_between(before, admin.stats()))
    samples = result["latencies_ms"]
    m.latency[path, action].append((percentile(samples, 50), percentile(samples, 99)))
    m.outcomes[path].update(result["codes"])


def _in_flight(setup: _Setup, budget: Budget, m: Measured, client: str, label: str) -> None:
    """One round of ``client`` with ``budget.concurrency`` calls in flight."""
    admin = setup.admin
    admin.reset()
    calls = _conc_calls(budget, setup.most.get(client))
    each = math.ceil(calls / len(REPEATABLE)) + budget.concurrency  # the turns are even, ±1 each
    requests = {action: per_call(admin, action, each if action in KINDS else 1) for action in REPEATABLE}
    command = _conc_command(client, budget, setup.targets, requests)
    worker = setup.worker(client)
    roles: dict[str, Proc] = {"client": worker, "emulator": setup.emulator}
    if client != SDK:
        roles["facade"] = setup.servers[client]
    stats = admin.stats()
    cpu = {role: proc.cpu_seconds() for role, proc in roles.items()}
    result = worker.request(command, timeout=60 + budget.conc_seconds * 2)
    for role, proc in roles.items():
        m.cpu[client, role].append((proc.cpu_seconds() - cpu[role]) / result["calls_total"] * 1e6)
    made = dict(zip(REPEATABLE, result["per_call"], strict=True))
    m.in_flight.add(label, made, arrived_between(stats, admin.stats()))
    if result["reused"]:
        m.in_flight.problems.append(
            f"{label}: {result['reused']} calls asked about a task again (tasks for {calls} calls, "
            f"{result['calls_total']} made)"
        )
    setup.most[client] = max(setup.most.get(client, 0), result["calls_total"])
    m.throughput[client].append(result["per_second"])
    m.outcomes[client].update(result["codes"])


def _echo_in_flight(setup: _Setup, budget: Budget, m: Measured) -> None:
    """The bare echo server with as many in flight from the facade's client process: the CPU a
    gRPC hop itself costs each side, beside the facade's."""
    assert setup.echo is not None
    roles: dict[str, Proc] = {"client": setup.workers[FACADE], "facade": setup.echo}
    cpu = {role: proc.cpu_seconds() for role, proc in roles.items()}
    command = local.conc_command(setup.targets[ECHO], local.ECHO_CALL, budget, budget.conc_seconds)
    result = setup.workers[FACADE].request(command, timeout=60 + budget.conc_seconds * 2)
    for role, proc in roles.items():
        m.cpu[ECHO, role].append((proc.cpu_seconds() - cpu[role]) / result["calls_total"] * 1e6)
    m.outcomes[ECHO].update(result["codes"])


def _conc_calls(budget: Budget, most: int | None) -> int:
    """How many calls a round in flight gets tasks for: see ``CONC_CEILING``."""
    if most is None:
        return math.ceil(CONC_CEILING * (budget.conc_warmup + budget.conc_seconds))
    return math.ceil(CONC_HEADROOM * most)


def _seq_command(
    path: str, action: str, params: list[dict[str, Any]], budget: Budget, targets: dict[str, str]
) -> dict[str, Any]:
    """``params``: one TIW request per call (cycled through), all of ``action`` (the echo: its own)."""
    command: dict[str, Any] = {
        "op": "seq",
        "params": params,
        "warmup": budget.seq_warmup,
        "n": budget.seq_calls,
        "timeout": TIMEOUT,
    }
    if path == SDK:
        command["call"] = sdk_call(action, {})
    else:
        command["call"] = local.ECHO_CALL if path == ECHO else grpc_call(action, {})
        command["target"] = targets[path]
    return command


def _conc_command(
    client: str, budget: Budget, targets: dict[str, str], requests: Mapping[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """The four repeatable RPCs in turn; ``requests``: each one's TIW requests, one per call (a
    Describe's, about a task of its own each) or one for every call (``CreateSnapshotTask``)."""
    make = sdk_call if client == SDK else grpc_call
    calls = []
    for action in REPEATABLE:
        call = make(action, requests[action][0])
        if len(requests[action]) > 1:
            call["each"] = requests[action]
        calls.append(call)
    command: dict[str, Any] = {
        "op": "conc",
        "calls": calls,
        "concurrency": budget.concurrency,
        "seconds": budget.conc_seconds,
        "warmup_seconds": budget.conc_warmup,
        "timeout": TIMEOUT,
    }
    if client != SDK:
        command["targets"] = [targets[client]]
    return command


def added_latency(facade: Sequence[float], sdk: Sequence[float], hop: Sequence[float]) -> tuple[float, float]:
    """The facade's added latency (facade - SDK, per round) and its ratio to the bare hop of the same
    round: (median of the rounds' added latency, median of the rounds' ratios)."""
    added = [f - s for f, s in zip(facade, sdk, strict=True)]
    return median(added), median(ratio(a, h) for a, h in zip(added, hop, strict=True))


def _worst(ratios: Mapping[str, float]) -> str:
    """The action with the highest ratio (NaN counts as the highest: a figure missing is a miss)."""
    return max(ratios, key=lambda a: math.inf if math.isnan(ratios[a]) else ratios[a])


def hop_goal(which: str, ratios: Mapping[str, float]) -> Goal:
    """Added latency ÷ bare hop (p50 or p99, per RPC) within ``HOP_GOAL`` for every RPC."""
    worst = _worst(ratios)
    return Goal(
        f"Overhead goal: facade's added latency (facade - SDK {which}) ≤ {HOP_GOAL}x a bare grpc.aio "
        f"hop's {which}, every RPC",
        all(value <= HOP_GOAL for value in ratios.values()),
        f"worst {fmt_ratio(ratios[worst], 3)} (`{worst}`); all: "
        + ", ".join(fmt_ratio(value, 3) for value in ratios.values()),
    )


def _section(budget: Budget, m: Measured) -> Section:
    def rounds(path: str, action: str, which: int) -> list[float]:
        return [pair[which] for pair in m.latency[path, action]]

    def vs_sdk(client: str, action: str, which: int) -> float:
        return paired(rounds(client, action, which), rounds(SDK, action, which))

    rows = []
    p50_ratios: dict[str, float] = {}
    hop_ratios: dict[int, dict[str, float]] = {P50: {}, P99: {}}
    hops: dict[int, list[float]] = {P50: [], P99: []}
    for action in ACTIONS:
        p50_ratios[action] = vs_sdk(FACADE, action, P50)
        absolute = {
            path: [fmt(median(rounds(path, action, w))) for w in (P50, P99)] for path in (SDK, FACADE)
        }
        added: dict[int, float] = {}
        for which in (P50, P99):
            added[which], hop_ratios[which][action] = added_latency(
                rounds(FACADE, action, which), rounds(SDK, action, which), rounds(ECHO, action, which)
            )
            hops[which] += rounds(ECHO, action, which)
        rows.append([
            f"`{action}`",
            " / ".join(absolute[SDK]),
            " / ".join(absolute[FACADE]),
            f"**{fmt_ratio(p50_ratios[action])}** / {fmt_ratio(vs_sdk(FACADE, action, P99))}",
            f"{fmt(added[P50])} / {fmt(added[P99])}",
            f"**{fmt_ratio(hop_ratios[P50][action])}** / **{fmt_ratio(hop_ratios[P99][action])}**",
            " / ".join(fmt_ratio(vs_sdk(FACADE_ASYNCIO, action, which)) for which in (P50, P99))
            if FACADE_ASYNCIO in m.clients else "—",
        ])  # fmt: skip
    sequential = table(SEQ_HEADER, rows)

    clients = m.clients
    rates = {client: median(m.throughput[client]) for client in clients}
    rate_ratios = {client: paired(m.throughput[client], m.throughput[SDK]) for client in clients}
    in_flight = table(
        ["client", f"calls/s at {budget.concurrency} in flight", "÷ SDK", "per round"],
        [
            [client, fmt(rates[client], 0), fmt_ratio(rate_ratios[client]),
             ", ".join(fmt(v, 0) for v in m.throughput[client])]
            for client in clients
        ],
    )  # fmt: skip

    per_call = {key: median(values) for key, values in m.cpu.items()}
    cpu_table = table(
        ["client", "client process µs/call", "facade (echo) process µs/call", "emulator µs/call"],
        [
            [client, *(fmt(per_call[client, role], 0) if (client, role) in per_call else "—"
                       for role in ("client", "facade", "emulator"))]
            for client in (*clients, ECHO)
        ],
    )  # fmt: skip

    unexpected = {
        client: dict(bad) for client, counts in m.outcomes.items() if (bad := +Counter({**counts, "OK": 0}))
    }
    worst_action = max(p50_ratios, key=lambda a: -math.inf if math.isnan(p50_ratios[a]) else p50_ratios[a])
    worst = p50_ratios[worst_action]
    within_goal = sum(1 for r in p50_ratios.values() if r <= P50_GOAL)
    throughput_ratio = rate_ratios.get(FACADE, math.nan)
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
        hop_goal("p50", hop_ratios[P50]),
        hop_goal("p99", hop_ratios[P99]),
        Goal(
            f"Throughput bar: facade ≥ {THROUGHPUT_BAR}x SDK at {budget.concurrency} in flight",
            throughput_ratio >= THROUGHPUT_BAR,
            f"{fmt_ratio(throughput_ratio, 3)} ({fmt(rates.get(FACADE, math.nan), 0)} vs "
            f"{fmt(rates[SDK], 0)} calls/s)",
        ),
        m.sequential.goal("Overhead: each sequential call one request to TIW (no cache, no shared request)"),
        m.in_flight.goal(
            f"Throughput: each call at {budget.concurrency} in flight one request to TIW (no cache, "
            "no shared request)"
        ),
    ]
    asyncio_p50 = median(paired(rounds(FACADE_ASYNCIO, a, P50), rounds(FACADE, a, P50)) for a in ACTIONS)
    body = f"""\
Same emulator for both clients (its rate limit and the facade's `TIW_RATE_LIMIT` at {UNLIMITED}, so
the limiter never waits). Every call is a request to TIW, as it is for the SDK: each Describe call
asks about a task of its own and each `StopWhiteboardPush` stops one of its own (tasks created
through the emulator's control API, `POST /_emulator/tasks`, before each batch; the Describe ones
over from the start, so their answers are final ones, like the documentation's examples), so neither
the facade's answer cache nor a shared request can answer one; the SDK asks about the same kind of
tasks. The emulator's counters are read around every batch and checked: each call one request to
TIW, no more, no fewer ({m.sequential.calls + m.in_flight.calls} calls, {m.tasks} tasks created).

Sequential: {budget.seq_calls} calls per RPC per round after {budget.seq_warmup} warm-up calls,
{budget.rounds} rounds; within a round the clients take turns on each RPC (their order rotates), and
with them the facade's client process calls a bare grpc.aio echo server (`python -m bench.roles
echo`: uvloop, no interceptors) as many times: one gRPC hop on loopback, the floor of what a
facade in between can add. Absolute figures are medians of the rounds' p50 (p99); ratios are
medians of the rounds' ratios. **Added latency**: facade - SDK, the round's p50 (p99) of each;
÷ the bare hop's p50 (p99) in the same round and turn. The goal: at most {HOP_GOAL}x a bare hop, p50
and p99, every RPC; the facade ÷ SDK ratio beside it is the older goal.

{sequential}

The bare grpc.aio echo hop, same client process: p50 {fmt(median(hops[P50]))} ms, p99
{fmt(median(hops[P99]))} ms (medians over every round and turn).

With {budget.concurrency} in flight for {budget.conc_seconds:g} s per round (after {budget.conc_warmup:g} s
warm-up), rotating over the four repeatable RPCs (all but `StopWhiteboardPush`), each Describe call
about a task of its own (a client's first round has tasks for {CONC_CEILING} calls/s, the next ones
for {CONC_HEADROOM:g}x the most one of its rounds made). Facade: one grpc.aio channel,
{budget.concurrency} tasks. SDK: {budget.concurrency} threads, each with its own `TiwClient`, so its
own `requests` connection pool (one shared session would open new connections past 10).

{in_flight}

CPU time per call while {budget.concurrency} are in flight (user + system, all threads, from `/proc`,
warm-up included; medians of the rounds). The SDK's process does everything the facade does (sign,
send, parse) plus the caller's own work; on the facade path that work is split between the
caller's gRPC client and the facade. The last row: the bare echo server with as many in flight
from the facade's client process ({budget.conc_seconds:g} s each round), its server in the facade's
column: the facade's mirror path costs {
        fmt_ratio(ratio(per_call.get((FACADE, "facade"), math.nan), per_call.get((ECHO, "facade"), math.nan)))
    } the bare server's CPU per call.

{cpu_table}

{_bounds(budget, per_call, rates)}
"""
    if FACADE_ASYNCIO in clients:
        body += f"""
The facade on the stock asyncio loop instead of uvloop (same code, `python -m bench.roles facade
--loop asyncio`): sequential p50 {fmt_ratio(asyncio_p50)} the uvloop facade's (median over RPCs),
{fmt_ratio(paired(m.throughput[FACADE_ASYNCIO], m.throughput[FACADE]))} its calls/s in flight.
"""
    if unexpected:
        body += f"\nOutcomes other than OK (there should be none): {unexpected}\n"
    return Section(
        "Overhead: facade vs the official SDK",
        body,
        goals,
        notes={"worst_p50_ratio": worst, "throughput_ratio": throughput_ratio},
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
