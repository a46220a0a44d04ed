"""What the answer cache keeps, how it names it, what a store of it must do, and what a caller gets.

A *key* is one Describe request: the action and the request message in protobuf's deterministic
serialisation, so two calls asking the same thing share one key whatever their field order. It is
also everything a refresh needs: any replica can send the request again from the key alone.

An *entry* is one answer of TIW to that request: the response message (serialised, RequestId
included, as TIW gave it) or the one error worth keeping (``InvalidParameter.TaskNotFound``), and
the wall-clock time the request that produced it was sent. Sent, not answered: TIW read its state
somewhere between the two, so the answer is provably no older than the send, and ages count from it.
Wall time, not monotonic: replicas compare the ages of shared entries, and only the wall clock
means the same on every host (to within NTP's skew).
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from google.protobuf.message import Message


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    """One Describe request: ``action`` and the request message's deterministic serialisation."""

    action: str
    request: bytes

    def text(self) -> str:
        """The key as text (Redis member and key names): the action, a colon, base64url of the request."""
        return f"{self.action}:{base64.urlsafe_b64encode(self.request).decode()}"

    @classmethod
    def of(cls, action: str, request: Message) -> Key:
        """The key of ``request``: the canonical form of what TIW is sent for it.

        The known fields only, in the deterministic serialisation (field order, explicit defaults and
        repeated occurrences on the wire are all one form): unknown fields never reach TIW, so they
        must not make two keys of one question, nor let a caller grow the cache with padding.
        """
        canonical = type(request)()
        canonical.CopyFrom(request)
        canonical.DiscardUnknownFields()
        return cls(action, canonical.SerializeToString(deterministic=True))

    @classmethod
    def from_text(cls, text: str) -> Key:
        action, _, encoded = text.partition(":")
        return cls(action, base64.urlsafe_b64decode(encoded))


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One answer of TIW: a response, or a kept error; and how new it provably is (``time.time()``)."""

    # When the request TIW answered was sent (its rate-limit slot granted), not when the answer came:
    # what TIW answered may be as old as that, and ages must never claim it newer.
    answered_at: float
    request_id: str  # TIW's RequestId of the request that produced this answer
    payload: bytes = b""  # the response message, serialised; empty for an error
    terminal: bool = False  # a final state: it never changes, whatever the age
    error_code: str = ""  # TIW's error code of a kept error (then ``payload`` is empty)
    error_message: str = ""

    @property
    def is_error(self) -> bool:
        return bool(self.error_code)

    def age(self, now: float) -> float:
        """Seconds since the request was sent, never negative (another host's clock may be ahead)."""
        return max(0.0, now - self.answered_at)

    def within(self, bound: float, now: float) -> bool:
        """Whether a caller at ``now`` that takes nothing older than ``bound`` seconds may have it:
        terminal (it never changes), or young enough."""
        return self.terminal or self.age(now) <= bound


# Where an answer given to a caller came from (its ``tiw-source``, docs/answers.md).
Source = Literal["upstream", "coalesced", "cache"]


@dataclasses.dataclass(frozen=True, slots=True)
class Served:
    """An answer for one caller: TIW's answer (or kept error), where it came from, its age in seconds."""

    entry: Entry
    source: Source
    age: float


@dataclasses.dataclass(frozen=True, slots=True)
class Lifetimes:
    """How long a store keeps each kind of entry, in seconds."""

    terminal: float  # TIW_CACHE_TERMINAL_TTL
    not_found: float  # TIW_CACHE_NOT_FOUND_TTL
    changing: float  # TIW_MAX_STALE_ON_SATURATION: older, a non-terminal answer is of no use

    def of(self, entry: Entry) -> float:
        if entry.is_error:
            return self.not_found
        return self.terminal if entry.terminal else self.changing


class StoreUnavailable(Exception):
    """The shared store cannot be reached or answered nonsense: use the process's own store.

    The message says what happened, as a phrase after "Redis at <where> " (``shared_redis.describe``);
    ``kind`` is ``shared_redis.Kind``.
    """

    def __init__(self, message: str, kind: str = "unreachable") -> None:
        super().__init__(message)
        self.kind = kind


class Store(Protocol):
    """Where entries live: in process (``_local``) or in Redis, shared by every replica (``_shared``).

    Every time is wall-clock seconds (``time.time()``). A shared store raises ``StoreUnavailable``
    for any trouble with its backend; the in-process store never raises.
    """

    async def get(self, key: Key) -> Entry | None:
        """The entry of ``key``, or None (never kept, expired, dropped, or invalidated)."""

    async def get_many(self, keys: Sequence[Key]) -> list[Entry | None]:
        """``get`` of each key, in one round trip."""

    async def put(self, key: Key, entry: Entry, *, asked_at: float) -> bool:
        """Keep ``entry`` for its lifetime; True if it was kept.

        Not kept when the key was invalidated at or after ``asked_at`` (the time the request that
        produced it was begun: its answer may predate the change that invalidated the key), or when
        the store holds an answer to a request sent later (answers never go back in time).
        Keeping a terminal or error entry also ends the key's refreshes.
        """

    async def invalidate(self, keys: Iterable[Key], *, at: float) -> None:
        """Drop the entries of ``keys``, and refuse answers to requests begun before ``at``."""

    async def postpone(self, key: Key, *, at: float) -> None:
        """A refresh of ``key`` failed: offer it again (``next_due``) as if it had been answered at
        ``at``, not at once (a failing request is not re-sent in a loop)."""

    async def lease(self, key: Key, seconds: float) -> bool:
        """Take the right to fetch ``key`` for ``seconds`` (one replica at a time); False if taken."""

    async def unlease(self, key: Key) -> None:
        """Give up the lease of ``key`` (taken by this store) before it runs out."""

    async def want(self, keys: Iterable[Key], *, until: float) -> None:
        """Someone wants fresh answers of ``keys`` until ``until``: refresh them while so.

        Extends, never shortens, a key's wanted time.
        """

    async def next_due(self, action: str, *, older_than: float, lease: float, now: float) -> Key | None:
        """The key of ``action`` to refresh next, with its lease taken for ``lease`` seconds; or None.

        Among keys wanted at ``now`` that have an entry neither terminal nor an error (or had one,
        until a write invalidated it: due at once), and whose lease is free: the one whose request
        was sent longest ago (or postponed to longest ago), provided that was before ``older_than``.
        """

    async def aclose(self) -> None:
        """Close connections (a shared store); the in-process store forgets nothing by it."""


# How far in the future an entry's answered_at may lie: hosts' clocks agree to within NTP's skew
# (milliseconds), so anything later was not written by a replica of ours and would read "fresh" for
# as long as it is kept (docs/answers.md, "Checked before use"). 10 s, not less: the store's tests
# write answers stamped up to 8 s ahead of the wall clock.
CLOCK_TOLERANCE = 10.0
# What ``invalid`` names: the label ``what`` of tiw_store_invalid_total{role="answers"}.
TIME, FIELDS, PAYLOAD, FOREIGN = "time", "fields", "payload", "key"


def plausible_time(value: float, now: float) -> bool:
    """Whether ``value`` can be a time a replica wrote: finite, and not later than ``now`` allows."""
    return math.isfinite(value) and value <= now + CLOCK_TOLERANCE


def invalid(key: Key, entry: Entry, now: float) -> str | None:
    """What is wrong with ``entry`` read as the answer of ``key`` (None: nothing we can tell).

    The payload is checked as the answer to the key's request: it must decode as the action's
    response, be non-empty unless the entry is a kept error, carry the request's task id when it
    carries one (an answer copied from another key is not this key's answer), and be terminal
    exactly when the entry says so (a forged ``t`` would keep a running task's answer for an hour).
    A key that is no request of a shared action (the facade never makes one; tests do) has no
    response type to check the payload against: only its time and error fields are checked.
    """
    from tiw_facade.answers import _policy  # protobuf classes: loaded only with the answer cache

    if not plausible_time(entry.answered_at, now):
        return TIME
    if entry.is_error:
        return None if entry.error_code in _policy.KEPT_ERRORS and not entry.payload else FIELDS
    if entry.error_message:
        return FIELDS
    response_type = _policy.RESPONSES.get(key.action)
    if response_type is None:
        return None
    try:
        request = _policy.REQUESTS[key.action].FromString(key.request)
    except Exception:  # upb raises DecodeError, or NotImplementedError on a wire-type mismatch
        return None
    if not entry.payload:
        return PAYLOAD
    try:
        response = response_type.FromString(entry.payload)
    except Exception:
        return PAYLOAD
    # Unknown fields are allowed: a newer release's replicas may write fields this one lacks.
    asked = getattr(request, "task_id", "")
    answered = getattr(response, "task_id", "")
    if asked and answered and asked != answered:
        return FOREIGN
    if entry.terminal != _policy.is_terminal(key.action, response):
        return FIELDS
    return None
