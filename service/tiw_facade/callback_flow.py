"""Where a verified callback goes: into the event log once (the intake answers TIW 200 only then),
then to the answers as a hint. Every replica follows the log: another replica's event makes this
one's watchers of the task look for the confirmed answer at once (``Answers.changed``), and WatchEvents
subscribers read the same log (event_watch.py).

The intake (callback_intake.py) knows HTTP and the log; the answers know nothing of callbacks but
``changed``; this module is the one place that joins them.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from tiw_facade.answers import Answers
from tiw_facade.events import CONFIRMING_ACTION, CursorExpired, Event, EventLog, EventLogUnavailable

log = logging.getLogger("tiw_facade.callbacks")

# Cursors of the events this replica took, remembered so that following the log does not hint them
# twice: enough for every event a burst may append before the follower reads them.
MINE = 4096
# Following the log failed (Redis down): try again this soon.
RETRY = 1.0


class CallbackFlow:
    """``take`` is the intake's: append, then hint. ``run`` follows the log for the others' events."""

    def __init__(self, log: EventLog, answers: Answers) -> None:
        self._log = log
        self._answers = answers
        self._mine: collections.deque[str] = collections.deque(maxlen=MINE)
        self._mine_set: set[str] = set()

    async def take(self, event: Event) -> Event | None:
        """``event`` appended once (None: already taken), and hinted. Raises EventLogUnavailable."""
        taken = await self._log.append(event)
        if taken is None:
            return None
        self._remember(taken.cursor)
        self._changed(taken, here=True)
        return taken

    async def run(self) -> None:
        """Forever: the events other replicas take, from now on; after a failure, from the last one
        seen (or from then, if the log no longer holds it: the periodic refresh covers the rest)."""
        after: str | None = None
        while True:
            try:
                async for event in self._log.follow(after):
                    after = event.cursor
                    if event.cursor in self._mine_set:
                        continue
                    self._changed(event, here=False)
            except CursorExpired:
                after = None
            except EventLogUnavailable as exc:
                log.warning("following the event log failed (%s); again in %.0f s", exc, RETRY)
            await asyncio.sleep(RETRY)

    def _changed(self, event: Event, *, here: bool) -> None:
        action = CONFIRMING_ACTION.get(event.kind)
        if action is None or not event.task_id:
            return  # nothing to confirm: an event of no task (WatchEvents subscribers still get it)
        try:
            self._answers.changed(
                action, event.sdk_app_id, event.task_id, received_at=event.received_at, here=here
            )
        except ValueError:  # an SdkAppId no Describe request can carry: no task of ours
            log.info("an event of no task that can be described", extra={"kind": event.kind})

    def _remember(self, cursor: str) -> None:
        if len(self._mine) == self._mine.maxlen:
            self._mine_set.discard(self._mine[0])
        self._mine.append(cursor)
        self._mine_set.add(cursor)
