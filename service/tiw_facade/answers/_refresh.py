"""Spare quota spent on the answers callers keep asking for, least recently refreshed first.

One loop per shared action: take the due key from the refresh schedule (Redis's, shared by every
replica, while it answers; else the process's), then a slot the direct calls leave over
(``Limiter.try_spare``, which keeps TIW_REFRESH_RESERVE slots free), then fetch it through the same
flight a caller would join. Oldest answer first spreads the age of answers evenly when the quota
cannot keep them all young, instead of some tasks starving; an answer younger than 90% of
TIW_MAX_STALENESS is not refreshed (no quota spent on answers every caller would take anyway), nor,
while TIW's callbacks of the action come, younger than TIW_REFRESH_AFTER_WITH_CALLBACKS if set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from tiw_facade import background
from tiw_facade.answers import _policy
from tiw_facade.answers._config import Config
from tiw_facade.answers._entries import Key, StoreUnavailable
from tiw_facade.answers._stores import Stores

log = logging.getLogger("tiw_facade.answers")

# Nothing due: look again this soon (a new key is wanted within this of its first call).
IDLE = 0.1
# No spare slot: ask again this soon (tokens come back a window after each answer, all the time).
NO_SPARE = 0.05


class Refresher:
    """``refresh(key)`` (its lease taken; True: answered, False: failed, None: no spare slot) for each
    key of ``actions`` due in ``stores``' schedule, once ``config.refresh_after`` seconds old; and
    ``tell()`` every IDLE, so that the schedule knows what is wanted."""

    def __init__(
        self,
        stores: Stores,
        refresh: Callable[[Key], Awaitable[bool | None]],
        tell: Callable[[], Awaitable[None]],
        config: Config,
        *,
        actions: Sequence[str] = tuple(sorted(_policy.RESPONSES)),
        clock: Callable[[], float],
        callbacks_flowing: Callable[[str], bool] = lambda action: False,
    ) -> None:
        self._stores = stores
        self._refresh = refresh
        self.tell = tell  # public: a test steps the refresher by tell() and once(action)
        self._actions = tuple(actions)
        self._config = config
        self._callbacks_flowing = callbacks_flowing
        self._lease_seconds = config.lease_seconds
        self._clock = clock

    async def run(self) -> None:
        loops = [
            asyncio.create_task(self._loop(action), name=f"refresh-{action}") for action in self._actions
        ]
        try:
            while True:
                await self.tell()
                await asyncio.sleep(IDLE)
        finally:
            await background.stop(loops)

    async def _loop(self, action: str) -> None:
        while True:
            try:
                pause = await self.once(action)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: the loop must outlive it, callers still get answers
                log.exception("refresh failed", extra={"action": action})
                pause = 1.0
            await asyncio.sleep(pause)  # 0: let the callers' tasks run between refreshes

    async def once(self, action: str) -> float:
        """Refresh one key if one is due and a spare slot is free; how long to pause before the next."""
        store = self._stores.schedule()
        now = self._clock()
        after = self._config.refresh_after_for(self._callbacks_flowing(action))
        try:
            key = await store.next_due(action, older_than=now - after, lease=self._lease_seconds, now=now)
        except StoreUnavailable as exc:
            self._stores.failed(exc)
            return IDLE
        if key is None:
            return IDLE
        refreshed = await self._refresh(key)  # gives the key's lease up when it ends
        return NO_SPARE if refreshed is None else 0.0
