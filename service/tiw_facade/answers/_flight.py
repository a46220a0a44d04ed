"""A flight: one request to TIW that every identical call in the meantime shares.

It belongs to no caller (a task of its own), so that callers leave on their own deadlines without
ending it for the others; ``sent`` tells a caller that leaves whether it was still waiting for a
rate-limit slot (saturation: a kept answer may stand in) or was with TIW.
"""

from __future__ import annotations

import asyncio
import time

from tiw_facade.answers._entries import Entry
from tiw_facade.failures import Outcome

# A caller's own request after a shared one found no slot is worth it only with this much more time.
MIN_LONGER = 0.05


class Flight:
    """One request to TIW that every identical call in the meantime shares."""

    __slots__ = ("deadline", "sent", "spare", "task")

    def __init__(self, spare: bool, deadline: float | None) -> None:
        self.spare = spare
        self.deadline = deadline  # time.monotonic() by which it must have a slot (its first caller's)
        self.sent = False  # a slot was granted: the request is on its way to TIW (or has been)
        self.task: asyncio.Task[tuple[Entry, bool]]  # the answer, and whether another replica fetched it

    def mark_sent(self) -> None:
        self.sent = True

    def outlived_by(self, deadline: float | None) -> bool:
        """Whether a caller with ``deadline`` can wait for a slot longer than this flight could."""
        if deadline is None:
            return self.deadline is not None
        return (
            self.deadline is not None
            and deadline - self.deadline > MIN_LONGER
            and deadline > time.monotonic()
        )


class Late(Exception):
    """A call's deadline came before the answer of the request it shares; ``outcome``: whether that
    request had been sent (UNKNOWN) or was still waiting for a slot, here or on another replica."""

    def __init__(self, message: str, outcome: Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome
