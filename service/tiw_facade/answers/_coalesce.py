"""Coalescing: identical calls in flight at once share one request (a *flight*), as golang.org/x/sync's
singleflight shares one call of a function per key.

Three things set it apart from singleflight's ``Do``:

- **No caller owns a flight.** It is a task of its own, in a context of its own: a caller that
  leaves (cancelled, past its deadline) does not end it for the others, and the flight carries
  nothing of the caller that happened to start it (its context variables) unless given it on
  purpose (``share``'s ``context``).
- **``sent`` is known.** The function marks the moment its request got its rate-limit slot
  (``Flight.mark_sent``), so a caller that leaves can tell a request given up before it was sent
  (saturation: ``Late`` with ``Outcome.NOT_SENT``) from one TIW has seen (``Outcome.UNKNOWN``).
- **A bound on age.** A flight's answer is as new as its send, so a caller joins one only if it is
  unsent or was sent within the caller's bound before the caller came (``Flight.joinable``); else
  it waits for that flight to land and shares the next one, begun by the first to wake.

Errors are shared like answers: every caller waiting gets the flight's exception, except the ones
the owner says are worth starting over for (``again``), or one given up unsent that a caller with a
later deadline may ask again, once, with its own (``unsent``).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from tiw_facade.failures import Outcome

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
Clock = Callable[[], float]
# What a flight does: given its Flight (to mark when it is sent), the answer every caller shares.
Fly = Callable[["Flight[T]"], Coroutine[Any, Any, T]]

# A caller's own request after a shared one found no slot is worth it only with this much more time.
MIN_LONGER = 0.05


class Late(Exception):
    """A call's deadline came before the answer of the request it shares; ``outcome``: whether that
    request had been sent (UNKNOWN) or was still waiting for a slot, here or on another replica."""

    def __init__(self, message: str, outcome: Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome


class Flight(Generic[T]):
    """One request that every identical call in the meantime shares; ``task`` gives its answer."""

    __slots__ = ("_clock", "_monotonic", "deadline", "sent_at", "task")

    def __init__(self, deadline: float | None, *, clock: Clock, monotonic: Clock) -> None:
        self.deadline = deadline  # by which it must have a slot (its first caller's; ``monotonic``)
        self._clock = clock  # the wall clock: sent_at is compared with answers' times
        self._monotonic = monotonic  # the clock of deadlines
        # When the latest attempt got its slot (it was sent next); None while none has.
        self.sent_at: float | None = None
        self.task: asyncio.Task[T]

    @property
    def sent(self) -> bool:
        """A slot was granted: the request is on its way (or has been)."""
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
        A flight waiting for another replica's request counts as unsent: its answer is checked against
        each caller's bound when it comes (``share``'s ``accept``)."""
        return self.sent_at is None or arrival - self.sent_at <= bound

    def outlived_by(self, deadline: float | None) -> bool:
        """Whether a caller with ``deadline`` can wait for a slot longer than this flight could."""
        if deadline is None:
            return self.deadline is not None
        return (
            self.deadline is not None
            and deadline - self.deadline > MIN_LONGER
            and deadline > self._monotonic()
        )

    async def lands_by(self, deadline: float | None) -> bool:
        """Whether the flight lands before ``deadline``; never cancels it."""
        timeout = None if deadline is None else max(0.0, deadline - self._monotonic())
        done, _ = await asyncio.wait((self.task,), timeout=timeout)
        return bool(done)


class Coalescer(Generic[K, T]):
    """At most one flight per key; callers of a key share it (``share``).

    ``unsent(exc)``: whether a flight's error means it was given up before it was sent (no slot in
    time). ``again``: errors after which every waiter starts over rather than share them.
    ``waiting(key, delta)``: told as callers start and stop waiting on another's flight (a gauge).
    ``name(key)``: the name of the flight's task. Deadlines are on ``monotonic``; send times on ``clock``.
    """

    def __init__(
        self,
        *,
        unsent: Callable[[BaseException], bool] = lambda exc: False,
        again: tuple[type[BaseException], ...] = (),
        waiting: Callable[[K, int], None] = lambda key, delta: None,
        name: Callable[[K], str] = lambda key: "flight",
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self._flights: dict[K, Flight[T]] = {}
        self._unsent = unsent
        self._again = again
        self._waiting = waiting
        self._name = name
        self._clock = clock
        self._monotonic = monotonic

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    def start(
        self,
        key: K,
        fly: Fly[T],
        deadline: float | None,
        context: contextvars.Context | None = None,
    ) -> Flight[T]:
        """Begin the flight of ``key``: ``fly(flight)`` as a task of its own, run in ``context`` (by
        default an empty one). Replaces the key's flight, if any, for callers that come next."""
        flight: Flight[T] = Flight(deadline, clock=self._clock, monotonic=self._monotonic)
        self._flights[key] = flight
        flight.task = asyncio.get_running_loop().create_task(
            fly(flight),
            name=self._name(key),
            context=contextvars.Context() if context is None else context,
        )
        flight.task.add_done_callback(lambda _: self._landed(key, flight))
        return flight

    async def share(
        self,
        key: K,
        fly: Fly[T],
        *,
        deadline: float | None,
        arrival: float,
        bound: float,
        context: Callable[[], contextvars.Context] = contextvars.Context,
        accept: Callable[[T], bool] = lambda answer: True,
    ) -> tuple[T, bool]:
        """The answer of the flight of ``key`` this caller may share (``Flight.joinable``), else of the
        next one; and whether this caller started it (``fly`` and ``context()`` are used only then).

        ``arrival``: when the call came (``clock``); ``bound``: the oldest send it takes, in seconds
        before ``arrival``. ``accept``: whether a landed answer will do (False: share the next one).
        Raises the flight's error, or ``Late`` if ``deadline`` comes first.
        """
        retried = False
        while True:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self.start(key, fly, deadline, context())
            else:
                self._waiting(key, 1)
            try:
                if not flight.joinable(arrival, bound):
                    # Sent too long before this call arrived: TIW may have read its state before the
                    # caller's bound reaches back to. The first to wake after it lands begins the next.
                    await _behind(flight, deadline)
                    continue
                answer = await _answer(flight, deadline)
            except self._again:
                continue
            except Late:
                raise
            except Exception as exc:
                # A shared request given up unsent for its first caller's shorter deadline is still
                # worth one of this caller's own, once, with its own time.
                if self._unsent(exc) and not retried and flight.outlived_by(deadline):
                    retried = True
                    continue
                raise
            finally:
                if not leader:
                    self._waiting(key, -1)
            if accept(answer):
                return answer, leader

    async def settle(self, within: float) -> None:
        """Wait up to ``within`` seconds for the flights in the air to land."""
        flights = [flight.task for flight in self._flights.values()]
        if flights:
            await asyncio.wait(flights, timeout=within)

    def _landed(self, key: K, flight: Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved: every waiter may have left


async def _answer(flight: Flight[T], deadline: float | None) -> T:
    if await flight.lands_by(deadline):
        return flight.task.result()
    if flight.sent:
        raise Late("TIW has not answered the request this call shares with others in time", Outcome.UNKNOWN)
    raise Late(
        "no rate-limit slot came within the deadline for the request this call shares", Outcome.NOT_SENT
    )


async def _behind(flight: Flight[T], deadline: float | None) -> None:
    """Wait for ``flight`` to land, whatever its outcome (it is not this caller's request)."""
    if not await flight.lands_by(deadline):
        raise Late(
            "TIW has not answered in time an earlier request, after which this call's was to be sent",
            Outcome.UNKNOWN,
        )
