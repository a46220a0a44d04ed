"""Answers to Describe calls shared across callers: coalesced, cached with their age, refreshed, watched.

Many services poll the same few tasks; the account allows 20 requests per second per action. So:

- **Coalescing.** Identical calls in flight at once share one request to TIW (a *flight*). The flight
  is a task of its own, owned by no caller: a caller that leaves (cancelled, past its deadline) does
  not end it for the others (the trap of naive singleflight), and its answer, or its error, goes to
  every caller still waiting. A caller joins a flight only if it is unsent or was sent within the
  caller's bound before the caller came; else it waits for the next one, shared the same way.
- **A cache exact about age.** Each answer keeps the time its request was sent: TIW read its state
  between the send and the answer, so that is as new as it provably is, and every age counts from
  it. A terminal answer (the task is over) is final; any other is given to a caller only while
  younger than the caller's bound (``tiw-max-age-ms``, default TIW_MAX_STALENESS). When no
  rate-limit slot comes within a caller's deadline, a cached answer up to
  TIW_MAX_STALE_ON_SATURATION old is given instead of a refusal.
  The caller always learns the source and the age.
- **Shared by replicas.** With Redis, entries, leases (one replica fetches a key at a time) and the
  refresh schedule live there; the process keeps copies to fall back on while Redis is unreachable.
  Non-terminal answers are read from Redis on every call, so a stop on one replica is seen by the
  next call on any other. Without Redis, all of it is per process.
- **Refreshes** (``_refresh``): the quota direct calls leave refreshes the answers callers keep
  asking for, least recently refreshed first.
- **Watches**: a stream of a task's changes, fed by the same refreshes: a watch costs no quota.

Knows nothing of gRPC: the handler and the watcher put this behind RPCs. docs/answers.md has it
for callers and operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from google.protobuf.message import Message

from tiw_facade import background, shared_redis
from tiw_facade.answers import _policy
from tiw_facade.answers._contact import Contact
from tiw_facade.answers._entries import Entry, Key, Lifetimes, Store, StoreUnavailable
from tiw_facade.answers._flight import Flight, Late
from tiw_facade.answers._local import LocalStore
from tiw_facade.answers._refresh import Refresher
from tiw_facade.answers._shared import RedisAnswerStore
from tiw_facade.answers._topics import Topics, Watch
from tiw_facade.failures import FacadeError, Outcome, RateLimited, ShuttingDown, TiwError, UpstreamTimeout
from tiw_facade.metrics import Metrics
from tiw_facade.upstream import NoSpareQuota

if TYPE_CHECKING:
    from tiw_facade.settings import Settings

log = logging.getLogger("tiw_facade.answers")

Source = Literal["upstream", "coalesced", "cache"]
# One request to TIW for ``action``: the decoded response, or a failures.* exception (NoSpareQuota when
# ``spare`` and the limiter has no spare slot). The last argument is called once a slot is granted
# (the request is then on its way). The handler supplies it (translation, retry policy).
Fetch = Callable[[str, Message, "float | None", bool, Callable[[], None]], Awaitable[Message]]

SHARED_ACTIONS = frozenset(_policy.RESPONSES)
# An answer is refreshed once this share of TIW_MAX_STALENESS old: just before a caller with the
# default bound would need a new one (the rest covers the round trip), and no sooner, since each
# refresh costs quota that other tasks may need.
REFRESH_AT = 0.9
# How often a call waiting on another replica's request looks for its answer in Redis: first after
# PEER_POLL, then twice as long each time up to PEER_POLL_MAX; every PEER_LEASE_EVERY-th look also
# tries to take the lease (a holder that died leaves it to run out).
PEER_POLL = 0.01
PEER_POLL_MAX = 0.08
PEER_LEASE_EVERY = 4
# How often watched keys are read from Redis (answers other replicas fetched) and marked wanted.
WATCH_POLL = 0.25
# A caller's interest is told to Redis at most this often per key (every call would be a write).
WANT_EVERY = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Served:
    """An answer for one caller: TIW's answer (or kept error), where it came from, its age in seconds."""

    entry: Entry
    source: Source
    age: float


class Answers:
    def __init__(
        self,
        settings: Settings,
        fetch: Fetch,
        metrics: Metrics | None = None,
        *,
        store: RedisAnswerStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._fetch = fetch
        self._metrics = metrics or Metrics.unobserved()
        self._clock = clock
        lifetimes = Lifetimes(
            terminal=settings.cache_terminal_ttl,
            not_found=settings.cache_not_found_ttl,
            changing=settings.max_stale_on_saturation,
        )
        self._local = LocalStore(
            lifetimes, max_entries=settings.cache_entries, metrics=self._metrics, clock=clock
        )
        where = shared_redis.target(settings, "answers")
        self._where = where.where if where is not None else "(none)"
        if store is None and where is not None:
            client = shared_redis.connect(where)
            store = RedisAnswerStore(
                client,
                account=settings.account,
                lifetimes=lifetimes,
                max_bytes=settings.shared_answers_max_bytes,
                metrics=self._metrics,
            )
        self._shared = store
        self._contact = Contact(
            store,
            self._local,
            invalidated=_policy.INVALIDATED_ACTIONS,
            where=self._where,
            stamp_lifetime=store.stamp_lifetime if store is not None else 0.0,
            clock=clock,
        )
        self._flights: dict[Key, Flight] = {}
        self._topics = Topics()
        self._told_wanted: dict[Key, float] = {}
        self._to_tell: set[Key] = set()
        # Held by a flight from the moment it asks until it answers: long enough for the longest
        # wait for a slot plus the longest attempt. A replica that dies holding one delays the
        # others' refresh of that key by this much, no more.
        self.lease_seconds = settings.max_queue_wait + settings.upstream_timeout + 1.0
        self._refresher = Refresher(
            self, sorted(SHARED_ACTIONS), REFRESH_AT * settings.max_staleness, clock=clock
        )
        self._background: list[asyncio.Task[None]] = []
        self._draining = False

    # --- the public surface ---

    @staticmethod
    def shares(action: str) -> bool:
        """Whether calls of ``action`` go through here (the Describe actions)."""
        return action in SHARED_ACTIONS

    async def start(self) -> None:
        if self._shared is not None:
            await self._contact.beat()  # the marker written before the first call
        self._background = [
            asyncio.create_task(self._contact.run(), name="answers-contact"),
            asyncio.create_task(self._refresher.run(), name="answers-refresher"),
            asyncio.create_task(self._keep_watched(), name="answers-watched"),
        ]

    def begin_drain(self) -> None:
        """Open watches end with ShuttingDown, new ones are refused; calls are still answered."""
        self._draining = True
        self._topics.wake_all()

    async def aclose(self) -> None:
        self.begin_drain()
        await background.stop(self._background)
        flights = [flight.task for flight in self._flights.values()]
        if flights:  # each is bounded by its deadline; refreshes by TIW_UPSTREAM_TIMEOUT
            await asyncio.wait(flights, timeout=self._settings.upstream_timeout + 1)
        if self._shared is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._shared.aclose()

    @staticmethod
    def key(action: str, request: Message) -> Key:
        """The key of ``request``: the canonical form of what TIW is sent for it.

        The known fields only, in the deterministic serialisation (field order, explicit defaults and
        repeated occurrences on the wire are all one form): unknown fields never reach TIW, so they
        must not make two keys of one question, nor let a caller grow the cache with padding.
        """
        canonical = type(request)()
        canonical.CopyFrom(request)
        canonical.DiscardUnknownFields()
        return Key(action, canonical.SerializeToString(deterministic=True))

    async def describe(
        self, action: str, request: Message, *, max_age: float | None, deadline: float | None
    ) -> Served:
        """An answer to ``request`` no older than ``max_age`` seconds (None: TIW_MAX_STALENESS) when
        this call arrived: its request was sent to TIW at most that long before the call arrived.

        ``deadline``: ``time.monotonic()`` by which the caller needs it. Raises the failures of a
        call to TIW; a kept error (an unknown task) is a ``Served`` whose entry ``is_error``.
        """
        key = self.key(action, request)
        now = self._clock()
        bound = self._settings.max_staleness if max_age is None else max_age
        cached = await self._lookup(key)
        if cached is not None and self._fresh(cached, bound, now):
            served = self._serve(action, cached, "cache", now)
        else:
            served = await self._through_flight(key, request, cached, deadline, arrival=now, bound=bound)
        # Only an answer that can change is worth refreshing, and only answered questions are noted:
        # a refused call leaves nothing behind, however many distinct questions a caller sends.
        if not (served.entry.terminal or served.entry.is_error):
            self._note_wanted(key, now)
        return served

    async def stopped(self, action: str, request: Message) -> None:
        """``request`` of ``action`` (a write) reached TIW: drop the answers it made stale, everywhere."""
        target = _policy.invalidated_request(action, request)
        if target is None:
            return
        key = self.key(*target)
        # Who wants the key must be on record before it is dropped: a wanted key dropped by a write
        # is refreshed at once (its watchers learn the new state now, not at a caller's next call).
        await self.tell_wanted()
        at = self._clock()
        await self._local.invalidate([key], at=at)
        if self._shared_usable():
            try:
                await self._shared.invalidate([key], at=at)  # type: ignore[union-attr]
            except StoreUnavailable as exc:
                self._shared_failed(exc)

    async def watch(self, action: str, request: Message, *, deadline: float | None) -> Watch:
        """A watch of the task ``request`` asks about (see Watch; close it however the stream ends):
        its current answer, the first that ``Watch.next`` gives, then each change until a terminal
        answer. Raises ShuttingDown when the facade stops, and what ``describe`` raises (``deadline``
        is its, ``time.monotonic()``); ``Watch.next`` raises TiwError for an unknown task."""
        if self._draining:
            raise ShuttingDown()
        topic = self._topics.join(self.key(action, request))
        try:
            entry = (await self.describe(action, request, max_age=None, deadline=deadline)).entry
        except BaseException:
            self._topics.leave(topic)
            raise
        topic.publish(entry)
        return Watch(self, topic, action, entry)

    # --- what the refresher uses ---

    def schedule(self) -> Store:
        """The store whose refresh schedule counts: Redis's (shared by all replicas) while usable."""
        return self._shared if self._shared_usable() else self._local  # type: ignore[return-value]

    def schedule_failed(self, exc: StoreUnavailable) -> None:
        self._shared_failed(exc)

    async def refresh(self, key: Key) -> bool | None:
        """Fetch ``key`` again with spare quota (its lease is taken): True if TIW answered, False if
        it failed, None if there was no spare quota (nothing was sent)."""
        if key in self._flights:  # a call is fetching it right now
            await self._unlease(key)
            return True
        request = _policy_request(key)
        flight = self._start_flight(
            key, request, time.monotonic() + self._settings.upstream_timeout, spare=True
        )
        try:
            await asyncio.wait((flight.task,))
            flight.task.result()
        except NoSpareQuota:
            return None
        except FacadeError:
            self._metrics.answers_of(key.action).refreshed["failed"].inc()
            store = self.schedule()
            try:  # due again a refresh interval from now, not at once
                await store.postpone(key, at=self._clock())
            except StoreUnavailable as exc:
                self._shared_failed(exc)
            return False
        self._metrics.answers_of(key.action).refreshed["ok"].inc()
        return True

    # --- inside ---

    def _fresh(self, entry: Entry, bound: float, now: float) -> bool:
        if entry.terminal:
            return True
        return entry.age(now) <= bound

    def _serve(self, action: str, entry: Entry, source: Source, now: float, *, stale: bool = False) -> Served:
        # Upstream too: TIW's answer is as old as its request, however long TIW took to give it.
        age = entry.age(now)
        series = self._metrics.answers_of(action)
        series.served(source, age)
        if stale:
            series.stale.inc()
        return Served(entry, source, age)

    def _shared_usable(self) -> bool:
        return self._contact.usable

    def _shared_failed(self, exc: StoreUnavailable) -> None:
        self._contact.failed(exc)

    def _trusted(self, key: Key, entry: Entry | None) -> Entry | None:
        """``entry`` as read from Redis, if it may be served: not older than a stop this replica
        made (whose invalidation Redis may have lost), nor than this replica's last recovery."""
        if entry is None or not self._contact.trusted(key, entry):
            return None
        if not entry.terminal and entry.answered_at <= self._local.invalidated_at(key):
            return None
        return entry

    async def _lookup(self, key: Key) -> Entry | None:
        """The newest answer of ``key`` to go by: terminal ones from the process, the rest from Redis
        while it answers (it alone knows of another replica's stop), else from the process."""
        local = self._local.peek(key)
        if (local is not None and local.terminal) or not self._shared_usable():
            return local
        try:
            shared = self._trusted(key, await self._shared.get(key))  # type: ignore[union-attr]
        except StoreUnavailable as exc:
            self._shared_failed(exc)
            return local
        if shared is not None and (local is None or shared.answered_at > local.answered_at):
            self._local.keep(key, shared, asked_at=shared.answered_at)
            self._publish(key, shared)
        return shared

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
        """TIW's answer through the flight of ``key`` if this caller may share it (``joinable``), else
        through the next one, begun when it lands and shared by all who waited for it."""
        series = self._metrics.answers_of(key.action)
        retried = False
        while True:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._start_flight(key, request, deadline, spare=False)
            else:
                series.coalesced_waiters.inc()
            try:
                if not flight.joinable(arrival, bound):
                    # Sent too long before this call arrived: TIW may have read its state before the
                    # caller's bound reaches back to. The first to wake after it lands begins the next.
                    await self._behind(flight, deadline)
                    continue
                entry, from_peer = await self._await(flight, deadline)
            except NoSpareQuota:
                continue  # joined a refresh that found no spare quota: ask as a caller
            except (RateLimited, UpstreamTimeout, Late) as exc:
                saturated = isinstance(exc, RateLimited) or exc.outcome is Outcome.NOT_SENT
                # A shared request given up unsent for its first caller's shorter deadline is still
                # worth one of this caller's own, once, with its own time.
                if saturated and not retried and not isinstance(exc, Late) and flight.outlived_by(deadline):
                    retried = True
                    continue
                # No slot within the deadline: the newest answer kept, if not too old, rather than a
                # refusal. (Not when TIW was asked and is slow: that is not for a cache to hide.)
                if saturated:
                    stale = cached if cached is not None else await self._lookup(key)
                    now = self._clock()
                    if stale is not None and stale.age(now) <= self._settings.max_stale_on_saturation:
                        return self._serve(key.action, stale, "cache", now, stale=True)
                if isinstance(exc, Late):
                    raise UpstreamTimeout(str(exc), outcome=exc.outcome) from None
                raise
            finally:
                if not leader:
                    series.coalesced_waiters.dec()
            if from_peer and not self._fresh(entry, bound, arrival):
                # Another replica's request, sent before this call's bound reaches back to (it held
                # the lease before this call came): once it is answered, the next request is newer.
                continue
            source: Source = "upstream" if leader and not from_peer else "coalesced"
            return self._serve(key.action, entry, source, self._clock())

    def _start_flight(self, key: Key, request: Message, deadline: float | None, *, spare: bool) -> Flight:
        flight = self._flights[key] = Flight(spare, deadline, clock=self._clock)
        flight.task = asyncio.create_task(
            self._fly(key, request, deadline, flight), name=f"answers-flight-{key.action}"
        )
        flight.task.add_done_callback(lambda done: self._landed(key, flight))
        return flight

    def _landed(self, key: Key, flight: Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved: every waiter may have left

    @staticmethod
    async def _await(flight: Flight, deadline: float | None) -> tuple[Entry, bool]:
        if await _lands_by(flight, deadline):
            return flight.task.result()
        if flight.sent:
            raise Late(
                "TIW has not answered the request this call shares with others in time", Outcome.UNKNOWN
            )
        raise Late(
            "no rate-limit slot came within the deadline for the request this call shares", Outcome.NOT_SENT
        )

    @staticmethod
    async def _behind(flight: Flight, deadline: float | None) -> None:
        """Wait for ``flight`` to land, whatever its outcome (it is not this caller's request)."""
        if not await _lands_by(flight, deadline):
            raise Late(
                "TIW has not answered in time an earlier request, after which this call's was to be sent",
                Outcome.UNKNOWN,
            )

    async def _fly(
        self, key: Key, request: Message, deadline: float | None, flight: Flight
    ) -> tuple[Entry, bool]:
        """One request to TIW for ``key``, or the answer another replica's request got meanwhile."""
        asked_at = self._clock()
        leased = False
        spare = flight.spare
        if self._shared_usable() and not spare:  # a refresh's lease is taken with its key
            try:
                leased = await self._shared.lease(key, self.lease_seconds)  # type: ignore[union-attr]
                if not leased:
                    peer = await self._peer_answer(key, deadline)
                    if peer is not None:
                        return peer, True
                    leased = True  # the lease is ours now (taken while waiting)
            except StoreUnavailable as exc:
                self._shared_failed(exc)
        try:
            entry = await self._ask_tiw(key, request, deadline, flight)
            if not await self._keep(key, entry, asked_at):
                newer = await self._newer(key, entry)
                if newer is not None:
                    return newer, True
                # Refused: a write (a stop, maybe on another replica) invalidated the key after this
                # request began, so its answer may predate the write; and callers who asked after the
                # write may have joined this flight. Everyone gets an answer asked for after it.
                asked_at = self._clock()
                entry = await self._ask_tiw(key, request, deadline, flight)
                if not await self._keep(key, entry, asked_at):
                    return entry, False  # invalidated again meanwhile: right for now, kept by nobody
            self._publish(key, entry)
            return entry, False
        finally:
            if leased or spare:
                await self._unlease(key)

    async def _newer(self, key: Key, entry: Entry) -> Entry | None:
        """An answer kept to a request sent after ``entry``'s, if any: another replica's, whose lease
        overlapped ours (Redis was out of reach, or the lease ran out). A write that refused
        ``entry`` dropped whatever was kept before it, so this one was asked for after the write: it
        serves this flight's callers as well as asking TIW again would, at no cost."""
        found = await self._lookup(key)
        return found if found is not None and found.answered_at > entry.answered_at else None

    async def _keep(self, key: Key, entry: Entry, asked_at: float) -> bool:
        """Store ``entry`` here and in Redis; False if a store refused it (an invalidation after
        ``asked_at``, or a later answer already there)."""
        kept = self._local.keep(key, entry, asked_at=asked_at)
        if self._shared_usable() and not self._contact.may_share(key, asked_at):
            # Begun before this replica's last recovery: it may predate a stop Redis lost.
            return False
        if self._shared_usable():
            try:
                kept = await self._shared.put(key, entry, asked_at=asked_at) and kept  # type: ignore[union-attr]
            except StoreUnavailable as exc:
                self._shared_failed(exc)
        return kept

    async def _unlease(self, key: Key) -> None:
        await self._local.unlease(key)
        if self._shared is None:
            return
        if not self._shared_usable():
            self._contact.owe_lease(key)  # or every replica's callers of the key wait for it to run out
            return
        try:
            await self._shared.unlease(key)
        except StoreUnavailable as exc:
            self._shared_failed(exc)
            self._contact.owe_lease(key)

    async def _ask_tiw(self, key: Key, request: Message, deadline: float | None, flight: Flight) -> Entry:
        begun = self._clock()
        try:
            response = await self._fetch(key.action, request, deadline, flight.spare, flight.mark_sent)
        except TiwError as exc:
            if exc.code not in _policy.KEPT_ERRORS:
                raise
            return Entry(
                answered_at=flight.sent_since(begun),
                request_id=exc.request_id,
                error_code=exc.code,
                error_message=exc.message,
            )
        return Entry(
            answered_at=flight.sent_since(begun),
            request_id=getattr(response, "request_id", ""),
            payload=response.SerializeToString(),
            terminal=_policy.is_terminal(key.action, response),
        )

    async def _peer_answer(self, key: Key, deadline: float | None) -> Entry | None:
        """Wait for another replica's request for ``key``: its answer, or None once its lease is
        gone (then the lease is ours). Raises UpstreamTimeout at the deadline. That request may have
        been sent before this flight's callers came: each checks the answer against its own bound.

        Polls Redis, from PEER_POLL up to PEER_POLL_MAX apart: most answers come within a round
        trip to TIW, and a replica with many keys waiting must not flood Redis meanwhile.
        """
        assert self._shared is not None
        known = self._trusted(key, await self._shared.get(key))
        known_at = known.answered_at if known is not None else float("-inf")
        pause = PEER_POLL
        polls = 0
        while True:
            if deadline is not None and time.monotonic() + pause >= deadline:
                # Another replica holds the lease: under saturation, most likely waiting for a slot.
                raise Late(
                    "another replica's request for this answer has not been answered in time",
                    Outcome.NOT_SENT,
                )
            await asyncio.sleep(pause)
            pause = min(2 * pause, PEER_POLL_MAX)
            found = self._trusted(key, await self._shared.get(key))
            if found is not None and found.answered_at > known_at:
                self._local.keep(key, found, asked_at=found.answered_at)
                self._publish(key, found)
                return found
            polls += 1
            # The lease is checked less often: it outlives the answer only when its holder died.
            if polls % PEER_LEASE_EVERY == 0 and await self._shared.lease(key, self.lease_seconds):
                return None

    def _publish(self, key: Key, entry: Entry) -> None:
        self._topics.publish(key, entry)

    def _note_wanted(self, key: Key, now: float, *, force: bool = False) -> None:
        """A caller asked for ``key``: keep it refreshed for TIW_REFRESH_INTEREST seconds."""
        until = now + self._settings.refresh_interest
        told = self._told_wanted.get(key, 0.0)
        if force or until - told >= WANT_EVERY:
            self._told_wanted.pop(key, None)  # re-inserted last: the dict is in order of interest
            self._told_wanted[key] = until
            self._to_tell.add(key)
            self._bound_wanted()

    def _bound_wanted(self) -> None:
        """At most TIW_CACHE_ENTRIES keys noted as wanted: the ones whose interest is oldest go first
        (an answer no longer kept has nothing to refresh anyway)."""
        # The dict is in order of ``until``, so the first key is also the first to expire: O(1) a call.
        while len(self._told_wanted) > self._settings.cache_entries:
            oldest = next(iter(self._told_wanted))
            del self._told_wanted[oldest]
            self._to_tell.discard(oldest)

    async def tell_wanted(self) -> None:
        """Tell the stores which keys callers want (batched: once per key per WANT_EVERY)."""
        if not self._to_tell:
            return
        keys, self._to_tell = self._to_tell, set()
        by_until: dict[float, list[Key]] = {}
        for key in keys:
            by_until.setdefault(self._told_wanted[key], []).append(key)
        for until, group in by_until.items():
            await self._local.want(group, until=until)
            if self._shared_usable():
                try:
                    await self._shared.want(group, until=until)  # type: ignore[union-attr]
                except StoreUnavailable as exc:
                    self._shared_failed(exc)

    async def _keep_watched(self) -> None:
        """Watched keys stay wanted, and other replicas' answers of them reach their watchers."""
        while True:
            await asyncio.sleep(WATCH_POLL)
            now = self._clock()
            keys = self._topics.watched()
            for key in keys:
                self._note_wanted(key, now)
            if not keys or not self._shared_usable():
                continue
            try:
                found = await self._shared.get_many(keys)  # type: ignore[union-attr]
            except StoreUnavailable as exc:
                self._shared_failed(exc)
                continue
            for key, read in zip(keys, found, strict=True):
                entry = self._trusted(key, read)
                if entry is not None:
                    self._local.keep(key, entry, asked_at=entry.answered_at)
                    self._publish(key, entry)


async def _lands_by(flight: Flight, deadline: float | None) -> bool:
    """Whether ``flight`` lands before ``deadline`` (``time.monotonic()``); never cancels it."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    done, _ = await asyncio.wait((flight.task,), timeout=timeout)
    return bool(done)


def _policy_request(key: Key) -> Message:
    """The request message of ``key`` (a refresh has only the key)."""
    return _policy.REQUESTS[key.action].FromString(key.request)


__all__ = [
    "SHARED_ACTIONS",
    "Answers",
    "Entry",
    "Fetch",
    "Key",
    "Served",
    "Source",
    "Store",
    "StoreUnavailable",
]
