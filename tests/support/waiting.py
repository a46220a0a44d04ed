"""Waiting for another component's state, polled: for what no event tells the test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``condition`` (state of another component, e.g. the emulator's counters) until true."""
    end = time.monotonic() + within
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
