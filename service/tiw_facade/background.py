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
from collections.abc import Iterable

# Between cancels: long enough for a loop to reach its next await, short against a shutdown.
RECANCEL_EVERY = 0.2


async def stop(tasks: Iterable[asyncio.Task[object] | asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again while one has not."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY)
