"""The flights of ``Answers``: the coalescer set up for answers, and what each flight does.

A flight is one request to TIW for a key, its answer kept and told to the key's watchers; or, when
another replica holds the key's lease, the answer that replica's request got (``_peers``). The
request itself is the handler's (``Fetch``: translation, retries, the rate-limit slot); this module
decides what the answer is as new as (the send, ``Flight.sent_since``), which errors are kept like
answers (``_policy.KEPT_ERRORS``), what to do when a store refuses an answer because a write (a
stop) invalidated the key after the request began, and whose share a flight's slot is queued under.

**Whose share.** A caller's flight runs in a context empty but for the share of the caller that
started it (``call_record.CURRENT_SHARE``): its slot is queued under that caller's name in the limiter's
fair share, as that caller's own request would be. Joiners add no request and are charged none.
Nothing else of the starting caller goes along. A refresh's flight carries no share: spare slots
are nobody's. A callback's confirmation (``confirm``) takes a spare slot if there is one, else
queues as a share of its own, CALLBACKS_SHARE. docs/limiter.md, "Shared requests", has the reasons.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import functools
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from google.protobuf.message import Message

from tiw_facade.answers import _policy
from tiw_facade.answers._coalesce import Coalescer, Flight
from tiw_facade.answers._config import Config
from tiw_facade.answers._entries import Entry, Key, StoreUnavailable
from tiw_facade.answers._peers import peer_answer
from tiw_facade.answers._stores import Stores
from tiw_facade.call_record import CURRENT_SHARE
from tiw_facade.failures import FacadeError, NoSpareQuota, Outcome, RateLimited, TiwError, UpstreamTimeout
from tiw_facade.metrics import Metrics

# One request to TIW for ``action``: the decoded response, or a failures.* exception (NoSpareQuota when
# ``spare`` and the limiter has no spare slot). The last argument is called once a slot is granted
# (the request is then on its way). The handler supplies it (translation, retry policy).
Fetch = Callable[[str, Message, "float | None", bool, Callable[[], None]], Awaitable[Message]]


class Asking(enum.Enum):
    """Who a flight asks TIW for, which sets the quota its request takes and who holds the lease."""

    CALLER = "caller"  # a caller's slot, queued under its share; the flight takes the key's lease
    REFRESH = "refresh"  # a spare slot or nothing; the refresher took the lease with the key
    CONFIRM = "confirm"  # a spare slot if any, else one of CALLBACKS_SHARE; the flight takes the lease


# The share a callback's confirmation queues under when no spare slot is free: one of its own, so a
# flood of callbacks competes with callers as one caller would, never as all of them.
CALLBACKS_SHARE = "tiw-callbacks"


@dataclasses.dataclass(frozen=True, slots=True)
class Landed:
    """A flight's answer; ``from_peer``: another replica's request got it (each caller checks it
    against its own bound: it may have been sent before the caller came)."""

    entry: Entry
    from_peer: bool


class Flights:
    """Callers' flights (``share``) and refreshes' (``refresh``), through ``fetch`` and ``stores``;
    ``config``'s lease_seconds and upstream_timeout."""

    def __init__(
        self,
        fetch: Fetch,
        stores: Stores,
        config: Config,
        *,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._stores = stores
        self._lease_seconds = config.lease_seconds
        self._refresh_timeout = config.upstream_timeout  # a refresh has no caller's deadline
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        # A digest of the last answer TIW gave for each key (RequestId aside), the most recent
        # cache_entries keys: which answers changed (tiw_answer_changes_total, what tells an
        # operator that tasks change while no callback comes).
        self._last_content: OrderedDict[Key, bytes] = OrderedDict()
        self._max_contents = config.cache_entries
        self.coalescer: Coalescer[Key, Landed] = Coalescer(
            unsent=given_up_unsent,
            again=(NoSpareQuota,),  # a refresh that found no spare quota: its joiners ask as callers
            waiting=lambda key, delta: metrics.answers_of(key.action).coalesced_waiters.inc(delta),
            name=lambda key: f"answers-flight-{key.action}",
            clock=clock,
            monotonic=monotonic,
        )

    async def share(
        self, key: Key, request: Message, *, deadline: float | None, arrival: float, bound: float
    ) -> tuple[Landed, bool]:
        """The answer of the flight of ``key`` a caller arriving at ``arrival`` with ``bound`` may
        share, and whether that caller started it (see ``Coalescer.share``)."""
        return await self.coalescer.share(
            key,
            functools.partial(self._fly, key, request, deadline, Asking.CALLER),
            deadline=deadline,
            arrival=arrival,
            bound=bound,
            context=functools.partial(queued_under, CURRENT_SHARE.get()),
            # Another replica's request, sent before this call's bound reaches back to (it held the
            # lease before this call came): once it is answered, the next request is newer.
            accept=lambda landed: not landed.from_peer or landed.entry.within(bound, arrival),
        )

    async def refresh(self, key: Key) -> bool | None:
        """Fetch ``key`` again with spare quota (its lease is taken): True if TIW answered, False if
        it failed, None if there was no spare quota (nothing was sent)."""
        if key in self.coalescer:  # a call is fetching it right now
            await self._stores.unlease(key)
            return True
        request = _policy.REQUESTS[key.action].FromString(key.request)  # a refresh has only the key
        deadline = self._monotonic() + self._refresh_timeout
        flight = self.coalescer.start(
            key, functools.partial(self._fly, key, request, deadline, Asking.REFRESH), deadline
        )
        try:
            await asyncio.wait((flight.task,))
            flight.task.result()
        except NoSpareQuota:
            return None
        except FacadeError:
            self._metrics.answers_of(key.action).refreshed["failed"].inc()
            store = self._stores.schedule()
            try:  # due again a refresh interval from now, not at once
                await store.postpone(key, at=self._clock())
            except StoreUnavailable as exc:
                self._stores.failed(exc)
            return False
        self._metrics.answers_of(key.action).refreshed["ok"].inc()
        return True

    async def confirm(self, key: Key) -> bool:
        """Ask TIW for ``key`` again now, whatever the age of the answer kept (a callback said its
        task changed): the answers kept are dropped everywhere first, so that no caller is served
        one from before the change and no request begun before it is kept. True if TIW answered."""
        # Requests begun before now are refused (one begun at this very instant, after the callback
        # came, is not: it would be asked again for nothing on a clock that did not move).
        await self._stores.invalidate(key, at=math.nextafter(self._clock(), -math.inf))
        if key in self.coalescer:  # begun before the drop: its answer is refused, and it asks again
            return True
        request = _policy.REQUESTS[key.action].FromString(key.request)
        deadline = self._monotonic() + self._refresh_timeout
        fly = functools.partial(self._fly, key, request, deadline, Asking.CONFIRM)
        flight = self.coalescer.start(key, fly, deadline, queued_under(CALLBACKS_SHARE))
        await asyncio.wait((flight.task,))
        try:
            flight.task.result()
        except FacadeError:
            return False
        return True

    async def _fly(
        self,
        key: Key,
        request: Message,
        deadline: float | None,
        asking: Asking,
        flight: Flight[Landed],
    ) -> Landed:
        """One request to TIW for ``key``, for ``asking``, or the answer another replica's request
        got meanwhile."""
        stores = self._stores
        ask = functools.partial(self._ask_tiw, key, request, deadline, flight, asking)
        asked_at = self._clock()
        leased = False
        if stores.shared is not None and stores.usable and asking is not Asking.REFRESH:
            try:
                leased = await stores.shared.lease(key, self._lease_seconds)
                if not leased:
                    peer = await peer_answer(
                        stores, key, deadline, lease_seconds=self._lease_seconds, monotonic=self._monotonic
                    )
                    if peer is not None:
                        return Landed(peer, from_peer=True)
                    leased = True  # the lease is ours now (taken while waiting)
            except StoreUnavailable as exc:
                stores.failed(exc)
        try:
            entry = await ask()
            if not await stores.keep(key, entry, asked_at):
                newer = await self._newer(key, entry)
                if newer is not None:
                    return Landed(newer, from_peer=True)
                # Refused: a write (a stop, maybe on another replica) invalidated the key after this
                # request began, so its answer may predate the write; and callers who asked after the
                # write may have joined this flight. Everyone gets an answer asked for after it.
                asked_at = self._clock()
                entry = await ask()
                if not await stores.keep(key, entry, asked_at):
                    return Landed(entry, from_peer=False)  # invalidated again: right now, kept by nobody
            stores.publish(key, entry)
            return Landed(entry, from_peer=False)
        finally:
            if leased or asking is not Asking.CALLER:
                await stores.unlease(key)

    async def _newer(self, key: Key, entry: Entry) -> Entry | None:
        """An answer kept to a request sent after ``entry``'s, if any: another replica's, whose lease
        overlapped ours (Redis was out of reach, or the lease ran out). A write that refused
        ``entry`` dropped whatever was kept before it, so this one was asked for after the write: it
        serves this flight's callers as well as asking TIW again would, at no cost."""
        found = await self._stores.lookup(key)
        return found if found is not None and found.answered_at > entry.answered_at else None

    async def _ask_tiw(
        self,
        key: Key,
        request: Message,
        deadline: float | None,
        flight: Flight[Landed],
        asking: Asking,
    ) -> Entry:
        begun = self._clock()
        try:
            try:
                spare = asking is not Asking.CALLER
                response = await self._fetch(key.action, request, deadline, spare, flight.mark_sent)
            except NoSpareQuota:
                if asking is not Asking.CONFIRM:
                    raise
                response = await self._fetch(key.action, request, deadline, False, flight.mark_sent)
        except TiwError as exc:
            if exc.code not in _policy.KEPT_ERRORS:
                raise
            return Entry(
                answered_at=flight.sent_since(begun),
                request_id=exc.request_id,
                error_code=exc.code,
                error_message=exc.message,
            )
        entry = Entry(
            answered_at=flight.sent_since(begun),
            request_id=getattr(response, "request_id", ""),
            payload=response.SerializeToString(),
            terminal=_policy.is_terminal(key.action, response),
        )
        self._note_content(key, response)
        return entry

    def _note_content(self, key: Key, response: Message) -> None:
        # From the decoded answer: decoding its bytes again would cost every request a parse.
        digest = hashlib.blake2b(_policy.content_of(response), digest_size=8).digest()
        before = self._last_content.pop(key, None)
        self._last_content[key] = digest
        if before is not None and before != digest:
            self._metrics.answer_changes.labels(action=key.action).inc()
        if len(self._last_content) > self._max_contents:
            self._last_content.popitem(last=False)


def given_up_unsent(exc: BaseException) -> bool:
    """Whether a flight's failure means it never got a rate-limit slot (saturation)."""
    return isinstance(exc, RateLimited) or (
        isinstance(exc, UpstreamTimeout) and exc.outcome is Outcome.NOT_SENT
    )


def queued_under(share: str) -> contextvars.Context:
    """The context a caller's flight runs in: empty but for the share its slot is queued under."""
    context = contextvars.Context()
    context.run(CURRENT_SHARE.set, share)
    return context
