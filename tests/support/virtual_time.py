"""An asyncio event loop whose time is a :class:`VirtualClock`, and which jumps that clock to its next
timer whenever it has nothing else to do.

For code that waits on timers and does no I/O (the in-process limiter): a test awaits it as usual,
every ``call_later`` and ``asyncio.sleep`` fires at its exact virtual instant, none takes real time,
and the test asserts exact durations (``clock() - started == pytest.approx(0.5)``) that a loaded
machine cannot stretch. The code under test must read the same clock (pass it ``clock``); the loop's
``time()`` is that clock.

    @in_virtual_time
    async def test_something(clock: VirtualClock) -> None:
        ...

makes a plain (synchronous) test of it, run on a loop of its own with a fresh clock at 1000.0.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any

from support.clock import VirtualClock

# Real seconds the loop may sit with no timer and nothing ready before the test counts as stuck:
# with no I/O in play, nothing can wake it then.
STUCK_AFTER = 10.0


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that, instead of blocking until the loop's next timer, moves the clock to it."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            # No timer at all: only another thread (call_soon_threadsafe, an executor) can wake us.
            ready = super().select(STUCK_AFTER)
            if not ready:
                raise RuntimeError(f"virtual time: nothing scheduled and nothing ready for {STUCK_AFTER:g} s")
            return ready
        self._clock.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(_JumpingSelector(clock))
        self._virtual_clock = clock

    def time(self) -> float:
        return self._virtual_clock()


def run(scenario: Callable[[VirtualClock], Coroutine[Any, Any, None]], start: float = 1000.0) -> None:
    """Run ``scenario(clock)`` to its end on a loop of its own, in virtual time from ``start``."""
    clock = VirtualClock(start)
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(clock)) as runner:
        runner.run(scenario(clock))


def in_virtual_time(test: Callable[[VirtualClock], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """A synchronous test that runs the coroutine test ``test(clock)`` in virtual time (see above).

    pytest-asyncio leaves it alone (it is no coroutine function); marks and the docstring carry over.
    """

    def virtual_test() -> None:
        run(test)

    # Not functools.wraps: pytest would follow __wrapped__ and ask for a fixture named ``clock``.
    virtual_test.__name__ = test.__name__
    virtual_test.__qualname__ = test.__qualname__
    virtual_test.__doc__ = test.__doc__
    virtual_test.__module__ = test.__module__
    virtual_test.__dict__.update(test.__dict__)
    return virtual_test
