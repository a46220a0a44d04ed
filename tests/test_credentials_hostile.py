"""The credentials file when the path names something else: a FIFO, a huge file, a secret cut short.

A real facade answers real calls through the emulator while a Secret-volume-shaped directory is
swapped to each of them. Whatever the path names, no call fails (the previous credentials keep
signing), and the event loop never stalls: a task ticking every few milliseconds measures how late
it woke. Read on the event loop, a FIFO hung every call until SIGTERM and a huge file stalled them
for seconds; a secret cut short was taken into use and failed every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from support.credentials import FRESH, REQUEST, Running, SecretVolume, emulating, keyless_environment, profile
from support.credentials import running_facade as running_facade_of
from support.waiting import wait_until
from tiw_facade import credentials, settings
from tiw_facade.emulator import Emulator
from tiw_facade.server import FacadeServer

# A Tencent long-term key's shape: "AKID" and 32 alphanumerics; a SecretKey of 32.
GOOD = ("AKID" + "Good" * 8, "good" * 8)
NEXT = ("AKID" + "Next" * 8, "next" * 8)
# How late a tick may wake. Reading on the loop stalled it 2.4 s on a FIFO (until released_fifos let
# it go: forever in production) and 99 s on the 300 MB file under these calls. A loop that waits for
# nothing was still measured 0.17 s late on a shared 2-core machine under load (the process not
# scheduled), so the bound is generous rather than 50 ms: what it tells apart is seconds from none.
MAX_STALL = 0.5
TICK = 0.005
MiB = 1 << 20


def fifo(path: Path) -> None:
    os.mkfifo(path)


def huge(path: Path) -> None:
    """300 MB (a valid profile, then holes: sparse, so it costs no disk)."""
    with path.open("wb") as file:
        file.write(profile(NEXT).encode())
        file.truncate(300 * MiB)


def cut_short(path: Path) -> None:
    """Half written: the new secret cut in the middle, as a reader may find a file being written."""
    path.write_text(profile(NEXT)[:-10])


@contextlib.contextmanager
def released_fifos(root: Path, after: float = 3.0) -> Iterator[list[Path]]:
    """Should a reader block in open() on a FIFO under ``root`` (the event loop, reading the way it
    once did), let it go after ``after`` seconds by opening the other end, and list the FIFO among
    those released: the test then fails on the stall instead of hanging. A reader that never opens
    a FIFO never meets this, and the list stays empty."""
    done = threading.Event()
    released: list[Path] = []

    def release() -> None:
        if done.wait(after):
            return
        while not done.wait(0.02):
            for path in root.rglob("credentials"):
                with contextlib.suppress(OSError):  # ENXIO: nobody is reading it; not a FIFO
                    if path.is_fifo():
                        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                        released.append(path)  # the open succeeded: someone was blocked reading it

    thread = threading.Thread(target=release, name="fifo-release", daemon=True)
    thread.start()
    try:
        yield released
    finally:
        done.set()
        thread.join()


class LoopLag:
    """The longest the event loop kept a task waiting past the moment it was due to wake."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + TICK
            await asyncio.sleep(TICK)
            self.worst = max(self.worst, loop.time() - due)

    @contextlib.asynccontextmanager
    async def measuring(self) -> AsyncIterator[LoopLag]:
        task = asyncio.create_task(self._tick())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclasses.dataclass
class Calls:
    """Calls made one after another until stopped, and those that failed."""

    done: int = 0
    failures: list[grpc.aio.AioRpcError] = dataclasses.field(default_factory=list)


@contextlib.asynccontextmanager
async def calling(running: Running) -> AsyncIterator[Calls]:
    calls = Calls()
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            try:
                await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
                calls.done += 1
            except grpc.aio.AioRpcError as error:
                calls.failures.append(error)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(loop())
    try:
        yield calls
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def facade_on(volume: SecretVolume) -> AsyncIterator[tuple[Emulator, Running]]:
    async with emulating(credentials=dict([GOOD, NEXT]), rate_limit=10_000) as emulator:
        environ = keyless_environment(
            emulator.url,
            TENCENTCLOUD_CREDENTIALS_FILE=str(volume.path),
            TIW_CREDENTIALS_POLL="0.05",
            TIW_RATE_LIMIT="10000",
            TIW_RATE_LIMIT_ACCOUNT="test",
        )
        async with running_facade_of(environ) as running:
            yield emulator, running


@pytest.mark.slow
@pytest.mark.parametrize("make", [fifo, huge, cut_short], ids=["fifo", "300MB", "cut-short"])
async def test_a_hostile_file_swapped_in_is_ignored_without_a_stall_or_a_failed_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make: Callable[[Path], None]
) -> None:
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(profile(GOOD))
    failures = "tiw_credentials_refresh_failures_total"
    with released_fifos(volume.root):
        async with facade_on(volume) as (emulator, running), calling(running) as calls:
            await wait_until(lambda: emulator.signers[GOOD[0]] >= 5)
            with caplog.at_level(logging.WARNING, logger="tiw_facade.credentials"):
                async with LoopLag().measuring() as lag:
                    volume.publish_with(make)
                    await wait_until(lambda: running.metric(failures) >= 1)
                    signed = emulator.signers[GOOD[0]]
                    await asyncio.sleep(0.3)  # several polls of the same version, and calls
                assert lag.worst < MAX_STALL, f"the event loop stalled {lag.worst:.3f}s"
                assert emulator.signers[GOOD[0]] > signed, "calls went on, signed by the good key"
                assert running.metric(failures) == 1, "one bad version, counted once"
                assert running.metric("tiw_credentials_refreshes_total") == 0
                (record,) = [r for r in caplog.records if r.name == "tiw_facade.credentials"]
                assert record.levelno == logging.WARNING and "ignored" in record.getMessage()
                assert "next" not in str(vars(record)), "no secret in the log line"

            volume.publish(profile(NEXT))  # a good version after it is taken
            await wait_until(lambda: emulator.signers[NEXT[0]] >= 3)
            assert running.metric("tiw_credentials_refreshes_total") == 1
        assert calls.failures == [] and calls.done > 20


@pytest.mark.parametrize(
    ("make", "complaint"),
    [(fifo, "not a regular file"), (huge, "larger than 65536 bytes"), (cut_short, "end in a newline")],
    ids=["fifo", "300MB", "cut-short"],
)
async def test_a_hostile_file_at_start_fails_the_start_at_once_saying_why(
    tmp_path: Path, make: Callable[[Path], None], complaint: str
) -> None:
    volume = SecretVolume(tmp_path / "secret")
    volume.publish_with(make)
    environ = keyless_environment("http://127.0.0.1:1", TENCENTCLOUD_CREDENTIALS_FILE=str(volume.path))
    server = FacadeServer(settings.load(environ))
    with released_fifos(volume.root) as released, pytest.raises(credentials.CredentialsError) as caught:
        await server.start()
    await server.stop(0)
    assert f"{volume.path}: " in str(caught.value) and complaint in str(caught.value)
    assert "next" not in str(caught.value)
    assert not released, "the start blocked opening a FIFO"


def test_a_fifo_put_in_place_between_the_stat_and_the_open_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stat saw a regular file; by the open, the path names a FIFO with no writer: an open that
    # blocked would wait for one forever (here, until released_fifos lets it go).
    regular, path = tmp_path / "regular", tmp_path / "credentials"
    regular.write_text(profile(GOOD))
    os.mkfifo(path)
    real_stat = os.stat
    monkeypatch.setattr(
        os, "stat", lambda p, *a, **k: real_stat(regular if str(p) == str(path) else p, *a, **k)
    )
    with (
        released_fifos(tmp_path) as released,
        pytest.raises(credentials.CredentialsError, match="not a regular file"),
    ):
        credentials._load(str(path))
    assert not released, "the read blocked opening a FIFO"
