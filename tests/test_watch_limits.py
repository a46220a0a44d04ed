"""The caps on watch streams, end to end: the replica's (TIW_MAX_WATCHES) and each caller's
(TIW_MAX_WATCHES_PER_CALLER), each refusal naming its cap; and what the default caps hold in memory,
read from a facade in a process of its own."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support.facade import Facade, StartFacade, facade_environment
from support.facade_process import rss_bytes, start_facade_process, wait_serving
from support.rich_status import error_info
from support.tiw import SDK_APP_ID
from support.waiting import wait_until
from support.watching import active_watches, ended, snapshot_watch
from tiw_facade import budget
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2 as wpb
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2_grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.call_record import UNIDENTIFIED
from tiw_facade.emulator import Emulator

LONG = 3600.0  # seconds a task stays in its first state: longer than any test
TIMEOUT = 60.0
MiB = 1 << 20
REPLICA_CAP = "TIW_MAX_WATCHES"
CALLER_CAP = "TIW_MAX_WATCHES_PER_CALLER"


def as_caller(name: str | None) -> tuple[tuple[str, str], ...]:
    return () if name is None else (("tiw-caller", name),)


def open_watch(
    stub: watcher_pb2_grpc.TaskWatcherStub, task_id: str, caller: str | None
) -> grpc.aio.UnaryStreamCall:
    return stub.WatchSnapshotTask(snapshot_watch(task_id), timeout=TIMEOUT, metadata=as_caller(caller))


async def opened(call: grpc.aio.UnaryStreamCall) -> grpc.aio.UnaryStreamCall:
    """``call`` once its first message (the current state) came: the stream holds its slot."""
    assert (await call.read()).status == "Running"
    return call


async def refusal(call: grpc.aio.UnaryStreamCall) -> dict[str, str]:
    """The metadata of the TOO_MANY_WATCHES refusal that ends ``call`` before any message."""
    return refusal_in(await ended(call))


def refusal_in(error: grpc.aio.AioRpcError) -> dict[str, str]:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(error)
    assert (info.reason, info.metadata["outcome"]) == ("TOO_MANY_WATCHES", "not_sent")
    metadata = dict(info.metadata)
    assert metadata["setting"] in (error.details() or "")  # the message names the cap too
    return metadata


# --- the two caps -----------------------------------------------------------------------------------


async def test_one_caller_cannot_take_every_slot(start_facade: StartFacade) -> None:
    facade = await start_facade(
        TIW_MAX_WATCHES="6", TIW_MAX_WATCHES_PER_CALLER="3", TIW_CALLER_WEIGHTS="classroom=1,billing=1"
    )
    stub = watcher_pb2_grpc.TaskWatcherStub(facade.channel)
    task_id = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=LONG)
    classroom = [await opened(open_watch(stub, task_id, "classroom")) for _ in range(3)]

    # classroom's 4th is its own cap, though the replica has room: classroom can act on that.
    refused = await refusal(open_watch(stub, task_id, "classroom"))
    assert refused == {
        "action": "DescribeSnapshotTask",
        "outcome": "not_sent",
        "setting": CALLER_CAP,
        "limit": "3",
        "caller": "classroom",
    }
    # billing still gets all of its own.
    billing = [await opened(open_watch(stub, task_id, "billing")) for _ in range(3)]

    # Now the replica is full: a third caller, under its own cap, meets the replica's.
    refused = await refusal(open_watch(stub, task_id, None))
    assert refused == {
        "action": "DescribeSnapshotTask",
        "outcome": "not_sent",
        "setting": REPLICA_CAP,
        "limit": "6",
    }

    # A stream that ends gives its caller's slot back: classroom may open one again (and only one).
    classroom.pop().cancel()
    await wait_until(lambda: active_watches(facade) == 5)
    classroom.append(await opened(open_watch(stub, task_id, "classroom")))
    assert (await refusal(open_watch(stub, task_id, "billing")))["setting"] == CALLER_CAP
    for call in classroom + billing:
        call.cancel()
    await wait_until(lambda: active_watches(facade) == 0)


async def test_unlisted_names_share_one_callers_cap(start_facade: StartFacade) -> None:
    """A name a caller merely claims costs nothing to invent: every unproven name not listed in
    TIW_CALLER_WEIGHTS counts as the one caller ``unidentified``, nameless calls included."""
    facade = await start_facade(
        TIW_MAX_WATCHES="6", TIW_MAX_WATCHES_PER_CALLER="2", TIW_CALLER_WEIGHTS="classroom=1"
    )
    stub = watcher_pb2_grpc.TaskWatcherStub(facade.channel)
    task_id = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=LONG)
    calls = [await opened(open_watch(stub, task_id, name)) for name in ("invented-1", None)]
    refused = await refusal(open_watch(stub, task_id, "invented-2"))
    assert (refused["setting"], refused["limit"], refused["caller"]) == (CALLER_CAP, "2", UNIDENTIFIED)
    calls.append(await opened(open_watch(stub, task_id, "classroom")))  # a listed name: a cap of its own
    for call in calls:
        call.cancel()
    await wait_until(lambda: active_watches(facade) == 0)


async def test_the_per_caller_cap_defaults_to_a_share_of_the_replicas(facade: Facade) -> None:
    settings = facade.server.settings
    assert settings.max_watches == budget.bounds(budget.DEFAULT_BUDGET).max_watches
    assert settings.max_watches_per_caller == int(settings.max_watches * budget.WATCHES_PER_CALLER_SHARE)


# --- memory: what the default caps hold ---------------------------------------------------------------

CALLERS = ("c0", "c1", "c2", "c3", "c4")  # listed, so each has a cap of its own: together, the replica's
CHANNELS = 8  # HTTP/2 connections the streams are spread over, as from several client processes
FLOOD = 500  # attempts beyond the cap, all refused
# What may grow besides the streams' share: the allocators' granularity (pymalloc's 1 MiB arenas,
# glibc's heaps for grpc's threads), the refused attempts' garbage, the first answers kept. An
# eighth of the share, and well inside the headroom the default budget leaves below the shipped pod
# limit (256 - 65 - 160 = 31 MiB).
MARGIN = 8 * MiB


@pytest.fixture
def facade_process(emulator: Emulator, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A facade with the default budget and caps in a process of its own, so its RSS is its own."""
    environment = facade_environment(
        emulator.url,
        TIW_LOG_LEVEL="WARNING",
        TIW_CALLER_WEIGHTS=",".join(f"{name}=1" for name in CALLERS),
    )
    process, target = start_facade_process(environment, tmp_path / "facade.log")
    try:
        yield process, target
    finally:
        process.kill()
        process.wait()


def push_watch(task_id: str) -> wpb.WatchWhiteboardPushRequest:
    return wpb.WatchWhiteboardPushRequest(
        request=pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
    )


@pytest.mark.slow
async def test_a_flood_of_watches_meets_the_default_cap_within_its_memory_share(
    facade_process: tuple[subprocess.Popen[bytes], str], emulator: Emulator
) -> None:
    """Every stream on one task, which then changes: each stream sends at once, the costliest moment
    (budget.WATCH_COST was measured so)."""
    process, target = facade_process
    bounds = budget.bounds(budget.DEFAULT_BUDGET)
    cap = bounds.max_watches
    assert bounds.max_watches_per_caller * len(CALLERS) >= cap  # the replica's cap is the one met
    share = budget.DEFAULT_BUDGET * budget.WATCHES_SHARE
    task_id = emulator.add_push_task(sdk_app_id=SDK_APP_ID, prepare_seconds=LONG)
    # Own subchannels: channels to one target would otherwise share one connection.
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    stubs = [watcher_pb2_grpc.TaskWatcherStub(channel) for channel in channels]

    def watch(index: int) -> grpc.aio.UnaryStreamCall:
        stub, caller = stubs[index % CHANNELS], CALLERS[index % len(CALLERS)]
        return stub.WatchWhiteboardPush(push_watch(task_id), timeout=TIMEOUT, metadata=as_caller(caller))

    async def outcome(call: grpc.aio.UnaryStreamCall) -> str:
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            return refusal_in(error)["setting"]
        assert first.status == "PREPARED"
        return "open"

    calls: list[grpc.aio.UnaryStreamCall] = []
    try:
        await wait_serving(channels[0], process)
        # Warm: every connection up, every caller seen once, the task's answer kept.
        warm = [watch(index) for index in range(CHANNELS * len(CALLERS))]
        assert set(await asyncio.gather(*(outcome(call) for call in warm))) == {"open"}
        for call in warm:
            call.cancel()
        await asyncio.sleep(1.0)
        before = rss_bytes(process.pid)

        calls = [watch(index) for index in range(cap + 1)]
        outcomes = await asyncio.gather(*(outcome(call) for call in calls))
        assert (outcomes.count("open"), outcomes.count(REPLICA_CAP)) == (cap, 1)
        flood = [watch(index) for index in range(FLOOD)]
        refusals = await asyncio.gather(*(refusal(call) for call in flood))
        assert {(r["setting"], r["limit"]) for r in refusals} == {(REPLICA_CAP, str(cap))}
        held = rss_bytes(process.pid) - before

        # The task changes: its next refresh sends every stream its new state at once.
        emulator.tasks.pushes[SDK_APP_ID, task_id].starts = time.time()
        peak = held
        streams = [call for call, result in zip(calls, outcomes, strict=True) if result == "open"]
        pending = asyncio.gather(*(call.read() for call in streams))
        while not pending.done():
            peak = max(peak, rss_bytes(process.pid) - before)
            await asyncio.wait((pending,), timeout=0.05)
        assert {message.status for message in pending.result()} == {"PUSHING"}
        peak = max(peak, rss_bytes(process.pid) - before)
        print(
            f"\n{cap} watch streams (the default cap), {FLOOD} refused: {held / MiB:.1f} MiB "
            f"({held / cap / 1024:.1f} KiB a stream), {peak / MiB:.1f} MiB at the peak "
            f"({peak / cap / 1024:.1f} KiB); the share: {share / MiB:.0f} MiB"
        )
        assert peak <= share + MARGIN, f"{cap} streams took {peak / MiB:.1f} MiB"
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()
