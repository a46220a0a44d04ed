"""A flight: one request to TIW that every identical call in the meantime shares.

It belongs to no caller (a task of its own), so that callers leave on their own deadlines without
ending it for the others; ``sent`` tells a caller that leaves whether it was still waiting for a
rate-limit slot (saturation: a kept answer may stand in) or was with TIW.

``sent_at`` is also what a flight's answer is as new as: TIW's state is somewhere between the send
and the answer, so the send is all that is proven. A caller whose bound reaches back less far than
that may not join it (``joinable``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tiw_facade.answers._entries import Entry
from tiw_facade.failures import Outcome

# A caller's own request after a shared one found no slot is worth it only with this much more time.
MIN_LONGER = 0.05


class Flight:
    """One request to TIW that every identical call in the meantime shares."""

    __slots__ = ("_clock", "deadline", "sent_at", "spare", "task")

    def __init__(
        self, spare: bool, deadline: float | None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.spare = spare
        self.deadline = deadline  # time.monotonic() by which it must have a slot (its first caller's)
        self._clock = clock  # the answers' wall clock: sent_at is compared with entries' times
        # When the latest attempt got its slot (it was sent next); None while none has.
        self.sent_at: float | None = None
        self.task: asyncio.Task[tuple[Entry, bool]]  # the answer, and whether another replica fetched it

    @property
    def sent(self) -> bool:
        """A slot was granted: the request is on its way to TIW (or has been)."""
        return self.sent_at is not None

    def mark_sent(self) -> None:
        self.sent_at = self._clock()

    def sent_since(self, begun: float) -> float:
        """The send time of the request begun at ``begun``: its latest attempt's slot; ``begun`` if
        none was marked since, which can only make the answer look older than it is, never newer."""
        return self.sent_at if self.sent_at is not None and self.sent_at >= begun else begun

    def joinable(self, arrival: float, bound: float) -> bool:
        """Whether a caller arriving at ``arrival`` that takes nothing older than ``bound`` seconds may
        share this flight: unsent (it will be sent after the caller arrived), or sent within the bound.
        Another replica's request this flight waits for counts as unsent: its answer is checked
        against the caller's bound when it comes."""
        return self.sent_at is None or arrival - self.sent_at <= bound

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
