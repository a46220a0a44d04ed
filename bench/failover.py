"""Failover: the quota invariant, the refusals and a keyed create through a Redis Sentinel failover.

A Redis primary, one replica and three sentinels (``redis-server`` and ``redis-server --sentinel``,
quorum 2, ``down-after-milliseconds`` 1000, ``failover-timeout`` 5000), three facades that find the
master through the sentinels (``TIW_REDIS_SENTINELS``, ``TIW_REDIS_SENTINEL_MASTER``, no
``TIW_REDIS_URL``; ``TIW_EXPECTED_REPLICAS=3``), the emulator at its strict default (20 arrivals per
action in any 1 s). Each role is its own process.

1. A ``CreateSnapshotTask`` with an ``idempotency-key``, once, before the load.
2. An open loop of ``DescribeSnapshotTask``, 5x the limit, each call for a task of its own (created
   beforehand through ``POST /_emulator/tasks``) and with ``tiw-max-age-ms: 0``: neither the
   answer cache nor a coalesced request can answer it, every admitted call is one arrival at TIW.
3. ``failover_before`` s into the load, SIGKILL to the primary. The sentinels are polled until a
   majority names the replica; then the keyed create is retried, on another facade, while the load
   goes on for the rest of ``failover_after`` s.

The emulator's counters are sampled every ``SAMPLE_EVERY`` s (arrivals over time) and read once the
load is over (the most accepted arrivals in any 1 s window, throttles, creates).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from redis import Redis

from bench.calls import CREATE_SNAPSHOT_TASK, DESCRIBE_SNAPSHOT_TASK, PARAMS
from bench.common import Budget, Goal, Section, grpc_call, table
from bench.procs import (
    HOST,
    BenchError,
    Proc,
    Processes,
    TaskAdmin,
    Worker,
    facade_environment,
    free_port,
    get_text,
)
from bench.quota import sleep_until
from bench.stats import parse_prometheus

LIMIT = 20
OFFERED = 100  # DescribeSnapshotTask calls per second: 5x the limit
DEADLINE = 3.0
REPLICAS = 3
MASTER = "tiw-bench"
SENTINELS = 3
QUORUM = 2
# The sentinels of tests/support/redis_failover.py: quick detection for a test machine (production
# runs down-after 5000, failover-timeout 60000: docs/redis.md).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
SAMPLE_EVERY = 0.05  # seconds between two readings of the emulator's counters
KEYED_RETRY_FOR = 15.0  # a refused keyed create is tried again for this long
IDEMPOTENCY_KEY = "bench-failover-order-1"
REFUSED = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})
LATE = "DEADLINE_EXCEEDED"
# The bar for the longest stretch without a served call. What the facades need of the failover:
# the sentinels call the primary down after DOWN_AFTER_MS (1 s), agree (quorum 2) and elect a leader,
# which promotes the replica, in a second or two more (a failover that stalls is abandoned after
# FAILOVER_TIMEOUT_MS, 5 s); a facade then finds the new master through the sentinels at its next
# connection and keeps to both Redis and its share for its hold-off (probe 0.25 s + time-out 0.25 s
# + 0.5 s). 1 + 5 + 1 s, with one more 1 s window of quarantine and some margin: 10 s, the bar of
# tests/test_redis_failover.py. The facades should do much better: while Redis refuses connections
# each is DEGRADED at once and, after one window, admits its share (limit / 3) without Redis.
STRETCH_GOAL = 10.0

HEADER = ("second from the kill", "arrivals at TIW", "utilization", "served / refused / late")


@dataclasses.dataclass
class Topology:
    """The Sentinel-watched pair: where each server listens, and the sentinels' view of it."""

    primary: Proc
    primary_port: int
    replica: Proc
    replica_port: int
    sentinel_ports: list[int]

    @property
    def addresses(self) -> str:
        """For TIW_REDIS_SENTINELS."""
        return ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)

    def formed(self) -> bool:
        """Every sentinel sees the replica and the other sentinels, and the replica is in sync: only
        then can a crash of the primary be repaired (a known replica, a quorum to elect a leader)."""
        with Redis(host=HOST, port=self.replica_port, socket_timeout=1.0) as client:
            if client.info("replication").get("master_link_status") != "up":
                return False
        for port in self.sentinel_ports:
            with Redis(host=HOST, port=port, socket_timeout=1.0) as client:
                replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER)
                peers = client.execute_command("SENTINEL", "SENTINELS", MASTER)
            if len(replicas) != 1 or len(peers) != len(self.sentinel_ports) - 1:
                return False
        return True

    def master_port(self) -> int | None:
        """The master's port as a majority of the sentinels name it (None: no majority)."""
        named: list[int] = []
        for port in self.sentinel_ports:
            try:
                with Redis(host=HOST, port=port, socket_timeout=0.5) as client:
                    _, master = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                named.append(int(master))
            except Exception:  # a sentinel that does not answer names nobody
                continue
        for candidate in set(named):
            if named.count(candidate) * 2 > len(self.sentinel_ports):
                return candidate
        return None


def start_topology(procs: Processes, timeout: float = 30.0) -> Topology:
    primary, primary_url = procs.redis()
    primary_port = _port(primary_url)
    replica, replica_url = procs.redis(replica_of=primary_port)
    sentinel_ports = [
        procs.sentinel(
            MASTER,
            primary_port,
            quorum=QUORUM,
            down_after_ms=DOWN_AFTER_MS,
            failover_timeout_ms=FAILOVER_TIMEOUT_MS,
        )[1]
        for _ in range(SENTINELS)
    ]
    topology = Topology(primary, primary_port, replica, _port(replica_url), sentinel_ports)
    deadline = time.monotonic() + timeout
    while not topology.formed():
        if time.monotonic() > deadline:
            raise BenchError(f"the sentinels did not find the replica and each other within {timeout:.0f}s")
        time.sleep(0.1)
    return topology


def _port(redis_url: str) -> int:
    return int(redis_url.rsplit(":", 1)[1].split("/", 1)[0])


@dataclasses.dataclass
class Measured:
    records: list[list[Any]]  # the load generator's: [kind, started, latency ms, code]
    begin: float
    end: float  # of the load (its last scheduled call)
    warmup: float
    killed: float
    promoted: float | None  # when a majority of the sentinels first named the replica (None: never)
    samples: list[tuple[float, int]]  # (time, DescribeSnapshotTask arrivals accepted so far)
    stats: dict[str, dict[str, int]]  # the emulator's, once every call was answered
    first: dict[str, Any]  # the keyed create before the kill: the worker's answer
    retry: dict[str, Any]  # and its retry after the failover
    created_before: int  # CreateSnapshotTask's tasks_created at the emulator before the kill
    metrics: list[str]  # each facade's /metrics page at the end


def run(procs: Processes, budget: Budget) -> Section:
    with procs.scope():
        measured = _measure(procs, budget)
    return _report(measured, budget)


@dataclasses.dataclass
class Fleet:
    emulator: Proc
    admin: TaskAdmin
    topology: Topology
    targets: list[str]  # the facades' gRPC addresses
    metrics_urls: list[str]
    load: Worker  # the open loop
    keyed: Worker  # the keyed creates


def start_fleet(procs: Processes) -> Fleet:
    emulator, url = procs.emulator(rate_limit=LIMIT)
    topology = start_topology(procs)
    environment = {
        "TIW_REDIS_SENTINELS": topology.addresses,
        "TIW_REDIS_SENTINEL_MASTER": MASTER,
        "TIW_EXPECTED_REPLICAS": str(REPLICAS),
        "TIW_RATE_LIMIT": str(LIMIT),
        # docs/redis.md's setting for Sentinel with one replica: a key's claim reaches the replica
        # before the create is sent, so the failover cannot lose the record whatever its timing.
        "TIW_IDEMPOTENCY_REPLICAS": "1",
    }
    targets, metrics_urls = [], []
    for _ in range(REPLICAS):
        grpc_port, http_port = free_port(), free_port()
        procs.facade(facade_environment(url, grpc_port, http_port, **environment))
        targets.append(f"{HOST}:{grpc_port}")
        metrics_urls.append(f"http://{HOST}:{http_port}/metrics")
    load = procs.worker("load-failover", "grpc")
    keyed = procs.worker("keyed-failover", "grpc")
    return Fleet(emulator, TaskAdmin(url), topology, targets, metrics_urls, load, keyed)


class Asked:
    """A worker's request, made on a thread of its own: the orchestrator goes on meanwhile."""

    def __init__(self, worker: Worker, request: dict[str, Any], timeout: float) -> None:
        self.worker = worker
        self.answer: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._ask, args=(request, timeout), daemon=True)
        self._thread.start()

    def _ask(self, request: dict[str, Any], timeout: float) -> None:
        self.answer = self.worker.request(request, timeout=timeout)

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> dict[str, Any]:
        self._thread.join()
        if self.answer is None:
            raise BenchError(f"{self.worker.name} did not answer; see {self.worker.log}")
        return self.answer


def _measure(procs: Processes, budget: Budget) -> Measured:
    fleet = start_fleet(procs)
    admin = fleet.admin
    seconds = budget.failover_before + budget.failover_after
    admin.reset()
    app = PARAMS[DESCRIBE_SNAPSHOT_TASK]["SdkAppId"]
    task_ids = admin.add_tasks([{"Kind": "snapshot", "SdkAppId": app}] * math.ceil(seconds * OFFERED))

    create = {
        **grpc_call(CREATE_SNAPSHOT_TASK, PARAMS[CREATE_SNAPSHOT_TASK], fresh=False),
        "metadata": [["idempotency-key", IDEMPOTENCY_KEY]],
    }
    keyed = {"op": "call", "call": create, "timeout": 5.0, "retry_for": KEYED_RETRY_FOR}
    first = fleet.keyed.request({**keyed, "target": fleet.targets[0]}, timeout=KEYED_RETRY_FOR + 10)
    if first["code"] != "OK":
        raise BenchError(f"the keyed create before the failover failed: {first}")
    created_before = admin.stats()[CREATE_SNAPSHOT_TASK]["tasks_created"]

    describe = {
        **grpc_call(DESCRIBE_SNAPSHOT_TASK, PARAMS[DESCRIBE_SNAPSHOT_TASK]),
        "each": [{"SdkAppId": app, "TaskID": task_id} for task_id in task_ids],
    }
    begin = time.monotonic() + 0.5
    command = {
        "op": "open",
        "begin": begin,
        "targets": fleet.targets,
        "calls": [describe],
        "rate": OFFERED,
        "seconds": seconds,
        "timeout": DEADLINE,
    }
    driver = Asked(fleet.load, command, seconds + DEADLINE + 60)
    retry: Asked | None = None
    samples: list[tuple[float, int]] = []
    killed = math.nan
    promoted: float | None = None
    kill_at = begin + budget.failover_before
    topology = fleet.topology
    while driver.running():
        now = time.monotonic()
        if math.isnan(killed) and now >= kill_at:
            procs.kill(topology.primary)
            killed = time.monotonic()
        if not math.isnan(killed) and promoted is None and topology.master_port() == topology.replica_port:
            promoted = time.monotonic()
            retry = Asked(fleet.keyed, {**keyed, "target": fleet.targets[2]}, KEYED_RETRY_FOR + 10)
        samples.append(_accepted(admin))
        sleep_until(now + SAMPLE_EVERY)
    load = driver.result()
    if retry is None:  # never promoted: the retry all the same, to report what it gets
        retry = Asked(fleet.keyed, {**keyed, "target": fleet.targets[2]}, KEYED_RETRY_FOR + 10)
    retried = retry.result()
    sleep_until(time.monotonic() + 1.1)  # every token back: nothing else will arrive
    samples.append(_accepted(admin))
    if not fleet.emulator.alive():
        raise fleet.emulator.fail("exited during the failover")
    return Measured(
        records=load["records"],
        begin=begin,
        end=begin + seconds,
        warmup=budget.quota_warmup,
        killed=killed,
        promoted=promoted,
        samples=samples,
        stats=admin.stats(),
        first=first,
        retry=retried,
        created_before=created_before,
        metrics=[get_text(u) for u in fleet.metrics_urls],
    )


def _accepted(admin: TaskAdmin) -> tuple[float, int]:
    """(when, DescribeSnapshotTask arrivals the emulator has accepted so far)."""
    before = time.monotonic()
    accepted = admin.stats()[DESCRIBE_SNAPSHOT_TASK]["accepted"]
    return (before + time.monotonic()) / 2, accepted


def arrivals_at(samples: Sequence[tuple[float, int]], when: float) -> float:
    """Accepted arrivals by ``when``, interpolated between the two readings around it."""
    if when <= samples[0][0]:
        return float(samples[0][1])
    for (t0, a0), (t1, a1) in itertools.pairwise(samples):
        if t0 <= when <= t1:
            return a0 + (a1 - a0) * ((when - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return float(samples[-1][1])


def utilization(samples: Sequence[tuple[float, int]], start: float, end: float) -> float:
    if end <= start:
        return math.nan
    return (arrivals_at(samples, end) - arrivals_at(samples, start)) / (LIMIT * (end - start))


def longest_stretch(
    records: Sequence[Sequence[Any]], start: float, end: float
) -> tuple[float, float, Counter[str]]:
    """The longest time between two served calls (the load's start and end count as served): its
    start, its end, and the outcomes of the calls answered inside it."""
    answered = sorted((r[1] + r[2] / 1000, str(r[3])) for r in records)
    served = [at for at, code in answered if code == "OK"]
    moments = [start, *served, max(end, answered[-1][0] if answered else end)]
    a, b = max(itertools.pairwise(moments), key=lambda pair: pair[1] - pair[0])
    return a, b, Counter(code for at, code in answered if a < at < b)


def _outcomes(codes: Counter[str]) -> str:
    other = {k: v for k, v in codes.items() if k != "OK" and k not in REFUSED and k != LATE}
    text = f"{codes['OK']} / {sum(codes[c] for c in REFUSED)} / {codes[LATE]}"
    return text + (f" / other {other}" if other else "")


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1%}"


def _metric(pages: Sequence[str], name: str) -> float:
    return sum(value for text in pages for _, value in parse_prometheus(text, name))


def _report(m: Measured, budget: Budget) -> Section:
    kill = m.killed
    promoted = m.promoted
    a, b, inside = longest_stretch(m.records, m.begin, m.end)
    stretch = b - a
    phases = {
        "before": (m.begin + m.warmup, kill),
        "during": (kill, promoted if promoted is not None else m.end),
        "after": (promoted, m.end) if promoted is not None else (m.end, m.end),
    }
    shares = {name: utilization(m.samples, *span) for name, span in phases.items()}
    rows = []
    answered = [(r[1] + r[2] / 1000, str(r[3])) for r in m.records]
    first_second = -math.floor(kill - m.begin - m.warmup)
    for second in range(first_second, math.floor(m.end - kill)):
        start = kill + second
        count = arrivals_at(m.samples, start + 1) - arrivals_at(m.samples, start)
        codes = Counter(code for at, code in answered if start <= at < start + 1)
        rows.append(
            [
                f"{second:+d} to {second + 1:+d}",
                f"{count:.0f}",
                f"{count / LIMIT:.0%}",
                _outcomes(codes),
            ]
        )
    worst = max(stats["max_in_window"] for stats in m.stats.values())
    throttled = sum(stats["throttled"] for stats in m.stats.values())
    describe = m.stats[DESCRIBE_SNAPSHOT_TASK]
    created = m.stats[CREATE_SNAPSHOT_TASK]["tasks_created"]
    first_id = (m.first.get("answer") or {}).get("TaskID")
    retry_id = (m.retry.get("answer") or {}).get("TaskID")
    keyed_ok = m.retry["code"] == "OK" and first_id is not None and retry_id == first_id and created == 1
    retry_at = m.retry["at"] - kill
    all_codes = Counter(str(r[3]) for r in m.records)
    promoted_text = f"kill {promoted - kill:+.2f} s" if promoted is not None else "never"

    goals = [
        Goal(
            f"Failover: ≤ {LIMIT} arrivals per action in any 1 s, zero throttles",
            worst <= LIMIT and throttled == 0,
            f"max {worst} accepted, {throttled} throttled (whole run)",
        ),
        Goal(
            f"Failover: longest stretch without a served call ≤ {STRETCH_GOAL:g} s",
            promoted is not None and stretch <= STRETCH_GOAL,
            f"{stretch:.2f} s (kill {a - kill:+.2f} to {b - kill:+.2f} s; answered inside: "
            f"{sum(inside[c] for c in REFUSED)} refused, {inside[LATE]} late, {inside['OK']} served); "
            f"replica promoted at {promoted_text}",
        ),
        Goal(
            "Failover: a keyed create retried after the failover answers the first TaskID, 1 create",
            keyed_ok,
            f"{'same' if retry_id == first_id else 'different'} TaskID "
            f"(`{first_id}` then `{retry_id}`, retry answered at kill {retry_at:+.2f} s after "
            f"{len(m.retry['tries'])} tries); created at TIW: {m.created_before} before the kill, "
            f"{created} in all",
        ),
    ]
    utilization_rows = [
        [name, f"{span[0] - kill:+.2f} to {span[1] - kill:+.2f} s", f"**{_percent(shares[name])}**"]
        for name, span in phases.items()
    ]
    body = f"""\
A Redis primary, one replica and {SENTINELS} sentinels (quorum {QUORUM}, `down-after-milliseconds`
{DOWN_AFTER_MS}, `failover-timeout` {FAILOVER_TIMEOUT_MS}), each its own `redis-server` process;
{REPLICAS} facades with `TIW_REDIS_SENTINELS` (no `TIW_REDIS_URL`), `TIW_EXPECTED_REPLICAS={REPLICAS}`,
`TIW_RATE_LIMIT={LIMIT}` and `TIW_IDEMPOTENCY_REPLICAS=1` (docs/redis.md, for Sentinel with one
replica); the emulator at its strict default ({LIMIT} per action in any 1 s). An open loop offers
{OFFERED} `DescribeSnapshotTask` calls/s ({OFFERED // LIMIT}x the limit) for
{budget.failover_before + budget.failover_after:g} s over the facades in turn, each for a task of its own
with `tiw-max-age-ms: 0` (neither the cache nor a coalesced request answers it) and a {DEADLINE:g} s
deadline. {budget.failover_before:g} s in, the primary gets SIGKILL. A `CreateSnapshotTask` with an
`idempotency-key`, made before the load on the first facade, is retried on the third once a majority
of the sentinels names the replica (retried while refused, for up to {KEYED_RETRY_FOR:g} s).

- **longest stretch without a served call**: between two consecutive answers OK (by the time the
  caller got them; the load's start and end count as such), whole run; the calls answered inside it
  were refused (`RESOURCE_EXHAUSTED`/`UNAVAILABLE`) or late (`DEADLINE_EXCEEDED`). The bar,
  {STRETCH_GOAL:g} s: down-after ({DOWN_AFTER_MS / 1000:g} s) + a failover that may take up to its time-out
  ({FAILOVER_TIMEOUT_MS / 1000:g} s) + the facade's hold-off on the new master (1 s) + a 1 s window of
  quarantine, with a margin; the same bar as `tests/test_redis_failover.py`.
- **utilization**: arrivals the emulator accepted (its counters, read every {SAMPLE_EVERY:g} s and
  interpolated) ÷ ({LIMIT} x the seconds): **before** from {m.warmup:g} s into the load to the kill,
  **during** from the kill to when a majority of the sentinels first named the replica, **after**
  from then to the end of the load.
- **max/1 s** and **throttled**: the emulator's own count, every action, whole run (a throttled
  arrival is not accepted, so with 0 throttled the maximum covers every arrival).

Replica promoted (a majority of the sentinels names it) at {promoted_text}. Calls offered
{len(m.records)}: served / refused / late {_outcomes(all_codes)}. `DescribeSnapshotTask` at the
emulator: {describe["accepted"]} accepted, max {describe["max_in_window"]} in any 1 s,
{describe["throttled"]} throttled. From the facades' /metrics, whole run: Redis errors of the
limiter (`tiw_limiter_backend_errors_total`) {_metric(m.metrics, "tiw_limiter_backend_errors_total"):.0f},
of the other roles (`tiw_store_errors_total`) {_metric(m.metrics, "tiw_store_errors_total"):.0f};
idempotency records found lost (`tiw_idempotency_records_lost_total`)
{_metric(m.metrics, "tiw_idempotency_records_lost_total"):.0f}.

{table(("phase", "from the kill", "utilization"), utilization_rows)}

Per second around the kill: arrivals from the emulator's counters (interpolated, so ±1); the calls
by the second their answer came in.

{table(HEADER, rows)}
"""
    return Section("Failover: a Sentinel failover under 5x overload", body, goals)
