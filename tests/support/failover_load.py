"""Load and measurements shared by the failover tests (Sentinel, Cluster): three facades under five
times the limit while a Redis primary is killed, and what the callers and TIW saw around the kill."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb

from support import count_between, max_in_window
from support.facade import Facade
from support.tiw import SDK_APP_ID, create_request

DESCRIBE = "DescribeSnapshotTask"
CREATE = "CreateSnapshotTask"
FRESH = (("tiw-max-age-ms", "0"),)  # never a cached answer: every admitted call goes upstream
REFUSED = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
OVERLOAD = 5  # calls a second, as a multiple of the limit

T = TypeVar("T")


async def retry(make: Callable[[], Awaitable[T]], within: float = 15.0) -> T:
    """``make()`` until served; a refusal (RESOURCE_EXHAUSTED/UNAVAILABLE, nothing else) is retried."""
    end = time.monotonic() + within
    while True:
        try:
            return await make()
        except grpc.aio.AioRpcError as error:
            assert error.code() in REFUSED, (error.code(), error.details())
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


@dataclasses.dataclass
class Load:
    """``OVERLOAD`` times ``limit`` each second of DescribeSnapshotTask, spread over the facades.

    Times are ``time.time()``, the emulator's clock for its arrivals."""

    facades: list[Facade]
    limit: int
    served: list[float] = dataclasses.field(default_factory=list)
    refusals: list[tuple[float, grpc.aio.AioRpcError]] = dataclasses.field(default_factory=list)
    others: list[grpc.aio.AioRpcError] = dataclasses.field(default_factory=list)

    async def call(self, facade: Facade) -> None:
        # A task of its own per call: identical calls at once would share one upstream request.
        task_id = facade.emulator.add_snapshot_task()
        task = pb.DescribeSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
        try:
            await facade.stub.DescribeSnapshotTask(task, metadata=FRESH, timeout=3)
            self.served.append(time.time())
        except grpc.aio.AioRpcError as error:
            if error.code() in REFUSED:
                self.refusals.append((time.time(), error))
            else:
                self.others.append(error)

    async def run(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        pending: list[asyncio.Task[None]] = []
        for index in itertools.count():
            if time.monotonic() >= until:
                break
            pending.append(asyncio.create_task(self.call(self.facades[index % len(self.facades)])))
            await asyncio.sleep(1 / (OVERLOAD * self.limit))
        await asyncio.gather(*pending)


@dataclasses.dataclass(frozen=True)
class AroundTheKill:
    """What a run of ``Load`` saw around the kill of a Redis primary."""

    longest_gap: float  # the longest stretch without a served call (the run's edges included)
    gap_from_kill: float  # where it began, in seconds from the kill
    served_again: float  # the first served call after the kill, in seconds from it (inf: none)
    per_second: dict[int, int]  # arrivals at TIW in each second from the kill
    before: float  # utilization: arrivals / (limit x seconds) in the seconds before the kill
    after: float  # the same from the kill to the end of the load
    most_in_any_second: int

    @classmethod
    def measure(
        cls,
        load: Load,
        arrivals: list[float],
        *,
        started: float,
        killed: float,
        ended: float,
        before: float,
        after: float,
    ) -> AroundTheKill:
        per_second = {
            s: count_between(arrivals, killed + s, killed + s + 1) for s in range(-int(before), int(after))
        }
        moments = [started, *sorted(load.served), ended]
        longest, since = max((b - a, a - killed) for a, b in itertools.pairwise(moments))
        return cls(
            longest_gap=longest,
            gap_from_kill=since,
            served_again=min((t - killed for t in load.served if t >= killed), default=float("inf")),
            per_second=per_second,
            before=count_between(arrivals, killed - before, killed) / (load.limit * before),
            after=count_between(arrivals, killed, killed + after) / (load.limit * after),
            most_in_any_second=max_in_window(arrivals),
        )

    def report(self, load: Load) -> str:
        codes: dict[str, int] = {}
        for _, error in load.refusals:
            codes[error.code().name] = codes.get(error.code().name, 0) + 1
        return (
            f"served {len(load.served)}, refused {len(load.refusals)} {codes}, other errors "
            f"{len(load.others)}; longest gap without a served call {self.longest_gap:.2f} s "
            f"(from kill{self.gap_from_kill:+.2f} s), first served again {self.served_again:.2f} s after "
            f"the kill; quota utilization {self.before:.0%} before the "
            f"kill, {self.after:.0%} after it; arrivals per second from the kill: {self.per_second}; "
            f"most in any 1 s: {self.most_in_any_second}"
        )


async def describe_push(facade: Facade, task_id: str, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
    answer: pb.DescribeWhiteboardPushResponse = await retry(
        lambda: facade.stub.DescribeWhiteboardPush(request, metadata=metadata, timeout=5)
    )
    return str(answer.status)


async def create(facade: Facade, request: pb.CreateSnapshotTaskRequest, key: str) -> str:
    metadata = (("idempotency-key", key),)
    answer: pb.CreateSnapshotTaskResponse = await retry(
        lambda: facade.stub.CreateSnapshotTask(request, metadata=metadata, timeout=5)
    )
    return str(answer.task_id)


@dataclasses.dataclass
class PushWatch:
    """Every facade asked about a push (its kept answer, or a fresh one when it has none) every
    ``every`` seconds while the load runs: each status seen, with when and where."""

    facades: list[Facade]
    task_id: str
    seen: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)  # (time, target, status)
    refused: int = 0
    others: list[grpc.aio.AioRpcError] = dataclasses.field(default_factory=list)

    async def run(self, seconds: float, every: float = 0.25) -> None:
        until = time.monotonic() + seconds
        request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=self.task_id)
        while time.monotonic() < until:
            await asyncio.gather(*(self._ask(facade, request) for facade in self.facades))
            await asyncio.sleep(every)

    async def _ask(self, facade: Facade, request: pb.DescribeWhiteboardPushRequest) -> None:
        try:
            answer = await facade.stub.DescribeWhiteboardPush(request, timeout=3)
            self.seen.append((time.time(), facade.target, str(answer.status)))
        except grpc.aio.AioRpcError as error:
            if error.code() in REFUSED:
                self.refused += 1
            else:
                self.others.append(error)

    def pushing(self) -> list[tuple[float, str, str]]:
        return [seen for seen in self.seen if seen[2] == "PUSHING"]


async def stop_push(facade: Facade, task_id: str) -> None:
    request = pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
    await retry(lambda: facade.stub.StopWhiteboardPush(request, timeout=5))


async def replica_caught_up(
    primary_offset: Callable[[], int], caught_up: Callable[[int], bool], within: float = 5.0
) -> None:
    """Replication is asynchronous and no facade waits for a replica (no WAIT): what the primary
    acknowledged but had not sent yet dies with it. To test the failover rather than that race, the
    kill comes only once the replica has applied everything written so far (the idempotency record,
    the dropped answers of the stopped push). ``caught_up(offset)``: whether the replica has applied
    the primary's stream up to ``offset``."""
    written = primary_offset()
    deadline = time.monotonic() + within
    while not caught_up(written):
        assert time.monotonic() < deadline, "the replica did not catch up"
        await asyncio.sleep(0.01)


# --- the scenario both failover tests run ----------------------------------------------------------

LIMIT = 5
BEFORE = 2.0  # seconds of load before the kill
AFTER = 8.0  # and after it
LONGEST_REFUSAL = 10.0


def environment(**redis: str) -> dict[str, str]:
    """The facades' settings: how they find Redis (``redis``), and the limit under test."""
    return {
        **redis,
        "TIW_RATE_LIMIT": str(LIMIT),
        "TIW_EXPECTED_REPLICAS": "3",
        # Refused (with when to retry) rather than kept waiting: the overload is refused, not timed out.
        "TIW_MAX_QUEUE_WAIT": "0.3",
        # Each call is to cost one request: no refresh of an answer may add its own.
        "TIW_REFRESH_INTEREST": "0.001",
    }


@dataclasses.dataclass
class Failing:
    """What differs between Sentinel and Cluster: the primary's writes reaching its replica, the
    kill, and whether the replica became primary."""

    name: str  # for the printed report
    primary_offset: Callable[[], int]
    caught_up: Callable[[int], bool]  # whether the replica has applied the primary's stream so far
    kill: Callable[[], None]  # SIGKILL the primary
    promoted: Callable[[], bool]  # polled from a thread every 50 ms after the kill


async def _promotion(failing: Failing, within: float) -> float | None:
    """When (``time.time()``) the replica was first seen promoted; None: not within ``within``."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if await asyncio.to_thread(failing.promoted):
            return time.time()
        await asyncio.sleep(0.05)
    return None


async def invariants_hold_through(failing: Failing, facades: list[Facade]) -> None:
    """Three facades under five times the limit while the primary is killed: (a) the limit at TIW,
    (b) refusals for a bounded time only, (c) a keyed create not sent twice, (d) a stopped push
    never PUSHING again."""
    emulator = facades[0].emulator

    # (c) A keyed create before the failover.
    request = create_request()
    first = await create(facades[0], request, "failover-order-1")
    assert emulator.stats()[CREATE].tasks_created == 1
    # (d) A push every facade has seen PUSHING (an answer each may keep, or share), then stopped.
    push = emulator.add_push_task(prepare_seconds=0.0)
    for facade in facades:
        assert await describe_push(facade, push) == "PUSHING"
    await stop_push(facades[1], push)
    await replica_caught_up(failing.primary_offset, failing.caught_up)

    load = Load(facades, LIMIT)
    started = time.time()
    running = asyncio.create_task(load.run(BEFORE + AFTER))
    # (d) Asked all along, too: a kept PUSHING must not come back while the shared answers are away.
    watch = PushWatch(facades, push)
    watching = asyncio.create_task(watch.run(BEFORE + AFTER))
    await asyncio.sleep(BEFORE)
    killed = time.time()
    failing.kill()
    promotion = asyncio.create_task(_promotion(failing, within=AFTER))
    await running
    await watching
    ended = time.time()
    promoted_at = await promotion

    # (a) The limit at TIW over the whole run; (b) the longest stretch without a served call.
    arrivals = emulator.arrivals(DESCRIBE)
    seen = AroundTheKill.measure(
        load, arrivals, started=started, killed=killed, ended=ended, before=BEFORE, after=AFTER
    )
    promoted_after = f"{promoted_at - killed:.2f} s after the kill" if promoted_at else "not promoted"
    print(
        f"\n{failing.name} failover (promoted {promoted_after}): {seen.report(load)}; the stopped push "
        f"described {len(watch.seen)} times ({len(watch.pushing())} PUSHING), refused {watch.refused}"
    )
    assert promoted_at is not None, f"{failing.name}: the replica was promoted"
    assert max_in_window(arrivals) <= LIMIT, sorted(arrivals)
    assert emulator.stats()[DESCRIBE].throttled == 0
    assert not load.others, [(error.code(), error.details()) for error in load.others]
    assert seen.longest_gap < LONGEST_REFUSAL, seen
    assert count_between(load.served, ended - 2.0, ended) > 0, "served again after the failover"

    # (c) The retry after the failover, on another facade: the first task, and no second create.
    assert await create(facades[2], request, "failover-order-1") == first
    assert emulator.stats()[CREATE].tasks_created == 1
    # (d) Never PUSHING again, during the failover or after it; stopped on every facade, from a kept
    # answer or fresh.
    assert not watch.pushing(), watch.pushing()
    assert not watch.others, [(error.code(), error.details()) for error in watch.others]
    assert any(at > killed for at, _, _ in watch.seen), "the push was described after the kill"
    for facade in facades:
        for metadata in ((), FRESH):
            assert await describe_push(facade, push, metadata) == "STOPPED", (facade.target, metadata)
