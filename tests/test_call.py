"""`tiw-facade call`: the real command in a subprocess, against a live facade on the emulator."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from support.facade import Facade, StartFacade
from support.redis_server import free_port
from support.waiting import wait_until
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc
from tiw_facade.call import ACTIONS, METHODS
from tiw_facade.emulator import Emulator, EmulatorConfig, Fault, FaultKind

# Each test runs a command-line program as a process of its own: left to `make test`.
pytestmark = pytest.mark.slow

SEED = json.loads((Path(__file__).parent / "data" / "seed_examples.json").read_text())


class Ran(NamedTuple):
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        answer = json.loads(self.out)
        assert isinstance(answer, dict)
        return answer


async def start_call(*args: str) -> asyncio.subprocess.Process:
    """The command started as a user runs it. Asynchronous: the facade under test shares this event loop."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tiw_facade.cli",
        "call",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def tiw_call(*args: str, stdin: str = "") -> Ran:
    """The command run to its end."""
    process = await start_call(*args)
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    ran = Ran(process.returncode, out.decode(), err.decode())
    assert "Traceback" not in ran.err, ran.err
    return ran


def fields(action: str) -> tuple[set[str], set[str]]:
    """JSON names of the answer's fields: (always written, written only when present)."""
    descriptor = METHODS[action].output_type
    always = {f.json_name for f in descriptor.fields if f.is_repeated or not f.has_presence}
    return always, {f.json_name for f in descriptor.fields} - always


def integers_are_integers(value: Any, seed: Any) -> None:
    """Where TIW's example has an integer, ours is one too (not "1626249427")."""
    if isinstance(seed, dict):
        for key, item in value.items():
            if key in seed:
                integers_are_integers(item, seed[key])
    elif isinstance(seed, list) and seed:
        for item in value:
            integers_are_integers(item, seed[0])
    elif isinstance(seed, int):
        assert isinstance(value, int) and not isinstance(value, bool), value


@pytest.mark.parametrize("action", ACTIONS)
async def test_each_action_with_the_seed_example(facade: Facade, action: str) -> None:
    ran = await tiw_call(action, json.dumps(SEED["requests"][action]), "--target", facade.target)
    assert (ran.code, ran.err) == (0, "")
    answer = ran.json()
    always, optional = fields(action)
    assert always <= set(answer) <= always | optional  # TIW's names, every field without presence
    assert set(answer) <= set(SEED["responses"][action])  # the names of TIW's own example answer
    integers_are_integers(answer, SEED["responses"][action])
    assert answer["RequestId"]


async def test_the_documented_snapshot_answer_exactly(facade: Facade) -> None:
    request = SEED["requests"]["DescribeSnapshotTask"]
    ran = await tiw_call("DescribeSnapshotTask", json.dumps(request), "--target", facade.target)
    answer = ran.json()
    expected = dict(SEED["responses"]["DescribeSnapshotTask"])
    assert answer.pop("RequestId") and expected.pop("RequestId")
    assert answer == expected  # integers as integers, "" kept, nothing added


@pytest.fixture
async def slow_emulator() -> AsyncIterator[Emulator]:
    """Tasks that stay in their first state for a minute: a subprocess takes longer than the fixture's."""
    instance = Emulator(EmulatorConfig(snapshot_seconds=60, push_prepare_seconds=60))
    await instance.start("127.0.0.1", 0)
    yield instance
    await instance.stop()


async def test_zero_values_written_absent_optionals_left_out(
    start_facade: StartFacade, slow_emulator: Emulator
) -> None:
    facade = await start_facade(slow_emulator.url)
    # A fresh push task is PREPARED: no reason, no start or stop time yet (zeros, not absent).
    push = json.dumps(SEED["requests"]["DescribeWhiteboardPush"])
    answer = (await tiw_call("DescribeWhiteboardPush", push, "--target", facade.target)).json()
    assert answer["Status"] == "PREPARED"
    assert answer["FinishReason"] == "" and answer["PushStartTime"] == answer["PushStopTime"] == 0
    # A running snapshot task has no FinishTime nor Result: TIW sends null, the facade has them
    # absent, the command leaves them out.
    create = json.dumps(SEED["requests"]["CreateSnapshotTask"])
    task = (await tiw_call("CreateSnapshotTask", create, "--target", facade.target)).json()["TaskID"]
    query = json.dumps({"SdkAppId": 1400123480, "TaskID": task})
    running = (await tiw_call("DescribeSnapshotTask", query, "--target", facade.target)).json()
    assert running["Status"] == "Running" and running["CreateTime"] > 0
    assert "FinishTime" not in running and "Result" not in running


async def test_request_from_stdin_with_integers_as_strings(facade: Facade) -> None:
    request = '{"SdkAppId": "1400000001", "TaskId": "ghucnligqtgtvk2624mb"}'  # as canonical proto JSON
    ran = await tiw_call("DescribeVideoGenerationTask", "-", "--target", facade.target, stdin=request)
    assert ran.code == 0 and ran.json()["TaskId"] == "ghucnligqtgtvk2624mb"


async def test_unknown_task_prints_not_found_and_error_info(facade: Facade) -> None:
    query = json.dumps({"SdkAppId": 1400127230, "TaskID": "no-such-task"})
    ran = await tiw_call("DescribeSnapshotTask", query, "--target", facade.target)
    assert ran.code == 1 and ran.out == ""
    lines = ran.err.splitlines()
    assert lines[0].startswith("error: NOT_FOUND: ")
    assert "  ErrorInfo: reason InvalidParameter.TaskNotFound, domain tiw.tencentcloudapi.com" in lines
    assert "    action: DescribeSnapshotTask" in lines
    assert any(re.fullmatch(r"    request_id: \S+", line) for line in lines)


async def test_invalid_request_prints_every_field_violation(facade: Facade) -> None:
    bad = json.dumps({"Whiteboard": {"Width": 4000}, "RoomId": 1, "COS": {"Uin": 1}})
    ran = await tiw_call("CreateSnapshotTask", bad, "--target", facade.target)
    assert ran.code == 1
    assert ran.err.startswith("error: INVALID_ARGUMENT: ")
    violations = re.findall(r"^  BadRequest: field (\S+): .+$", ran.err, re.MULTILINE)
    assert violations == ["Whiteboard.Width", "SdkAppId", "COS.Region", "COS.Bucket"]
    assert "  ErrorInfo: reason INVALID_REQUEST, domain tiw-facade" in ran.err.splitlines()


@pytest.mark.slow  # holds the one token for the 5 s of a slow TIW answer
async def test_refusal_prints_retry_info_and_quota_failure(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_RATE_LIMIT="1", TIW_MAX_QUEUE_WAIT="0.1")
    # The one token stays taken while TIW is slow to answer its call (and 1 s after).
    facade.emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeWhiteboardPush", delay=5, count=1))
    # Another task than the CLI's: the CLI's call, identical, would share the holder's request
    # (docs/answers.md) and get its answer instead of a refusal.
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=1400000001, task_id=facade.emulator.add_push_task())
    holder = asyncio.ensure_future(facade.stub.DescribeWhiteboardPush(request, timeout=20))
    await wait_until(lambda: facade.emulator.stats()["DescribeWhiteboardPush"].accepted == 1)
    ran = await tiw_call(
        "DescribeWhiteboardPush",
        json.dumps(SEED["requests"]["DescribeWhiteboardPush"]),
        "--target",
        facade.target,
    )
    await holder
    assert ran.code == 1
    lines = ran.err.splitlines()
    assert lines[0].startswith("error: RESOURCE_EXHAUSTED: ")
    assert any(re.fullmatch(r"  RetryInfo: retry in \d+(\.\d+)? s", line) for line in lines), lines
    assert any(line.startswith("  QuotaFailure: ") and "DescribeWhiteboardPush" in line for line in lines)
    assert "  ErrorInfo: reason RATE_LIMITED, domain tiw-facade" in lines
    assert "    outcome: not_sent" in lines


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"SdkAppId": 1400000001,', "the request is not JSON: "),
        ("[1, 2]", "the request must be a JSON object, not list"),
        ('{"SdkAppId": 1400000001, "TaskID": "x"}', 'no field named "TaskID"'),  # it is TaskId here
        ('{"SdkAppId": "many"}', "Failed to parse SdkAppId field"),
    ],
)
async def test_bad_json_is_a_usage_error_naming_the_problem(facade: Facade, text: str, says: str) -> None:
    ran = await tiw_call("DescribeWhiteboardPush", text, "--target", facade.target)
    assert ran.code == 2 and ran.out == ""
    assert ran.err.startswith("tiw-facade call: ") and says in ran.err
    assert len(ran.err.splitlines()) == 1
    assert facade.emulator.stats()["DescribeWhiteboardPush"].accepted == 0  # nothing was sent


async def test_unknown_action_lists_the_five() -> None:
    ran = await tiw_call("DescribeEverything", "{}")
    assert ran.code == 2
    assert "unknown action 'DescribeEverything'" in ran.err
    for action in ACTIONS:
        assert action in ran.err
    assert len(ACTIONS) == 5


async def test_unreachable_target_is_unavailable_without_traceback() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    ran = await tiw_call(
        "DescribeWhiteboardPush", json.dumps(SEED["requests"]["DescribeWhiteboardPush"]), "--target", nobody
    )
    assert ran.code == 1 and ran.out == ""
    assert ran.err.startswith("error: UNAVAILABLE: ")


class OddServer(tiw_pb2_grpc.TiwServiceServicer):
    """A server that answers with details the facade never sends, to see each one decoded."""

    async def StopWhiteboardPush(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        unknown = any_pb2.Any(type_url="type.googleapis.com/example.Mystery", value=b"\x08\x01")
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject="StopWhiteboardPush", description="20 per second", quota_metric="tiw/requests"
                )
            ]
        )
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=250_000_000))
        help_ = error_details_pb2.Help(
            links=[error_details_pb2.Help.Link(description="docs", url="https://x")]
        )
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="slow down")
        for detail in (quota, retry, help_):
            status.details.add().Pack(detail)
        status.details.append(unknown)
        rich = rpc_status.to_status(status)
        await context.abort(rich.code, rich.details, rich.trailing_metadata)


async def test_every_detail_is_decoded_unknown_ones_by_type_url() -> None:
    server = grpc.aio.server()
    tiw_pb2_grpc.add_TiwServiceServicer_to_server(OddServer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        ran = await tiw_call(
            "StopWhiteboardPush", '{"SdkAppId": 1, "TaskId": "t"}', "--target", f"127.0.0.1:{port}"
        )
    finally:
        await server.stop(0)
    assert ran.code == 1
    assert ran.err.splitlines() == [
        "error: RESOURCE_EXHAUSTED: slow down",
        '  QuotaFailure: StopWhiteboardPush: 20 per second (quota_metric: "tiw/requests")',
        "  RetryInfo: retry in 1.25 s",
        '  Help: links { description: "docs" url: "https://x" }',
        "  detail of unknown type type.googleapis.com/example.Mystery (2 bytes)",
    ]


# --- metadata, -v and --watch ---

LONG = 3600.0  # seconds: a task that finishes only when the test says so
SNAPSHOT_APP = 1400123480


def running_snapshot(facade: Facade) -> str:
    """A snapshot task Running until ``finish_snapshot``, and the DescribeSnapshotTask JSON asking it."""
    task = facade.emulator.add_snapshot_task(sdk_app_id=SNAPSHOT_APP, run_seconds=LONG)
    return json.dumps({"SdkAppId": SNAPSHOT_APP, "TaskID": task})


def finish_snapshot(facade: Facade, query: str) -> None:
    facade.emulator.tasks.snapshots[SNAPSHOT_APP, json.loads(query)["TaskID"]].finishes = time.time()


async def test_max_age_reaches_the_facade_and_verbose_prints_the_source(facade: Facade) -> None:
    query = running_snapshot(facade)
    fresh = await tiw_call("DescribeSnapshotTask", query, "--target", facade.target, "--max-age", "0", "-v")
    assert fresh.code == 0
    assert re.fullmatch(r"tiw-source: upstream\ntiw-age-ms: \d+\n", fresh.err), fresh.err
    assert fresh.json()["Status"] == "Running"  # stdout is the answer alone, as without -v
    # A bound of a minute: the answer just kept, however slow this machine (the default is 2 s).
    kept = await tiw_call(
        "DescribeSnapshotTask", query, "--target", facade.target, "--metadata", "tiw-max-age-ms=60000", "-v"
    )
    assert kept.code == 0 and kept.json()["TaskID"] == fresh.json()["TaskID"]
    assert re.fullmatch(r"tiw-source: cache\ntiw-age-ms: \d+\n", kept.err), kept.err


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--caller", "not a name!"], "tiw-caller"),
        (["--metadata", "tiw-caller=not a name!"], "tiw-caller"),
        (["--max-age", "soon"], "tiw-max-age-ms"),
        (["--metadata", "tiw-max-age-ms=0", "--metadata", "tiw-max-age-ms=1"], "tiw-max-age-ms"),
    ],
)
async def test_metadata_the_facade_refuses_is_invalid_argument_naming_it(
    facade: Facade, flags: list[str], key: str
) -> None:
    query = running_snapshot(facade)
    ran = await tiw_call("DescribeSnapshotTask", query, "--target", facade.target, "-v", *flags)
    assert ran.code == 1 and ran.out == ""  # -v: a refusal has no tiw-source to print
    assert ran.err.startswith("error: INVALID_ARGUMENT: ")
    assert re.search(rf"^  BadRequest: field {key}: ", ran.err, re.MULTILINE), ran.err


async def test_a_named_caller_is_answered(facade: Facade) -> None:
    ran = await tiw_call(
        "DescribeSnapshotTask", running_snapshot(facade), "--target", facade.target, "--caller", "billing"
    )
    assert ran.code == 0 and ran.json()["Status"] == "Running"


async def test_idempotency_key_twice_replays_the_same_task(facade: Facade) -> None:
    create = json.dumps(SEED["requests"]["CreateSnapshotTask"])
    flags = ("--target", facade.target, "--idempotency-key", "lesson-42-snapshot", "-v")
    first = await tiw_call("CreateSnapshotTask", create, *flags)
    again = await tiw_call("CreateSnapshotTask", create, *flags)
    assert (first.code, first.err) == (0, "")  # sent: no tiw-source
    assert (again.code, again.err) == (0, "tiw-source: replay\n")
    assert again.json()["TaskID"] == first.json()["TaskID"]
    assert again.json()["RequestId"] == first.json()["RequestId"]
    assert facade.emulator.stats()["CreateSnapshotTask"].accepted == 1


async def read_line(process: asyncio.subprocess.Process) -> dict[str, Any]:
    """The next line of a --watch: one compact JSON object."""
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    assert line.endswith("\n") and ": " not in line and ", " not in line, line  # compact, one line
    answer = json.loads(line)
    assert isinstance(answer, dict)
    return answer


async def test_watch_prints_each_state_until_the_task_ends(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_MAX_STALENESS="0.2")  # a watched task refreshed at 0.18 s, not 1.8
    query = running_snapshot(facade)
    process = await start_call("DescribeSnapshotTask", query, "--watch", "--target", facade.target)
    running = await read_line(process)
    assert (running["TaskID"], running["Status"]) == (json.loads(query)["TaskID"], "Running")
    assert "FinishTime" not in running and running["RequestId"]  # the unary answer's JSON
    finish_snapshot(facade, query)
    finished = await read_line(process)
    assert finished["Status"] == "Finished" and finished["FinishTime"] > 0
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert (process.returncode, out, err) == (0, b"", b"")  # the stream ended after the final state


async def test_watch_of_an_unknown_task_fails_as_the_describe_does(facade: Facade) -> None:
    query = json.dumps({"SdkAppId": SNAPSHOT_APP, "TaskID": "no-such-task"})
    ran = await tiw_call("DescribeSnapshotTask", query, "--watch", "--target", facade.target)
    assert ran.code == 1 and ran.out == ""
    assert ran.err.startswith("error: NOT_FOUND: ")
    assert "  ErrorInfo: reason InvalidParameter.TaskNotFound, domain tiw.tencentcloudapi.com" in ran.err


async def test_ctrl_c_ends_a_watch_quietly(facade: Facade) -> None:
    process = await start_call(
        "DescribeSnapshotTask", running_snapshot(facade), "--watch", "--target", facade.target
    )
    assert (await read_line(process))["Status"] == "Running"
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert (process.returncode, out, err) == (130, b"", b"")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--metadata", "tiw-caller"], "not KEY=VALUE: 'tiw-caller'"),
        (["--metadata", "=billing"], "invalid metadata key ''"),
        (["--metadata", "Tiw-Caller=billing"], "invalid metadata key 'Tiw-Caller'"),
        (["--metadata", "tiw caller=billing"], "invalid metadata key 'tiw caller'"),
        (["--metadata", "grpc-timeout=1S"], "the grpc- prefix is gRPC's own"),
        (["--caller", "bïlling"], "not printable ASCII"),
        (["--watch"], "--watch takes a Describe action"),
        (["--timeout", "0"], "must be more than 0 seconds"),
    ],
)
async def test_bad_flags_are_usage_errors_and_send_nothing(
    facade: Facade, flags: list[str], says: str
) -> None:
    create = json.dumps(SEED["requests"]["CreateSnapshotTask"])
    ran = await tiw_call("CreateSnapshotTask", create, "--target", facade.target, *flags)
    assert ran.code == 2 and ran.out == ""
    assert ran.err.startswith("tiw-facade call: ") and says in ran.err, ran.err
    assert len(ran.err.splitlines()) == 1
    assert facade.emulator.stats()["CreateSnapshotTask"].accepted == 0
