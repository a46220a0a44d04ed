"""The answer store every replica of one account shares: Redis, each rule one atomic Lua script
(their sources, and the layout of the keys they keep, are in ``_scripts.py``).

Nothing read from Redis is trusted (docs/answers.md, "Checked before use"): an entry is served only
if ``_entries.invalid`` finds nothing wrong with it as the answer of its key; one that fails is
deleted (unless rewritten meanwhile), counted in ``tiw_store_invalid_total{role="answers"}`` and
logged. The scripts treat a held answered_at or stamp that is not a plausible time (not a number,
NaN, later than the writer's clock plus ``CLOCK_TOLERANCE``) as absent, so a good answer replaces it.
The entries' format is unchanged: entries of older releases read the same.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar, cast

from redis.exceptions import ResponseError

from tiw_facade import shared_redis
from tiw_facade.answers._entries import (
    CLOCK_TOLERANCE,
    FIELDS,
    TIME,
    Entry,
    Key,
    Lifetimes,
    StoreUnavailable,
    invalid,
)
from tiw_facade.answers._scripts import (
    DROP_SCRIPT,
    ENTRY_OVERHEAD,
    EVICT_BATCH,
    FORGET_SCRIPT,
    GET_SCRIPT,
    INVALIDATE_SCRIPT,
    KEY_TYPES,
    LEASE_SCRIPT,
    MEND_SCRIPT,
    NEXT_DUE_SCRIPT,
    POSTPONE_SCRIPT,
    PUT_SCRIPT,
    SCAN,
    UNLEASE_SCRIPT,
    USE_RESOLUTION,
    WANT_SCRIPT,
)
from tiw_facade.metrics import SHARED_EVICTION_REASON
from tiw_facade.settings import DEFAULT_SHARED_ANSWERS_MAX_BYTES

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics

T = TypeVar("T")

log = logging.getLogger("tiw_facade.answers")

STORE_ERRORS = shared_redis.ERRORS
# A reply that does not parse is as much "not answering properly" as a lost connection.
SHAPE_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError)
# An invalidation stamp must outlive every request begun before it; the longest such request is
# bounded by what the facade waits for TIW, far below this.
MIN_STAMP_LIFETIME = 60.0
# One warning per this many seconds about invalid data read from Redis: an attacker (or a broken
# writer) can make every read fail, and the log must not grow with the traffic. The metric counts all.
INVALID_WARN_EVERY = 60.0
# What else can be invalid (tiw_store_invalid_total{role="answers", what}): an invalidation stamp
# that is no plausible time, and a schedule member that is no key of its action.
STAMP, SCHEDULE = "stamp", "schedule"
# A key of the store holding another type than the scripts write (a list where a hash belongs, a
# lease without expiry): every command on it would fail with WRONGTYPE, or a lease never end.
WRONG_TYPE = "type"
INVALID_WHATS = (TIME, FIELDS, "payload", "key", STAMP, SCHEDULE, WRONG_TYPE)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _fields(entry: Entry) -> list[str | bytes]:
    """The entry as hash fields, the empty ones left out (they are the defaults)."""
    fields: list[str | bytes] = ["a", repr(entry.answered_at)]
    for name, value in (
        ("r", entry.request_id),
        ("p", entry.payload),
        ("t", "1" if entry.terminal else ""),
        ("c", entry.error_code),
        ("m", entry.error_message),
    ):
        if value:
            fields += (name, value)
    return fields


def _parse(fields: dict[bytes, bytes]) -> Entry | str:
    """The entry the hash holds, or what is wrong with its fields (``_entries.TIME``, ``FIELDS``)."""
    try:
        answered_at = float(fields[b"a"])
    except (KeyError, ValueError):
        return TIME
    if fields.get(b"t", b"1") != b"1":  # written as "1" when terminal, else left out
        return FIELDS
    try:
        return Entry(
            answered_at=answered_at,
            request_id=fields.get(b"r", b"").decode(),
            payload=bytes(fields.get(b"p", b"")),
            terminal=b"t" in fields,
            error_code=fields.get(b"c", b"").decode(),
            error_message=fields.get(b"m", b"").decode(),
        )
    except UnicodeDecodeError:
        return FIELDS


class RedisAnswerStore:
    """``Store`` on Redis, shared by every replica of ``account``; see the module docstring."""

    def __init__(
        self,
        client: shared_redis.Client,
        *,
        account: str,
        lifetimes: Lifetimes,
        max_bytes: int = DEFAULT_SHARED_ANSWERS_MAX_BYTES,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        where: str = "(unnamed)",
    ) -> None:
        self.where = where  # for the logs: the URL (redacted) or the sentinels' master
        self._lifetimes = lifetimes
        self._max_bytes = max_bytes
        # The accounting outlives every entry it counts: each put extends it to the longest lifetime.
        self._accounting_ms = _ms(max(lifetimes.terminal, lifetimes.not_found, lifetimes.changing))
        self._clock = clock
        self._errors = metrics.store_errors if metrics is not None else None
        self._invalid = metrics.store_invalid if metrics is not None else None
        # Made here, at start-up: the series exists before the first eviction.
        self._evictions = (
            metrics.cache_evictions.labels(reason=SHARED_EVICTION_REASON) if metrics is not None else None
        )
        self._invalid_warned_at = float("-inf")
        self._invalid_unwarned = 0
        self.stamp_lifetime = max(MIN_STAMP_LIFETIME, 2 * lifetimes.changing)
        self._stamp_ms = _ms(self.stamp_lifetime)
        # Leases taken by this instance carry its token: only it gives them up early.
        self._token = secrets.token_hex(16)
        # Short time-outs (shared_redis.connect): the caller falls back to its own store rather than wait.
        self._client = client
        self._put = self._script(PUT_SCRIPT)
        self._get = self._script(GET_SCRIPT)
        self._invalidate = self._script(INVALIDATE_SCRIPT)
        self._want = self._script(WANT_SCRIPT)
        self._next_due = self._script(NEXT_DUE_SCRIPT)
        self._unlease = self._script(UNLEASE_SCRIPT)
        self._lease = self._script(LEASE_SCRIPT)
        self._mend = self._client.register_script(MEND_SCRIPT)
        self._postpone = self._script(POSTPONE_SCRIPT)
        self._drop = self._script(DROP_SCRIPT)
        self._forget = self._script(FORGET_SCRIPT)
        self.prefix = shared_redis.prefix("answers", account) + ":"

    def _script(self, source: str) -> Callable[..., Awaitable[Any]]:
        """``source`` registered, called as ``(keys=, args=)``; a WRONGTYPE error is mended (see
        ``_mended``) and the script run once more, not taken for Redis failing."""
        script = self._client.register_script(source)

        async def run(*, keys: Sequence[str], args: Sequence[Any]) -> Any:
            return await self._mending(keys, lambda: script(keys=keys, args=args))

        return run

    async def _mending(self, names: Sequence[str], command: Callable[[], Awaitable[T]]) -> T:
        """``command()``; on WRONGTYPE, whichever of ``names`` holds another type than the store
        writes is deleted and the command run once more. Once more even when this call deleted
        nothing: a concurrent one may have mended the key between the refusal and the mending (seen
        in CI: a put refused for the wanted set a want had just mended). A second WRONGTYPE is
        raised: then something else is wrong, not a stray key."""
        try:
            return await command()
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
        types = [KEY_TYPES.get(name[len(self.prefix) :].split(":", 1)[0], "none") for name in names]
        mended = cast("list[int]", await self._mend(keys=names, args=types))
        for _ in mended:
            self._rejected(WRONG_TYPE, "")
        return await command()

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """Every failure as StoreUnavailable, counted by kind (a reply that does not parse: refused)."""
        try:
            yield
        except STORE_ERRORS as exc:
            kind = shared_redis.classify(exc)
            self._count(kind)
            raise StoreUnavailable(shared_redis.describe(exc), kind) from exc
        except SHAPE_ERRORS as exc:
            self._count("refused")
            raise StoreUnavailable(f"answered nonsense ({type(exc).__name__}: {exc})", "refused") from exc

    def _count(self, kind: shared_redis.Kind) -> None:
        if self._errors is not None:
            self._errors.labels(role="answers", kind=kind).inc()

    def _latest(self) -> str:
        """The latest time a replica can have written now (beyond: forged, or a broken clock)."""
        return repr(self._clock() + CLOCK_TOLERANCE)

    def _rejected(self, what: str, action: str) -> None:
        """Count and (rate-limited) log something invalid read from Redis; never its content."""
        if self._invalid is not None:
            self._invalid.labels(role="answers", what=what).inc()
        now = time.monotonic()
        if now < self._invalid_warned_at + INVALID_WARN_EVERY:
            self._invalid_unwarned += 1
            return
        log.warning(
            "shared answers: dropped an invalid %s read from Redis (%s of %s), and %d more since the "
            "last warning; asking TIW instead (see tiw_store_invalid_total)",
            {STAMP: "invalidation stamp", WRONG_TYPE: "key of the wrong type"}.get(what, "entry"),
            what,
            action or "the store",
            self._invalid_unwarned,
        )
        self._invalid_warned_at = now
        self._invalid_unwarned = 0

    async def _checked(self, key: Key, fields: dict[bytes, bytes]) -> Entry | None:
        """The entry ``fields`` hold if it is valid as ``key``'s answer; else dropped and None."""
        if not fields:
            return None
        entry = _parse(fields)
        what = entry if isinstance(entry, str) else invalid(key, entry, self._clock())
        if what is None:
            assert isinstance(entry, Entry)
            return entry
        self._rejected(what, key.action)
        read = [part for pair in fields.items() for part in pair]
        names = (self.entry_key(key), self.schedule_key(key.action), *self.accounting_keys())
        await self._drop(keys=names, args=(*read, key.text()))
        return None

    def entry_key(self, key: Key) -> str:
        return f"{self.prefix}e:{key.text()}"

    def stamp_key(self, key: Key) -> str:
        return f"{self.prefix}i:{key.text()}"

    def lease_key(self, key: Key) -> str:
        return f"{self.prefix}l:{key.text()}"

    def wanted_key(self, action: str) -> str:
        return f"{self.prefix}w:{action}"

    def schedule_key(self, action: str) -> str:
        return f"{self.prefix}s:{action}"

    def accounting_keys(self) -> tuple[str, str, str, str]:
        """The answers' share of Redis: used, until, sizes, bytes (the scripts' order)."""
        return (f"{self.prefix}used", f"{self.prefix}until", f"{self.prefix}sizes", f"{self.prefix}bytes")

    async def _call(self, pending: Awaitable[T]) -> T:
        with self._unavailable():
            return await pending

    async def get(self, key: Key) -> Entry | None:
        # One script (EVALSHA), one round trip: this is every non-terminal call's read.
        return (await self.get_many((key,)))[0]

    async def get_many(self, keys: Sequence[Key]) -> list[Entry | None]:
        """Every entry read, and marked used, by one script."""
        if not keys:
            return []
        names = (self.accounting_keys()[0], *(self.entry_key(key) for key in keys))
        args: list[str | float] = [repr(self._clock()), USE_RESOLUTION, *(key.text() for key in keys)]
        with self._unavailable():
            replies = cast("list[list[bytes]]", await self._get(keys=names, args=args))
            if len(replies) != len(keys):
                raise ValueError(f"{len(replies)} entries for {len(keys)} keys")
            found = [dict(zip(reply[::2], reply[1::2], strict=True)) for reply in replies]
            return [await self._checked(key, fields) for key, fields in zip(keys, found, strict=True)]

    async def put(self, key: Key, entry: Entry, *, asked_at: float) -> bool:
        keys = (
            self.entry_key(key),
            self.stamp_key(key),
            self.schedule_key(key.action),
            self.wanted_key(key.action),
            *self.accounting_keys(),
        )
        final = "1" if entry.terminal or entry.is_error else "0"
        # An entry lives for its lifetime from when its request was sent (as the in-process store
        # keeps it), counted on our clock, which took answered_at, not on Redis's, which may be skewed.
        lifetime = _ms(self._lifetimes.of(entry) - entry.age(self._clock()))
        args = (
            repr(asked_at),
            repr(entry.answered_at),
            lifetime,
            final,
            key.text(),
            self._latest(),
            repr(self._clock()),
            self._max_bytes,
            ENTRY_OVERHEAD,
            self.prefix,
            self._accounting_ms,
            EVICT_BATCH,
            *_fields(entry),
        )
        with self._unavailable():
            reply = cast("list[int | bytes]", await self._put(keys=keys, args=args))
            evicted = cast(int, reply[1])
            if evicted and self._evictions is not None:
                self._evictions.inc(evicted)
            for what in reply[2:]:
                self._rejected(cast(bytes, what).decode(), key.action)
            return reply[0] == 1

    async def _over_keys(
        self,
        script: Callable[..., Awaitable[Any]],
        keys: Iterable[Key],
        names: Callable[[Key], tuple[str, ...]],
        args: Sequence[str | int],
        first: Sequence[str] = (),
    ) -> None:
        """One run of ``script`` for a batch of keys (none: no run). Its KEYS: ``first``, then each
        key's ``names``; its ARGV: ``args``, then each key's text."""
        keys = list(keys)
        if keys:
            every = [*first, *(name for key in keys for name in names(key))]
            await self._call(script(keys=every, args=[*args, *(key.text() for key in keys)]))

    async def invalidate(self, keys: Iterable[Key], *, at: float) -> None:
        await self._over_keys(
            self._invalidate,
            keys,
            lambda key: (self.entry_key(key), self.stamp_key(key), self.schedule_key(key.action)),
            [repr(at), self._stamp_ms, self._latest()],
            first=self.accounting_keys(),
        )

    async def postpone(self, key: Key, *, at: float) -> None:
        await self._call(self._postpone(keys=(self.schedule_key(key.action),), args=(repr(at), key.text())))

    async def lease(self, key: Key, seconds: float) -> bool:
        reply = await self._call(self._lease(keys=(self.lease_key(key),), args=(self._token, _ms(seconds))))
        taken, mended = cast("list[int]", reply)
        if mended:
            self._rejected(WRONG_TYPE, key.action)
        return taken == 1

    async def claim(self, key: Key, seconds: float) -> float:
        """Take ``key``'s confirmation turn for ``seconds``, across replicas (``_confirm.py``): 0.0 if
        taken, else the seconds until the turn another replica took ends."""
        name = f"{self.prefix}h:{key.text()}"
        with self._unavailable():
            if await self._mending((name,), lambda: self._client.set(name, "1", nx=True, px=_ms(seconds))):
                return 0.0
            left = await self._client.pttl(name)
            if left == -1:  # no expiry: no replica wrote it, and it would hold the turn for ever
                await self._client.delete(name)
                self._rejected(WRONG_TYPE, key.action)
        return left / 1000 if left > 0 else 0.0  # gone meanwhile: the turn is free

    async def unlease(self, key: Key) -> None:
        await self._call(self._unlease(keys=(self.lease_key(key),), args=(self._token,)))

    async def want(self, keys: Iterable[Key], *, until: float) -> None:
        await self._over_keys(
            self._want,
            keys,
            lambda key: (self.wanted_key(key.action), self.schedule_key(key.action), self.entry_key(key)),
            [repr(until), self._latest()],
        )

    async def next_due(self, action: str, *, older_than: float, lease: float, now: float) -> Key | None:
        keys = (self.schedule_key(action), self.wanted_key(action))
        args = (repr(now), repr(older_than), _ms(lease), self._token, f"{self.prefix}l:", SCAN)
        with self._unavailable():
            member = await self._next_due(keys=keys, args=args)
            if member is None:
                return None
            try:
                key = Key.from_text(cast(bytes, member).decode())
            except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
                key = None
            if key is None or key.action != action:
                # Not a key of this action: no refresh could be asked from it. Dropped, or it would
                # come back as the oldest every time.
                self._rejected(SCHEDULE, action)
                await self._forget(keys=keys, args=(member,))
                return None
            return key

    async def heartbeat(self, *, ttl: float) -> bool:
        """Renew this instance's marker for ``ttl`` seconds; whether it was still there (gone: Redis
        lost what it held since the last beat, or evicted it)."""
        marker = f"{self.prefix}alive:{self._token}"
        with self._unavailable():
            renewed = await self._mending(
                (marker,), lambda: self._client.set(marker, "1", px=_ms(ttl), get=True)
            )
            return renewed is not None

    async def aclose(self) -> None:
        # Closing the connections of a Redis that is down is not a failure of the shutdown.
        with suppress(StoreUnavailable):
            await self._call(self._client.aclose())
