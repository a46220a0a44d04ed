"""TIW's callbacks made into answers: a task a callback says changed is asked again at once, and the
watchers of every replica see the new answer as soon as it is kept.

An event is never taken for a state. TIW's Sign covers its key and the expiry, not the body: whoever
saw one signed callback may post any body under it until it expires. An event only says "ask TIW
again now" (``hint``), and what a hint may cost is bounded:

- a task with no answer kept and no watcher here costs nothing: the next call asks TIW anyway;
- a terminal answer is never asked again: it cannot change;
- otherwise one Describe per task per ``interval`` (TIW_CALLBACK_CONFIRM_INTERVAL), across replicas
  (a turn taken in Redis): a hint within another's turn is confirmed at the turn's end, once, so
  the last change is always seen; taken from spare quota first, from the reserve if need be;
- at most ``max_pending`` tasks wait for their turn in this process; beyond, a hint is dropped
  (counted ``failed``) and the periodic refresh stays the fall-back.

Every replica follows the event log, the confirming one included; a replica with watchers of the
task (``expect``) reads Redis every EXPECT_POLL for the confirmed answer rather than at its
watchers' usual 0.25 s, so that they see it within a fraction of a second of the callback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from tiw_facade.answers._entries import Key, StoreUnavailable
from tiw_facade.answers._stores import Stores
from tiw_facade.metrics import Metrics

log = logging.getLogger("tiw_facade.answers")

# A watched task's confirmed answer is looked for in Redis this often, for at most EXPECT_FOR.
EXPECT_POLL = 0.02
EXPECT_FOR = 3.0


class Confirmations:
    """``confirm(key)`` (True: TIW answered) run for the hinted keys, as bounded above.
    ``watched(key)``: whether a watcher of ``key`` is open here."""

    def __init__(
        self,
        stores: Stores,
        confirm: Callable[[Key], Awaitable[bool]],
        watched: Callable[[Key], bool],
        *,
        interval: float,
        max_pending: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stores = stores
        self._confirm = confirm
        self._watched = watched
        self.interval = interval
        self._max_pending = max_pending
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        # Keys whose confirmation has not taken its turn yet: a hint meanwhile is folded into it.
        self._waiting: dict[Key, asyncio.Task[None]] = {}
        self._expecting: dict[Key, asyncio.Task[None]] = {}
        self._turns: dict[Key, float] = {}  # without Redis: when each key's turn ends (monotonic)

    def hint(self, key: Key) -> None:
        """A callback says ``key``'s task changed: confirm it (in the background)."""
        outcomes = self._metrics.callback_confirms
        if key in self._waiting:
            outcomes.labels(action=key.action, outcome="deferred").inc()
            return
        if len(self._waiting) >= self._max_pending:
            outcomes.labels(action=key.action, outcome="failed").inc()
            return
        self._waiting[key] = asyncio.create_task(self._when_due(key), name=f"confirm-{key.action}")

    def expect(self, key: Key, since: float) -> None:
        """Another replica took a callback of ``key`` at ``since``: if ``key`` is watched here, look
        for the answer it confirms, so the watchers see it at once."""
        if not self._watched(key) or key in self._expecting or key in self._waiting:
            return
        if self._stores.shared is None or len(self._expecting) >= self._max_pending:
            return
        self._expecting[key] = asyncio.create_task(self._expected(key, since), name=f"expect-{key.action}")

    async def aclose(self) -> None:
        tasks = [*self._waiting.values(), *self._expecting.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _when_due(self, key: Key) -> None:
        outcomes = self._metrics.callback_confirms
        try:
            cached = await self._stores.lookup(key)
            if cached is not None and cached.terminal:
                return
            if cached is None and not self._watched(key):
                return  # nothing kept to correct, nobody waiting: the next call asks TIW itself
            deferred = False
            while (wait := await self._claim(key)) > 0:
                if not deferred:
                    outcomes.labels(action=key.action, outcome="deferred").inc()
                    deferred = True
                await asyncio.sleep(wait)
        finally:
            # From here on a new hint is a new confirmation (this one may already be on its way).
            self._waiting.pop(key, None)
        try:
            confirmed = await self._confirm(key)
        except Exception:  # a bug: the hint is lost, the periodic refresh still covers the key
            log.exception("confirming a callback failed", extra={"action": key.action})
            confirmed = False
        outcomes.labels(action=key.action, outcome="sent" if confirmed else "failed").inc()

    async def _claim(self, key: Key) -> float:
        """0 if ``key``'s turn is ours now, else the seconds until the current turn ends."""
        shared = self._stores.shared
        if shared is not None and self._stores.usable:
            try:
                return await shared.claim(key, self.interval)
            except StoreUnavailable as exc:
                self._stores.failed(exc)
        now = self._monotonic()
        if len(self._turns) >= self._max_pending:
            self._turns = {k: end for k, end in self._turns.items() if end > now}
        end = self._turns.get(key, 0.0)
        if end > now:
            return end - now
        self._turns[key] = now + self.interval
        return 0.0

    async def _expected(self, key: Key, since: float) -> None:
        try:
            end = self._monotonic() + EXPECT_FOR
            while self._monotonic() < end and self._watched(key):
                await asyncio.sleep(EXPECT_POLL)
                found = await self._stores.lookup(key)  # adopts (and publishes) a newer answer
                if found is not None and found.answered_at >= since:
                    return
        except StoreUnavailable:
            return
        finally:
            self._expecting.pop(key, None)
