"""The benchmark's own logic: what its mirror-path sections send, and the checks of what they claim.

The sections that measure the way to TIW (overhead, throughput, quota, fairness) must send calls
only TIW can answer (a task of its own per Describe call), and each checks the emulator's count of
arrivals against its claim. These tests give those checks synthetic figures, both ones that keep
the claim and ones that break it (the cache answering, requests shared, extra requests), and the
last runs the overhead section's measuring function for real, tiny, against a real emulator and
facade: it fails if any call was answered without a request to TIW.
"""

from __future__ import annotations

import itertools
import math
import tracemalloc
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from bench import answers, callbacks, fairness, heap, local, mirror, overhead, quota
from bench.calls import (
    ACTIONS,
    CREATE_SNAPSHOT_TASK,
    DESCRIBE_SNAPSHOT_TASK,
    DESCRIBE_VIDEO_GENERATION_TASK,
    DESCRIBE_WHITEBOARD_PUSH,
    KINDS,
    PARAMS,
    PUSH_SDK_APP_ID,
    REPEATABLE,
    STOP_WHITEBOARD_PUSH,
)
from bench.common import Budget
from bench.procs import Processes, TaskAdmin
from bench.worker import Supply, variants

DESCRIBES = (DESCRIBE_SNAPSHOT_TASK, DESCRIBE_WHITEBOARD_PUSH, DESCRIBE_VIDEO_GENERATION_TASK)


class FakeAdmin(TaskAdmin):
    """The emulator's control API without an emulator: every task asked for gets a new ID."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:1")
        self.bodies: list[Mapping[str, Any]] = []
        self._ids = itertools.count()

    def add_tasks(self, bodies: Sequence[Mapping[str, Any]]) -> list[str]:
        self.bodies += bodies
        return [f"task-{next(self._ids)}" for _ in bodies]


def stats(**arrived: int) -> dict[str, dict[str, int]]:
    """The emulator's /_emulator/stats ``actions``, with ``arrived`` requests accepted per action."""
    zero = dict.fromkeys(
        ("accepted", "throttled", "rejected", "faulted", "tasks_created", "max_in_window"), 0
    )
    return {action: {**zero, "accepted": arrived.get(action, 0)} for action in ACTIONS}


# --- a task per call ----------------------------------------------------------------------------


@pytest.mark.parametrize("action", DESCRIBES)
def test_each_describe_call_asks_about_a_task_of_its_own_over_from_the_start(action: str) -> None:
    admin = FakeAdmin()
    requests = mirror.per_call(admin, action, 50)
    kind = KINDS[action]
    assert len(requests) == 50
    assert len({request[kind.id_field] for request in requests}) == 50  # no two calls share a task
    assert all(request["SdkAppId"] == PARAMS[action]["SdkAppId"] for request in requests)
    assert set(requests[0]) == set(PARAMS[action])  # the same fields as the documented request
    for body in admin.bodies:  # every state's time zero: the answer is the final one at once
        assert body == {
            "Kind": kind.name,
            "SdkAppId": PARAMS[action]["SdkAppId"],
            **dict.fromkeys(kind.durations, 0),
        }


def test_each_stop_stops_a_push_task_of_its_own_and_a_create_needs_no_task() -> None:
    admin = FakeAdmin()
    stops = mirror.per_call(admin, STOP_WHITEBOARD_PUSH, 5)
    assert len({stop["TaskId"] for stop in stops}) == 5
    assert admin.bodies == [{"Kind": "push", "SdkAppId": PUSH_SDK_APP_ID}] * 5
    creates = mirror.per_call(admin, CREATE_SNAPSHOT_TASK, 4)
    assert creates == [PARAMS[CREATE_SNAPSHOT_TASK]] * 4
    assert len(admin.bodies) == 5  # none more
    with pytest.raises(ValueError):
        mirror.requests_for(DESCRIBE_SNAPSHOT_TASK, ["a", "b"], 3)


def test_the_load_generators_send_each_request_once_and_count_the_ones_sent_again() -> None:
    supply = Supply([3, None])
    assert [supply.take(0) for _ in range(5)] == [0, 1, 2, 0, 1]
    assert [supply.take(1) for _ in range(4)] == [0, 0, 0, 0]  # one request for every call: not reused
    assert supply.made == [5, 4]
    assert supply.reused == 2
    specs: list[dict[str, Any]] = [{"params": {"a": 1}, "each": [{"a": 1}, {"a": 2}]}, {"params": {"b": 1}}]
    assert Supply.of(specs)._sizes == [2, None]
    assert [v["params"] for v in variants(specs[0])] == [{"a": 1}, {"a": 2}]
    assert variants(specs[1]) == [specs[1]]


def test_overhead_in_flight_sends_a_task_per_describe_call_on_both_clients() -> None:
    admin = FakeAdmin()
    budget = Budget.quick()
    requests = {action: mirror.per_call(admin, action, 7 if action in KINDS else 1) for action in REPEATABLE}
    for client in (overhead.SDK, overhead.FACADE):
        command = overhead._conc_command(client, budget, {overhead.FACADE: "127.0.0.1:1"}, requests)
        calls = dict(zip(REPEATABLE, command["calls"], strict=True))
        for action in DESCRIBES:
            assert calls[action]["each"] == requests[action]
        assert "each" not in calls[CREATE_SNAPSHOT_TASK]
        if client == overhead.FACADE:  # and never the cache's (non-final answers at least)
            assert calls[DESCRIBE_SNAPSHOT_TASK]["metadata"] == [["tiw-max-age-ms", "0"]]
    # The first client's first round has tasks for more calls than one on 2 cores makes; later rounds
    # for more than the most it made.
    assert overhead._conc_calls(budget, None) >= 1000 * (budget.conc_seconds + budget.conc_warmup)
    assert overhead._conc_calls(budget, 800) > 800


def test_overhead_sequential_echo_is_the_bare_hop_with_the_facades_client() -> None:
    budget = Budget.quick()
    targets = {overhead.ECHO: "127.0.0.1:2", overhead.FACADE: "127.0.0.1:1"}
    echo = overhead._seq_command(overhead.ECHO, DESCRIBE_SNAPSHOT_TASK, [{}], budget, targets)
    assert echo["call"] is local.ECHO_CALL
    assert echo["target"] == "127.0.0.1:2"
    facade = overhead._seq_command(overhead.FACADE, DESCRIBE_SNAPSHOT_TASK, [{"x": 1}], budget, targets)
    assert facade["target"] == "127.0.0.1:1"
    assert facade["params"] == [{"x": 1}]


def test_quota_sends_a_task_per_describe_call() -> None:
    admin = FakeAdmin()
    calls = quota.open_calls({action: mirror.per_call(admin, action, 9) for action in KINDS})
    by_action = {call["method"].rsplit("/", 1)[1]: call for call in calls}
    assert list(by_action) == list(ACTIONS)
    for action in DESCRIBES:
        each = by_action[action]["each"]
        assert len({request[KINDS[action].id_field] for request in each}) == 9
    assert "each" not in by_action[CREATE_SNAPSHOT_TASK]
    assert "each" not in by_action[STOP_WHITEBOARD_PUSH]  # the seeded task: TaskHasAlreadyStopped


# --- the checks of what each section claims -----------------------------------------------------


def test_arrivals_are_every_request_the_emulator_counted() -> None:
    before = stats(DescribeSnapshotTask=3)
    after = stats(DescribeSnapshotTask=10)
    after[DESCRIBE_SNAPSHOT_TASK]["throttled"] = 2
    after[DESCRIBE_WHITEBOARD_PUSH]["rejected"] = 1
    arrived = mirror.arrived_between(before, after)
    assert arrived[DESCRIBE_SNAPSHOT_TASK] == 9
    assert arrived[DESCRIBE_WHITEBOARD_PUSH] == 1
    assert arrived[CREATE_SNAPSHOT_TASK] == 0


def test_one_arrival_each_holds_only_when_every_call_was_one_request() -> None:
    calls = {DESCRIBE_SNAPSHOT_TASK: 330}
    assert mirror.one_arrival_each(calls, {DESCRIBE_SNAPSHOT_TASK: 330, CREATE_SNAPSHOT_TASK: 0}) == []
    # The cache answered all but the first (the bug this check is for), or calls shared requests.
    assert mirror.one_arrival_each(calls, {DESCRIBE_SNAPSHOT_TASK: 1})
    assert mirror.one_arrival_each(calls, {DESCRIBE_SNAPSHOT_TASK: 200})
    # More requests than calls (refreshes, retries), or requests of another action.
    assert mirror.one_arrival_each(calls, {DESCRIBE_SNAPSHOT_TASK: 331})
    assert mirror.one_arrival_each(calls, {DESCRIBE_SNAPSHOT_TASK: 330, DESCRIBE_WHITEBOARD_PUSH: 2})
    # The echo: no call of TIW at all, so no arrival.
    assert mirror.one_arrival_each({}, {}) == []
    assert mirror.one_arrival_each({}, {DESCRIBE_SNAPSHOT_TASK: 1})


def test_overhead_tally_goal_misses_when_a_batch_breaks_the_claim() -> None:
    tally = overhead.Tally()
    tally.add("SDK, DescribeSnapshotTask", {DESCRIBE_SNAPSHOT_TASK: 330}, {DESCRIBE_SNAPSHOT_TASK: 330})
    tally.add("bare grpc.aio echo, DescribeSnapshotTask", {}, {})
    assert tally.goal("g").met
    assert tally.goal("g").detail == "330 calls, 330 arrivals, in 2 batches"
    tally.add("facade, DescribeSnapshotTask", {DESCRIBE_SNAPSHOT_TASK: 330}, {DESCRIBE_SNAPSHOT_TASK: 1})
    missed = tally.goal("g")
    assert not missed.met
    assert "facade, DescribeSnapshotTask" in missed.detail and "1 arrivals" in missed.detail


def test_answered_arrived_bounds_arrivals_by_the_outcomes() -> None:
    codes = {DESCRIBE_SNAPSHOT_TASK: Counter({"OK": 700, "RESOURCE_EXHAUSTED": 2500, "DEADLINE_EXCEEDED": 5})}

    def check(arrived: int) -> list[str]:
        return mirror.answered_arrived(
            codes, {DESCRIBE_SNAPSHOT_TASK: arrived}, answered={"OK"}, refused={"RESOURCE_EXHAUSTED"}
        )

    assert check(700) == []
    assert check(705) == []  # the late calls may have arrived
    assert check(1)  # answered from the cache: the old quota figure "max 1, utilization 0.0%"
    assert check(699)
    assert check(706)  # more requests than calls not refused


def test_quota_and_fairness_goals_miss_when_the_cache_answers() -> None:
    answered = {action: Counter({"OK": 709, "RESOURCE_EXHAUSTED": 2541}) for action in ACTIONS}
    honest = {action: 709 for action in ACTIONS}
    assert quota.arrivals_goal("Quota (1 replica)", answered, honest).met
    cached = {**honest, DESCRIBE_WHITEBOARD_PUSH: 1}
    goal = quota.arrivals_goal("Quota (1 replica)", answered, cached)
    assert not goal.met
    assert DESCRIBE_WHITEBOARD_PUSH in goal.detail
    # Fairness: one action, both callers' outcomes together.
    codes = {fairness.ACTION: Counter({"OK": 640, "RESOURCE_EXHAUSTED": 5900})}
    assert quota.arrivals_goal("Fairness", codes, {fairness.ACTION: 640}).met
    assert not quota.arrivals_goal("Fairness", codes, {fairness.ACTION: 1}).met
    # StopWhiteboardPush on the seeded task: TIW answers TaskHasAlreadyStopped, an arrival all the same.
    stops = {STOP_WHITEBOARD_PUSH: Counter({"OK": 1, "FAILED_PRECONDITION": 708})}
    assert quota.arrivals_goal("Quota", stops, {STOP_WHITEBOARD_PUSH: 709}).met


# --- the overhead goals against the bare hop ---------------------------------------------------


def test_added_latency_is_facade_minus_sdk_against_the_same_rounds_hop() -> None:
    added, ratio = overhead.added_latency([5.0, 5.2, 5.1], [4.0, 4.1, 4.2], [1.0, 1.0, 0.5])
    assert added == pytest.approx(1.0)  # rounds: 1.0, 1.1, 0.9
    assert ratio == pytest.approx(1.1)  # rounds: 1.0, 1.1, 1.8
    faster, negative = overhead.added_latency([3.0], [4.0], [0.5])
    assert faster == -1.0 and negative == -2.0


def test_hop_goal_needs_every_rpc_within() -> None:
    within = {action: 1.1 for action in ACTIONS}
    assert overhead.hop_goal("p50", within).met
    assert not overhead.hop_goal("p50", {**within, STOP_WHITEBOARD_PUSH: 1.25}).met
    assert not overhead.hop_goal("p99", {**within, STOP_WHITEBOARD_PUSH: math.nan}).met  # missing: a miss
    assert "`StopWhiteboardPush`" in overhead.hop_goal("p99", {**within, STOP_WHITEBOARD_PUSH: 2.0}).detail


def synthetic(facade_ms: float, sdk_ms: float, hop_ms: float, rounds: int = 3) -> overhead.Measured:
    m = overhead.Measured(overhead.CLIENTS)
    for action in ACTIONS:
        for path, ms in ((overhead.SDK, sdk_ms), (overhead.FACADE, facade_ms),
                         (overhead.FACADE_ASYNCIO, facade_ms), (overhead.ECHO, hop_ms)):  # fmt: skip
            m.latency[path, action] = [(ms, 2 * ms)] * rounds
        m.sequential.add(f"{action}", {action: 330}, {action: 330})
    for client, rate in ((overhead.SDK, 300.0), (overhead.FACADE, 700.0), (overhead.FACADE_ASYNCIO, 600.0)):
        m.throughput[client] = [rate] * rounds
        m.outcomes[client] = Counter({"OK": 100})
        m.in_flight.add(client, {DESCRIBE_SNAPSHOT_TASK: 500}, {DESCRIBE_SNAPSHOT_TASK: 500})
    return m


def test_overhead_section_goals() -> None:
    budget = Budget.quick()
    goals = {goal.name: goal for goal in overhead._section(budget, synthetic(4.25, 3.75, 0.5)).goals}
    hop50 = next(g for name, g in goals.items() if "added latency" in name and "p50" in name)
    hop99 = next(g for name, g in goals.items() if "added latency" in name and "p99" in name)
    old = next(g for name, g in goals.items() if name.startswith("Overhead bar: facade p50"))
    assert hop50.met and hop99.met  # 0.5 ms added, 0.5 ms hop: 1.0x; p99 1.0 ms vs 1.0 ms
    assert old.met  # 1.13x the SDK
    assert all(goal.met for name, goal in goals.items() if "one request to TIW" in name)

    section = overhead._section(budget, synthetic(4.5, 3.75, 0.5))  # 1.5x the hop, 1.2x the SDK
    goals = {goal.name: goal for goal in section.goals}
    assert not next(g for name, g in goals.items() if "added latency" in name and "p50" in name).met
    assert "added (facade - SDK)" in section.body and "bare grpc.aio echo" in section.body

    broken = synthetic(4.25, 3.75, 0.5)
    broken.in_flight.add("facade, round 1", {DESCRIBE_VIDEO_GENERATION_TASK: 400}, {})  # the cache answered
    goals = {goal.name: goal for goal in overhead._section(budget, broken).goals}
    assert not next(g for name, g in goals.items() if name.startswith("Throughput: each call")).met
    assert next(g for name, g in goals.items() if name.startswith("Overhead: each sequential")).met


# --- one tiny real run ---------------------------------------------------------------------------


TINY = Budget(
    rounds=1,
    seq_calls=3,
    seq_warmup=1,
    conc_seconds=0.2,
    conc_warmup=0.1,
    quota_seconds=0.0,
    quota_warmup=0.0,
    local_seconds=0.0,
    answers_seconds=0.0,
    failover_before=0.0,
    failover_after=0.0,
    concurrency=4,
)


@pytest.mark.slow
def test_overhead_measures_requests_to_tiw_for_real() -> None:
    """The overhead section's own measuring, tiny, on real processes (emulator, facade, echo, both
    load generators): every call of every client was one request to TIW, the echo none."""
    with Processes() as procs:
        measured = overhead.measure(procs, TINY, clients=(overhead.SDK, overhead.FACADE))
    assert measured.sequential.problems == []
    assert measured.in_flight.problems == []
    per_batch = TINY.seq_calls + TINY.seq_warmup
    assert measured.sequential.calls == measured.sequential.arrivals == 2 * len(ACTIONS) * per_batch
    assert measured.in_flight.calls == measured.in_flight.arrivals > 0
    assert set(measured.outcomes[overhead.SDK]) == set(measured.outcomes[overhead.FACADE]) == {"OK"}
    assert all(len(measured.latency[overhead.ECHO, action]) == 1 for action in ACTIONS)
    # The echo in flight, its server's CPU in the facade's column: the floor beside the facade's.
    assert len(measured.cpu[overhead.ECHO, "facade"]) == len(measured.cpu[overhead.FACADE, "facade"]) == 1
    assert set(measured.outcomes[overhead.ECHO]) == {"OK"}


# --- the watch baseline and the heap pass --------------------------------------------------------


def watch_answer(*streams: tuple[str, int]) -> dict[str, Any]:
    """One load generator's answer: a record per stream, (how it ended, messages it got)."""
    return {"records": [[0, 1.0, 2.0, code, messages, []] for code, messages in streams]}


def test_a_watch_baseline_counts_only_when_every_stream_ended_ok_with_every_message() -> None:
    whole = [watch_answer(("OK", 2), ("OK", 2)), watch_answer(("OK", 2))]
    assert answers.all_ended_ok(whole, 3, 2) is None
    # grpc's default cap cancels streams: what made the old baseline too small.
    cancelled = [watch_answer(("OK", 2), ("RESOURCE_EXHAUSTED", 0)), watch_answer(("OK", 2))]
    assert "RESOURCE_EXHAUSTED" in str(answers.all_ended_ok(cancelled, 3, 2))
    short = [watch_answer(("OK", 1), ("OK", 2)), watch_answer(("OK", 2))]
    assert answers.all_ended_ok(short, 3, 2) is not None
    missing = [watch_answer(("OK", 2)), watch_answer(("OK", 2))]
    assert "2 of 3" in str(answers.all_ended_ok(missing, 3, 2))


def test_the_heap_pass_puts_what_a_file_holds_on_that_file_per_stream() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        held = [bytearray(1000) for _ in range(100)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = heap.grown_by_file(before, after, per=100)
    assert len(held) == 100
    [mine] = [size for name, size in grown.items() if name.endswith("bench/tests/test_logic.py")]
    assert 1000 <= mine <= 1200, grown  # a bytearray(1000) and its object header, each


def test_the_heap_table_ranks_files_by_how_much_their_shares_differ() -> None:
    ours = {"tiw_facade/watcher.py": 500.0, "grpc/aio/_server.py": 100.0, "asyncio/events.py": 90.0}
    theirs = {"grpc/aio/_server.py": 120.0, "asyncio/events.py": 90.0, "bench/roles.py": 300.0}
    assert heap.largest_differences(ours, theirs, 2) == [
        ("tiw_facade/watcher.py", 500.0, 0.0),
        ("bench/roles.py", 0.0, 300.0),
    ]


# --- callbacks: from each change to each watcher, and the requests it cost -----------------------


def stream(task: int, *seen: tuple[float, str], code: str = "OK") -> answers.Stream:
    return answers.Stream(task, 0.0, 100.0, code, len(seen), [list(s) for s in seen])


def push_task(*changes: tuple[float, str]) -> answers.Task:
    return answers.Task(KINDS[DESCRIBE_WHITEBOARD_PUSH], "push-1", [(0.0, "PREPARED"), *changes])


def test_each_watcher_receives_a_change_at_its_first_message_of_that_state_or_a_later_one() -> None:
    task = push_task((10.0, "PUSHING"), (20.0, "STOPPED"))
    streams = [
        stream(0, (1.0, "PREPARED"), (10.2, "PUSHING"), (20.5, "STOPPED")),
        # This one skipped PUSHING: its STOPPED is the receipt of both changes.
        stream(0, (1.0, "PREPARED"), (21.0, "STOPPED")),
    ]
    found = callbacks.receipts([task], streams, 5.0, 30.0)
    assert [r.delays for r in found] == [pytest.approx([0.2, 11.0]), pytest.approx([0.5, 1.0])]
    assert [r.by_every_watcher for r in found] == [pytest.approx(11.0), pytest.approx(1.0)]
    # The creation is no change; the first change has no previous one, the second its gap.
    assert [r.since_previous for r in found] == [math.inf, pytest.approx(10.0)]


def test_a_change_outside_the_window_is_not_counted_and_one_never_shown_is_never_seen() -> None:
    task = push_task((10.0, "PUSHING"), (20.0, "STOPPED"))
    cut = stream(0, (1.0, "PREPARED"), (10.1, "PUSHING"), code="UNAVAILABLE")
    [late] = callbacks.receipts([task], [cut], 15.0, 30.0)
    assert late.delays == [math.inf] and late.by_every_watcher == math.inf
    assert late.since_previous == pytest.approx(10.0)  # the previous change counts, in the window or not
    unwatched = callbacks.receipts([task], [], 0.0, 30.0)
    assert [r.by_every_watcher for r in unwatched] == [math.inf, math.inf]
    assert not callbacks.ended_final(cut, [task])
    assert callbacks.ended_final(stream(0, (1.0, "PREPARED"), (20.1, "STOPPED")), [task])


def test_changes_close_to_their_previous_one_are_set_apart() -> None:
    close = push_task((10.0, "PUSHING"), (10.4, "STOPPED"))
    apart = push_task((12.0, "PUSHING"), (14.0, "STOPPED"))
    streams = [
        stream(0, (10.01, "PUSHING"), (11.0, "STOPPED")),
        stream(1, (12.02, "PUSHING"), (14.03, "STOPPED")),
    ]
    found = callbacks.receipts([close, apart], streams, 0.0, 30.0)
    none = quota.Snapshot(0.0, {}, [], {})
    run = callbacks.Run(callbacks.CALLBACKS, [close, apart], streams, (0.0, 30.0), none, none, none, {})
    f = callbacks.Figures(run, found, requests_of(0, 0, 0), seconds=10.0)
    assert f.changes == 4 and f.changes_per_second == pytest.approx(0.4)
    assert sorted(f.every) == pytest.approx([0.01, 0.02, 0.03, 0.6])
    assert sorted(f.apart) == pytest.approx([0.01, 0.02, 0.03])  # not the STOPPED 0.4 s after PUSHING


def requests_of(at_tiw: float, refreshes: float, confirms: float) -> callbacks.Requests:
    action = DESCRIBE_SNAPSHOT_TASK
    return callbacks.Requests({action: at_tiw}, {action: refreshes}, {action: confirms})


def test_requests_are_per_second_in_the_window_from_both_replicas_metrics() -> None:
    metrics_before = [
        'tiw_refreshes_total{action="DescribeSnapshotTask",outcome="ok"} 10',
        'tiw_refreshes_total{action="DescribeSnapshotTask",outcome="ok"} 5\n'
        'tiw_callback_confirms_total{action="DescribeSnapshotTask",outcome="sent"} 1',
    ]
    metrics_after = [
        'tiw_refreshes_total{action="DescribeSnapshotTask",outcome="ok"} 20\n'
        'tiw_refreshes_total{action="DescribeSnapshotTask",outcome="failed"} 2',
        'tiw_refreshes_total{action="DescribeSnapshotTask",outcome="ok"} 13\n'
        'tiw_callback_confirms_total{action="DescribeSnapshotTask",outcome="sent"} 11\n'
        'tiw_callback_confirms_total{action="DescribeSnapshotTask",outcome="deferred"} 7',
    ]
    first = quota.Snapshot(100.0, stats(DescribeSnapshotTask=5), metrics_before, {})
    second = quota.Snapshot(110.0, stats(DescribeSnapshotTask=45), metrics_after, {})
    made = callbacks.requests(first, second)
    assert made.at_tiw[DESCRIBE_SNAPSHOT_TASK] == pytest.approx(4.0)
    assert made.refreshes[DESCRIBE_SNAPSHOT_TASK] == pytest.approx(2.0)  # (20 - 10 + 2 + 13 - 5) / 10
    assert made.confirms[DESCRIBE_SNAPSHOT_TASK] == pytest.approx(1.0)  # sent only
    assert made.total == pytest.approx(4.0) and made.at_tiw[DESCRIBE_WHITEBOARD_PUSH] == 0.0


def test_callbacks_may_cost_one_request_per_change_over_polling_alone_and_no_more() -> None:
    polling = requests_of(10.0, 10.0, 0.0)
    assert callbacks.within_one_per_change(requests_of(12.0, 6.0, 6.0), polling, changes_per_second=2.0)
    assert not callbacks.within_one_per_change(requests_of(12.1, 6.0, 6.1), polling, changes_per_second=2.0)


def test_each_replica_gets_its_own_generator_holding_half_of_every_tasks_watchers() -> None:
    specs = [callbacks.watch_spec(kind, f"t-{kind.name}") for kind in callbacks.KINDS]
    commands = callbacks.watch_commands(["a:1", "b:2"], specs, begin=1.0, seconds=5.0)
    assert [c["targets"] for c in commands] == [["a:1"], ["b:2"]]
    for command in commands:
        first, last = command["streams"]
        # Stream i watches task i mod len(specs): each generator's streams cover every task equally.
        watched = Counter(i % len(specs) for i in range(first, last))
        assert watched == {task: callbacks.WATCHERS_PER_TASK // callbacks.REPLICAS for task in range(3)}
    assert [s["method"].rsplit("/", 1)[1] for s in specs] == [
        "WatchSnapshotTask",
        "WatchWhiteboardPush",
        "WatchVideoGenerationTask",
    ]
    assert specs[1]["params"] == {"request": {"SdkAppId": PUSH_SDK_APP_ID, "TaskId": "t-push"}}


def test_the_facades_hold_the_emulators_callback_key_for_every_sdk_app_id_the_tasks_use() -> None:
    pairs = dict(pair.split("=") for pair in callbacks.callback_keys().split(","))
    apps = {str(PARAMS[kind.action]["SdkAppId"]) for kind in callbacks.KINDS}
    assert set(pairs) == apps and set(pairs.values()) == {callbacks.CALLBACK_KEY}
