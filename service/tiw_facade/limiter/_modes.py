"""The shared limiter's modes: what each admits, and the one place where a replica changes mode.

docs/limiter.md says why each mode exists and why together they keep the fleet within the limit.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tiw_facade.metrics import GaugeChild

log = logging.getLogger("tiw_facade.limiter")


class Mode(enum.Enum):
    """A replica's relation to Redis, with the policies that follow from it."""

    #            label         asks Redis  local share  tells Redis  heartbeats
    SHARED = ("shared", True, False, True, True)
    SUSPECT = ("suspect", False, False, False, False)
    DEGRADED = ("degraded", False, True, False, False)
    RECOVERING = ("recovering", True, True, True, True)

    def __init__(
        self, label: str, asks_redis: bool, local_share: bool, tells_redis: bool, beats: bool
    ) -> None:
        self.label = label
        # An admission needs Redis's yes.
        self.asks_redis = asks_redis
        # An admission needs room in this replica's local share (counting every token it holds).
        self.local_share = local_share
        # Releases and pauses go to Redis now; otherwise they wait for the next seed.
        self.tells_redis = tells_redis
        # The watcher refreshes this replica's registration; otherwise it only pings, so that a
        # replica admitting locally never looks registered again before its tokens are in Redis.
        self.beats = beats

    @property
    def admits(self) -> bool:
        return self.asks_redis or self.local_share

    @property
    def degraded(self) -> bool:
        return self is Mode.DEGRADED


@dataclasses.dataclass(slots=True)
class Stamps:
    """The moments the modes turn on (the machine's clock)."""

    entered: float = 0.0  # the current mode
    failing_since: float = 0.0  # SUSPECT: first failure since Redis last answered
    degraded_since: float = 0.0
    local_from: float = 0.0  # DEGRADED, RECOVERING: no local admission before this
    local_until: float = math.inf  # DEGRADED: no local lease may come back after this
    shared_at: float = math.inf  # RECOVERING: Redis's count is complete again (inf: seed pending)


# What a transition says, by the mode entered: level and message (formatted with ``facts``).
_LOGS: dict[Mode, tuple[int, str]] = {
    Mode.SUSPECT: (logging.DEBUG, "rate limiter: Redis at {where} {error}; callers wait"),
    Mode.DEGRADED: (
        logging.WARNING,
        "rate limiter: Redis at {where} {error}; limiting locally to {share} per "
        "{window:g}s per action until it is back, none for the first {quarantine:.1f}s (what other "
        "replicas took just now is unknown)",
    ),
    Mode.RECOVERING: (
        logging.INFO,
        "rate limiter: Redis at {where} reachable again after {outage:.1f}s; it is told what this "
        "replica holds, then shared limiting resumes in {hold_off:.1f}s",
    ),
    Mode.SHARED: (
        logging.DEBUG,
        "rate limiter: every replica has had time to seed Redis; shared limiting resumed",
    ),
}

# DEGRADED without a registration in Redis that others keep room for (it never joined).
_UNREGISTERED = (
    "rate limiter: Redis at {where} {error}; admitting nothing until it is back (this "
    "replica never registered there, so the others keep no room for a local share)"
)


class Machine:
    """The current mode and its stamps. ``enter`` is every transition: it logs, sets the degraded
    gauge and wakes whoever waits on the mode (the pumps, the watcher)."""

    def __init__(self, *, gauge: GaugeChild, wake: Callable[[], None], facts: dict[str, object]) -> None:
        self.mode = Mode.SHARED
        self.stamps = Stamps()
        self._gauge = gauge
        self._wake = wake
        self.facts = facts  # where, share, window, hold_off, error (shared_redis.describe): for the log lines
        gauge.set(0)

    def enter(self, mode: Mode, now: float, **stamps: float) -> None:
        was = self.mode
        self.mode = mode
        self.stamps.entered = now
        for name, value in stamps.items():
            setattr(self.stamps, name, value)
        self._gauge.set(1 if mode.degraded else 0)
        level, message = _LOGS[mode]
        if mode is Mode.RECOVERING and was is not Mode.DEGRADED:
            level = logging.DEBUG  # a blip or a restart nobody had to degrade for: not news
        if mode is Mode.DEGRADED and self.stamps.local_until <= self.stamps.local_from:
            message = _UNREGISTERED
        outage = now - (self.stamps.degraded_since if was is Mode.DEGRADED else self.stamps.failing_since)
        quarantine = self.stamps.local_from - now
        if log.isEnabledFor(level):
            log.log(level, message.format(outage=outage, quarantine=quarantine, **self.facts))
        self._wake()

    def effective(self, now: float) -> Mode:
        """The mode as of ``now``, without changing anything (RECOVERING past its hold-off reads as
        SHARED until someone who may change state calls ``settle``)."""
        if self.mode is Mode.RECOVERING and now >= self.stamps.shared_at:
            return Mode.SHARED
        return self.mode

    def settle(self, now: float) -> Mode:
        """The mode as of ``now``, entering SHARED when RECOVERING's hold-off has passed."""
        mode = self.effective(now)
        if mode is not self.mode:
            self.enter(mode, now)
        return mode
