"""Stopping the facade's background loops, even when a library swallows their cancellation.

A loop that waits on Redis can lose its CancelledError: redis-py's socket time-out (an
``asyncio.timeout`` inside the command) turns a cancellation that lands as the time-out expires
into a TimeoutError, which the loop takes for Redis being slow and goes on. Awaiting such a task
after one ``cancel()`` then hangs the shutdown (seen in the Cluster tests: the refresher's loops
sleeping on, their task still "cancelling"). So cancel again until each task has ended: a second
cancel lands at the loop's next await.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

# Between cancels: long enough for a loop to reach its next await, short against a shutdown.
RECANCEL_EVERY = 0.2


async def stop(tasks: Iterable[asyncio.Task[object] | asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again while one has not."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY)


class Every:
    """``check()`` every ``seconds``, in a task of its own, from ``start()`` until ``aclose()``: the
    loop of the files watched for a new version (credentials, the authorization policy)."""

    def __init__(self, seconds: float, check: Callable[[], Awaitable[None]], name: str) -> None:
        self._seconds = seconds
        self._check = check
        self._name = name
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def aclose(self) -> None:
        if self._task is not None:
            await stop([self._task])
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._seconds)
            await self._check()
