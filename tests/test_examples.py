"""examples/python/: each example run as a user runs it (a subprocess, from the repository root),
twice in a row, against a real facade on the emulator."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
from support.facade import Facade, StartFacade
from tiw_facade.emulator import DEMO_CALLBACK_KEY, DEMO_CALLBACK_SDK_APP_IDS

# Each test runs a command-line program as a process of its own: left to `make test`.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples" / "python"


async def run_example(name: str, facade: Facade, *options: str) -> str:
    """The example's stdout; it must succeed with nothing on stderr. Asynchronous: the facade under
    test shares this event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        "--target",
        facade.target,
        *options,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, err.decode()) == (0, ""), out.decode()
    return out.decode()


def test_every_example_is_tested() -> None:
    tested = {
        "create_and_describe.py",
        "answer_metadata.py",
        "watch.py",
        "retry_create.py",
        "watch_events.py",
    }
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


async def test_create_and_describe(facade: Facade) -> None:
    for _ in range(2):  # twice in a row: a second run must not trip over the first one's task
        out = await run_example("create_and_describe.py", facade)
        first = out.splitlines()[0]
        assert re.fullmatch(r"created \S+: (Running|Finished)", first), out
        assert 'status: "' in out and "task_id: " in out  # the answer printed whole


async def test_answer_metadata(facade: Facade) -> None:
    for _ in range(2):
        out = await run_example("answer_metadata.py", facade)
        fresh, kept = out.splitlines()
        assert re.fullmatch(r"tiw-max-age-ms 0: \w+, tiw-source: upstream, tiw-age-ms: \d+", fresh), out
        assert re.fullmatch(r"tiw-max-age-ms 60000: \w+, tiw-source: cache, tiw-age-ms: \d+", kept), out


async def test_watch(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_MAX_STALENESS="0.2")  # a watched task refreshed at 0.18 s, not 1.8
    # The fixture's emulator finishes a snapshot task in 0.3 s: the watch may start on either state.
    for _ in range(2):
        lines = (await run_example("watch.py", facade)).splitlines()
        states = [line.split(": ")[1] for line in lines[:-1]]
        assert states in (["Running", "Finished"], ["Finished"]), lines
        assert len({line.split(": ")[0] for line in lines[:-1]}) == 1  # one task
        assert lines[-1] == "the task has ended"


async def test_retry_create(facade: Facade) -> None:
    for _ in range(2):  # a new key each run: a new task each run, each replayed once
        created, again = (await run_example("retry_create.py", facade)).splitlines()
        match = re.fullmatch(r"created (\S+)", created)
        assert match, created
        assert again == f"the same key again: {match[1]} (replayed)"


async def test_watch_events(start_facade: StartFacade, tmp_path: Path) -> None:
    """The task's callback, posted by the emulator to the facade's intake, reaches the subscriber;
    the second run resumes after the cursor the first kept, and gets its own task's event."""
    keys = ",".join(f"{app}={DEMO_CALLBACK_KEY}" for app in DEMO_CALLBACK_SDK_APP_IDS)
    facade = await start_facade(TIW_CALLBACK_PORT="0", TIW_CALLBACK_KEYS=keys)
    intake = f"http://127.0.0.1:{facade.server.callback_port}/callbacks/snapshot"
    cursor = tmp_path / "cursor"
    tasks = []
    for _ in range(2):
        out = await run_example(
            "watch_events.py", facade, "--callback-url", intake, "--cursor-file", str(cursor)
        )
        *events, described = out.splitlines()
        task, status = described.split(": ")
        assert events == [f"event SnapshotTaskFinished of {task}"], out
        assert status == "Finished"
        tasks.append(task)
        assert cursor.read_text()
    assert tasks[0] != tasks[1]
