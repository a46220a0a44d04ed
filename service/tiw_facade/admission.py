"""How one attempt at TIW gets its rate-limit slot, chosen per call by what the call is for.

- ``Queued``: wait in the limiter's queue, as the caller's share (call_record.CURRENT_SHARE) with its
  weight (TIW_CALLER_WEIGHTS), until the call's deadline: every call a caller makes.
- ``Spare``: only quota that direct calls leave (TIW_REFRESH_RESERVE slots kept free), at once or
  not at all (``NoSpareQuota``): the answer cache's refreshes.

Either may see its attempts through (``sees_through``): the deadline then bounds the wait for a slot
and when an attempt may start, and an attempt once sent waits for TIW's answer TIW_UPSTREAM_TIMEOUT
whatever the deadline (a create, whose task exists whether or not anyone reads the answer; a request
other callers share). ``on_admitted`` is told when an attempt has its slot and is sent next.

The limiter's refusals become the failures module's here, and only here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from tiw_facade.call_record import CURRENT_SHARE
from tiw_facade.failures import NoSpareQuota, RateLimited, ShuttingDown
from tiw_facade.limiter import LimiterClosed, QuotaExceeded

if TYPE_CHECKING:
    from tiw_facade.limiter import Lease, Limiter


class Admission(Protocol):
    @property
    def sees_through(self) -> bool: ...

    async def lease(self, action: str, *, deadline: float, hold: float) -> Lease:
        """A token for one attempt, held ``hold`` seconds unless released; waiting until
        ``deadline`` (``time.monotonic()``) at most."""
        ...

    def admitted(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Queued:
    limiter: Limiter
    weights: Mapping[str, int]
    sees_through: bool = False
    on_admitted: Callable[[], None] | None = None

    async def lease(self, action: str, *, deadline: float, hold: float) -> Lease:
        # Keyed on the share, not the claimed name: invented names must not each get a turn.
        share = CURRENT_SHARE.get()
        try:
            return await self.limiter.acquire(
                action, deadline=deadline, hold=hold, caller=share, weight=self.weights.get(share, 1)
            )
        except QuotaExceeded as exc:
            raise RateLimited(exc.action, exc.reason, exc.retry_after) from exc
        except LimiterClosed as exc:
            raise ShuttingDown() from exc

    def admitted(self) -> None:
        if self.on_admitted is not None:
            self.on_admitted()


@dataclasses.dataclass(frozen=True, slots=True)
class Spare:
    limiter: Limiter
    reserve: int
    sees_through: bool = True  # whoever waits for a refresh's answer shares it
    on_admitted: Callable[[], None] | None = None

    async def lease(self, action: str, *, deadline: float, hold: float) -> Lease:
        try:
            lease = await self.limiter.try_spare(action, hold=hold, reserve=self.reserve)
        except LimiterClosed as exc:
            raise ShuttingDown() from exc
        if lease is None:
            raise NoSpareQuota(action)
        return lease

    def admitted(self) -> None:
        if self.on_admitted is not None:
            self.on_admitted()
