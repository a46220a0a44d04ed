"""Answers to Describe calls shared across callers: coalesced, cached with their age, refreshed, watched
(docs/answers.md). Knows nothing of gRPC: the handler and the watcher put this behind RPCs.

``Answers`` composes the pieces: ``_coalesce`` (one flight per key, shared by the callers meanwhile,
owned by none), ``_flights`` (what a flight does; ``_peers``: another replica's answer), ``_stores``
(the process's ``_local`` and Redis's ``_shared``, with the fall-back, ``_contact``), ``_interest``
(the keys callers and watchers want), ``_refresh`` (spare quota spent on them), ``_topics`` (the
watches), ``_confirm`` (TIW's callbacks as hints), ``_policy`` (TIW's facts) and ``_config`` (what
the settings give them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from google.protobuf.message import Message

from tiw_facade import background
from tiw_facade.answers import _policy
from tiw_facade.answers._coalesce import Late
from tiw_facade.answers._config import Config, shared_store
from tiw_facade.answers._confirm import Confirmations
from tiw_facade.answers._entries import Entry, Key, Served, Source
from tiw_facade.answers._flights import Fetch, Flights
from tiw_facade.answers._interest import Interest
from tiw_facade.answers._local import LocalStore
from tiw_facade.answers._refresh import Refresher
from tiw_facade.answers._shared import RedisAnswerStore
from tiw_facade.answers._stores import Stores
from tiw_facade.answers._topics import Topics, Watch
from tiw_facade.failures import Outcome, RateLimited, ShuttingDown, UpstreamTimeout
from tiw_facade.metrics import Metrics

SHARED_ACTIONS = frozenset(_policy.RESPONSES)
# An action's callbacks "flow" for this long after the last one (TIW_REFRESH_AFTER_WITH_CALLBACKS).
CALLBACKS_FLOW_FOR = 60.0


class Answers:
    """``shared``: the Redis store replicas share answers through (None: each process on its own).
    ``clock``: the wall clock answers' times are on; ``monotonic``: the clock of callers' deadlines."""

    def __init__(
        self,
        config: Config,
        fetch: Fetch,
        *,
        metrics: Metrics | None = None,
        shared: RedisAnswerStore | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._metrics = metrics = metrics or Metrics.unobserved()
        self._clock = clock
        self._monotonic = monotonic
        self._topics = Topics()
        local = LocalStore(config.lifetimes, max_entries=config.cache_entries, metrics=metrics, clock=clock)
        self._stores = Stores(local, shared, publish=self._topics.publish, clock=clock)
        self._flights = Flights(
            fetch, self._stores, config, metrics=metrics, clock=clock, monotonic=monotonic
        )
        self._interest = Interest(self._stores, lasts=config.refresh_interest, max_keys=config.cache_entries)
        self._callbacks_at: dict[str, float] = {}  # action -> monotonic() of its last callback
        self.refresher = Refresher(
            self._stores,
            self._flights.refresh,
            self._interest.tell,
            config,
            clock=clock,
            callbacks_flowing=self._callbacks_flowing,
        )
        self._confirmations = Confirmations(
            self._stores,
            self._flights.confirm,
            self._topics.__contains__,
            interval=config.callback_confirm_interval,
            max_pending=config.cache_entries,
            metrics=metrics,
            clock=clock,
            monotonic=monotonic,
        )
        self._background: list[asyncio.Task[None]] = []

    @staticmethod
    def shares(action: str) -> bool:
        """Whether calls of ``action`` go through here (the Describe actions)."""
        return action in SHARED_ACTIONS

    async def start(self) -> None:
        contact = self._stores.contact
        if self._stores.shared is not None:
            await contact.beat()  # the marker written before the first call
        watched = self._interest.keep_watched(self._topics, self._clock)
        self._background = [
            asyncio.create_task(contact.run(), name="answers-contact"),
            asyncio.create_task(self.refresher.run(), name="answers-refresher"),
            asyncio.create_task(watched, name="answers-watched"),
        ]

    def begin_drain(self) -> None:
        """Open watches end with ShuttingDown, new ones are refused; calls are still answered."""
        self._topics.drain()

    async def aclose(self) -> None:
        self.begin_drain()
        await self._confirmations.aclose()
        await background.stop(self._background)
        # Each flight is bounded by its deadline; refreshes by TIW_UPSTREAM_TIMEOUT.
        await self._flights.coalescer.settle(self.config.upstream_timeout + 1)

    async def describe(
        self, action: str, request: Message, *, max_age: float | None, deadline: float | None
    ) -> Served:
        """An answer to ``request`` no older than ``max_age`` seconds (None: TIW_MAX_STALENESS) when
        this call arrived: its request was sent to TIW at most that long before the call arrived.

        ``deadline``: ``monotonic()`` by which the caller needs it. Raises the failures of a call to
        TIW; a kept error (an unknown task) is a ``Served`` whose entry ``is_error``.
        """
        key = Key.of(action, request)
        now = self._clock()
        bound = self.config.max_staleness if max_age is None else max_age
        cached = await self._stores.lookup(key)
        if cached is not None and cached.within(bound, now):
            served = self._serve(action, cached, "cache", now)
        else:
            served = await self._through_flight(key, request, cached, deadline, arrival=now, bound=bound)
        # Only an answer that can change is worth refreshing, and only answered questions are noted:
        # a refused call leaves nothing behind, however many distinct questions a caller sends.
        if not (served.entry.terminal or served.entry.is_error):
            self._interest.note(key, now)
        return served

    async def _through_flight(
        self,
        key: Key,
        request: Message,
        cached: Entry | None,
        deadline: float | None,
        *,
        arrival: float,
        bound: float,
    ) -> Served:
        try:
            landed, leader = await self._flights.share(
                key, request, deadline=deadline, arrival=arrival, bound=bound
            )
        except (RateLimited, UpstreamTimeout, Late) as exc:
            # No slot within the deadline: the newest answer kept, if not too old, rather than a
            # refusal. (Not when TIW was asked and is slow: that is not for a cache to hide.)
            if isinstance(exc, RateLimited) or exc.outcome is Outcome.NOT_SENT:
                stale = cached if cached is not None else await self._stores.lookup(key)
                now = self._clock()
                if stale is not None and stale.age(now) <= self.config.max_stale_on_saturation:
                    return self._serve(key.action, stale, "cache", now, stale=True)
            if isinstance(exc, Late):
                raise UpstreamTimeout(str(exc), outcome=exc.outcome) from None
            raise
        source: Source = "upstream" if leader and not landed.from_peer else "coalesced"
        return self._serve(key.action, landed.entry, source, self._clock())

    async def stopped(self, action: str, request: Message) -> None:
        """``request`` of ``action`` (a write) reached TIW: drop the answers it made stale, everywhere."""
        target = _policy.invalidated_request(action, request)
        if target is None:
            return
        # Who wants the key must be on record before it is dropped: a wanted key dropped by a write
        # is refreshed at once (its watchers learn the new state now, not at a caller's next call).
        await self._interest.tell()
        await self._stores.invalidate(Key.of(*target), at=self._clock())

    def changed(self, action: str, sdk_app_id: int, task_id: str, *, received_at: float, here: bool) -> None:
        """A callback (an event, ``events.Event``) said the task changed: ``here``, this replica took
        it, and asks TIW again (``_confirm``: bounded, as a hint, never as a state); else another
        replica did, and this one's watchers of the task get its answer at once."""
        self._callbacks_at[action] = self._monotonic()
        key = Key.of(action, _policy.REQUESTS[action](sdk_app_id=sdk_app_id, task_id=task_id))
        if here:
            self._confirmations.hint(key)
        else:
            self._confirmations.expect(key, since=received_at)

    def _callbacks_flowing(self, action: str) -> bool:
        at = self._callbacks_at.get(action)
        return at is not None and self._monotonic() - at < CALLBACKS_FLOW_FOR

    async def watch(self, action: str, request: Message, *, deadline: float | None) -> Watch:
        """A watch of the task ``request`` asks about (see Watch; close it however the stream ends):
        its current answer, the first that ``Watch.next`` gives, then each change until a terminal
        answer. Raises ShuttingDown when the facade stops, and what ``describe`` raises (``deadline``
        is its); ``Watch.next`` raises TiwError for an unknown task."""
        if self._topics.draining:
            raise ShuttingDown()
        topic = self._topics.join(Key.of(action, request))
        try:
            entry = (await self.describe(action, request, max_age=None, deadline=deadline)).entry
        except BaseException:
            self._topics.leave(topic)
            raise
        topic.publish(entry)
        return Watch(self._topics, topic, action, entry)

    def _serve(self, action: str, entry: Entry, source: Source, now: float, *, stale: bool = False) -> Served:
        # Upstream too: TIW's answer is as old as its request, however long TIW took to give it.
        age = entry.age(now)
        series = self._metrics.answers_of(action)
        series.served(source, age)
        if stale:
            series.stale.inc()
        return Served(entry, source, age)


__all__ = ["SHARED_ACTIONS", "Answers", "Config", "Fetch", "Served", "shared_store"]
