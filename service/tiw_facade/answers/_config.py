"""The few values the answers take from the facade's settings, and the one place that maps them.

``Config`` is what ``Answers`` and its pieces are built from, so a test makes one in a line
(``Config(max_staleness=0.2)``) without the environment ``Settings`` is loaded from. ``from_settings``
and ``shared_store`` are the only code that reads ``Settings`` for the answers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tiw_facade import shared_redis
from tiw_facade.answers._entries import Lifetimes
from tiw_facade.answers._shared import RedisAnswerStore

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics
    from tiw_facade.settings import Settings

# An answer is refreshed once this share of max_staleness old: just before a caller with the
# default bound would need a new one (the rest covers the round trip), and no sooner, since each
# refresh costs quota that other tasks may need.
REFRESH_AT = 0.9


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Seconds, unless named otherwise; the defaults are the settings' (docs/answers.md)."""

    max_staleness: float = 2.0  # TIW_MAX_STALENESS: the bound of a call that names none
    max_stale_on_saturation: float = 30.0  # TIW_MAX_STALE_ON_SATURATION
    terminal_ttl: float = 3600.0  # TIW_CACHE_TERMINAL_TTL
    not_found_ttl: float = 2.0  # TIW_CACHE_NOT_FOUND_TTL
    cache_entries: int = 16_384  # TIW_CACHE_ENTRIES (the default budget's): answers kept, keys noted wanted
    refresh_interest: float = 10.0  # TIW_REFRESH_INTEREST
    max_queue_wait: float = 5.0  # TIW_MAX_QUEUE_WAIT
    upstream_timeout: float = 10.0  # TIW_UPSTREAM_TIMEOUT
    callback_confirm_interval: float = 1.0  # TIW_CALLBACK_CONFIRM_INTERVAL
    refresh_after_with_callbacks: float = 0.0  # TIW_REFRESH_AFTER_WITH_CALLBACKS (0: as without)

    @classmethod
    def from_settings(cls, settings: Settings) -> Config:
        from tiw_facade.settings import configure

        ttls = {"terminal_ttl": settings.cache_terminal_ttl, "not_found_ttl": settings.cache_not_found_ttl}
        return configure(cls, settings, **ttls)

    @property
    def lifetimes(self) -> Lifetimes:
        return Lifetimes(
            terminal=self.terminal_ttl, not_found=self.not_found_ttl, changing=self.max_stale_on_saturation
        )

    @property
    def lease_seconds(self) -> float:
        """How long a flight holds its key's lease: from the moment it asks until it answers, so the
        longest wait for a slot plus the longest attempt. A replica that dies holding one delays the
        others' refresh of that key by this much, no more."""
        return self.max_queue_wait + self.upstream_timeout + 1.0

    @property
    def refresh_after(self) -> float:
        """How old an answer callers want is before spare quota refreshes it."""
        return REFRESH_AT * self.max_staleness

    def refresh_after_for(self, callbacks_flowing: bool) -> float:
        """``refresh_after``, or TIW_REFRESH_AFTER_WITH_CALLBACKS while callbacks of the action come
        (they tell of changes; the periodic refresh is then the fall-back for a lost one)."""
        if callbacks_flowing and self.refresh_after_with_callbacks > 0:
            return max(self.refresh_after, self.refresh_after_with_callbacks)
        return self.refresh_after


def shared_store(settings: Settings, config: Config, metrics: Metrics | None) -> RedisAnswerStore | None:
    """The Redis store the replicas share answers through, if the settings name one."""
    where = shared_redis.target(settings, "answers")
    if where is None:
        return None
    return RedisAnswerStore(
        shared_redis.connect(where),
        account=settings.account,
        lifetimes=config.lifetimes,
        max_bytes=settings.shared_answers_max_bytes,
        metrics=metrics,
        where=where.where,
    )
