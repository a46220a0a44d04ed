"""The event log the settings ask for: the account's Redis Stream when the ``events`` role has a
Redis (TIW_EVENTS_REDIS_URL, else TIW_REDIS_URL), so every replica streams every event; else a ring
in this process, which sees only the callbacks this replica took."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tiw_facade import shared_redis
from tiw_facade.events import EventLog
from tiw_facade.events._memory import MemoryEventLog
from tiw_facade.events._redis import connect_log

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics
    from tiw_facade.settings import Settings


def open_log(settings: Settings, metrics: Metrics | None) -> EventLog:
    """The log, not yet connected (a Redis one connects on first use); ``aclose()`` it at the end."""
    where = shared_redis.target(settings, "events")
    if where is None:
        return MemoryEventLog(
            retention=settings.events_retention,
            max_events=settings.events_max,
            max_bytes=settings.events_max_bytes,
        )
    return connect_log(
        where,
        account=settings.account,
        retention=settings.events_retention,
        max_events=settings.events_max,
        max_bytes=settings.events_max_bytes,
        metrics=metrics,
    )
