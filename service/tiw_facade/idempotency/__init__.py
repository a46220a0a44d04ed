"""Idempotency keys: a request sent to TIW at most once per key, its answer replayed to every retry.

Per account and key the store keeps the request's fingerprint and where it stands: in flight (one
sender, on one replica, owns it), answered (the response's bytes), failed with a TIW error TIW did
execute (replayed as that error), or unknown (sent, never answered: never sent again). An outcome
that proves TIW did nothing releases the key, so a retry tries again. docs/idempotency.md is the
callers' side of this.

Two stores, one interface: in process (bounded; the oldest key is forgotten first) and Redis (a hash
per key, claimed and settled by Lua scripts, so two replicas never both own a key). Knows nothing
of gRPC: the handler reads the key from metadata and says how a replay is marked.

``Keys`` (here) sends at most once per key and replays the outcome; the pieces it composes:
``_records`` (the records, the key's rules and hash, the request's fingerprint), ``_memory`` (the
``Store`` interface and the in-process store) and ``_redis`` (the Redis store, its scripts, the
marker that notices a Redis that lost its records, and ``WAIT`` for replicas' acknowledgement).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from tiw_facade import background, shared_redis
from tiw_facade.failures import (
    FacadeError,
    IdempotencyInFlight,
    IdempotencyKeyReused,
    IdempotencyRecordsLost,
    IdempotencyUnavailable,
    OutcomeUnknown,
    TiwError,
)
from tiw_facade.idempotency._memory import MemoryStore, Store
from tiw_facade.idempotency._records import Record, State, fingerprint, key_hash, key_violation, settled_by
from tiw_facade.idempotency._redis import STORE_ERRORS, RedisStore

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics
    from tiw_facade.settings import Settings

__all__ = [
    "Keys",
    "KeysConfig",
    "MemoryStore",
    "Record",
    "RedisStore",
    "Send",
    "State",
    "Store",
    "fingerprint",
    "key_hash",
    "key_violation",
    "settled_by",
]

log = logging.getLogger("tiw_facade.idempotency")

M = TypeVar("M")

# Beyond the longest the sender itself may take, what writing the outcome (and replicas' clocks
# disagreeing) may add: past it, an in-flight record's sender is taken to be gone (its replica died).
SETTLE_SLACK = 5.0
# How often an idle replica looks at the marker: a loss is noticed (logged, counted, the window
# started) soon after Redis comes back, not only at the next keyed create.
MARKER_INTERVAL = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class KeysConfig:
    """One account's keys and where they are kept; seconds, unless named otherwise."""

    scope: str  # the account (TIW_RATE_LIMIT_ACCOUNT, else the SecretId): whose keys these are
    ttl: float = 86400.0  # TIW_IDEMPOTENCY_TTL: how long an outcome is replayed
    sender_budget: float = 10.0  # TIW_UPSTREAM_TIMEOUT: what a request sent may take past its caller
    redis: shared_redis.Target | None = None  # TIW_IDEMPOTENCY_REDIS_URL / TIW_REDIS_URL; None: in process
    max_keys: int = 16_384  # TIW_IDEMPOTENCY_MAX_KEYS (the default budget's): kept in process, without Redis
    loss_window: float = 300.0  # TIW_IDEMPOTENCY_LOSS_WINDOW (with Redis)
    replicas: int = 0  # TIW_IDEMPOTENCY_REPLICAS: that acknowledge a claim (with Redis; 0: no WAIT)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeysConfig:
        return cls(
            scope=settings.account,
            ttl=settings.idempotency_ttl,
            sender_budget=settings.upstream_timeout,
            redis=shared_redis.target(settings, "idempotency"),
            max_keys=settings.idempotency_max_keys,
            loss_window=settings.idempotency_loss_window,
            replicas=settings.idempotency_replicas,
        )


# How a send is seen through: (the work, the caller's deadline, the failure once it passes) -> its result.
Send = Callable[[Coroutine[Any, Any, M], float | None, Callable[[], FacadeError]], Awaitable[M]]


class Keys:
    """The keys of one account: ``call`` sends a request at most once per key and replays its outcome."""

    def __init__(self, store: Store, *, scope: str, ttl: float, sender_budget: float) -> None:
        self.store = store
        self._scope = scope
        self._ttl = ttl
        self._sender_budget = sender_budget  # beyond the caller's deadline, what a sent request may take
        self._watcher: asyncio.Task[None] | None = None
        if isinstance(store, RedisStore):
            # From start-up, so the marker is seen (and a later loss noticed) before the first create.
            with contextlib.suppress(RuntimeError):  # no running loop: claims still check it
                self._watcher = asyncio.get_running_loop().create_task(self._watch(store))

    @classmethod
    def from_config(cls, config: KeysConfig, metrics: Metrics | None = None) -> Keys:
        """The keys in the store ``config`` names: its Redis, else this process's memory."""
        where = config.redis
        store: Store = (
            RedisStore(
                shared_redis.connect(where),
                metrics=metrics,
                where=where.where,
                loss_window=config.loss_window,
                replicas=config.replicas,
                replica_timeout=where.timeout,
            )
            if where is not None
            else MemoryStore(config.max_keys)
        )
        return cls(store, scope=config.scope, ttl=config.ttl, sender_budget=config.sender_budget)

    async def _watch(self, store: RedisStore) -> None:
        while True:
            try:
                await store.check(self._scope)
            except STORE_ERRORS:
                pass  # counted in tiw_store_errors_total; keyed creates report it (IDEMPOTENCY_UNAVAILABLE)
            except Exception:
                log.exception("could not check the idempotency store's marker")
            await asyncio.sleep(MARKER_INTERVAL)

    async def aclose(self) -> None:
        if self._watcher is not None:
            await background.stop([self._watcher])
        await self.store.aclose()

    async def call(
        self,
        key: str,
        print_: str,
        *,
        deadline: float | None,
        send: Callable[[], Awaitable[M]],
        see_through: Send[M],
        encode: Callable[[M], tuple[bytes, str]],
        decode: Callable[[bytes], M],
        replayed: Callable[[], Awaitable[None]],
        owner: str | None = None,
    ) -> M:
        """``send()`` once for ``key`` and request fingerprint ``print_``, or the outcome recorded for it.

        ``owner``: the caller's proven identity, whose keys are its own: another caller's same key
        neither replays its answer nor blocks it. Without one (an unauthenticated caller), keys are
        the account's, as they always were, so records made before authentication still hold.
        Failures name the key by its own SHA-256 either way.

        ``see_through(work, deadline, overdue)`` runs the send on past the caller's deadline (and
        past its going away) so the outcome is recorded; ``encode`` gives an answer's bytes and
        RequestId, ``decode`` makes an answer of them; ``replayed`` is awaited before a replay.
        """
        hashed = key_hash(key)
        name = hashed if owner is None else key_hash(f"{owner}\x00{key}")  # where the record lives
        while True:
            budget = (deadline - time.monotonic()) if deadline is not None else self._sender_budget
            mine = Record(
                print_,
                State.IN_FLIGHT,
                token=secrets.token_hex(16),
                until=time.time() + max(budget, 0.0) + self._sender_budget + SETTLE_SLACK,
            )
            found = await self._store_call(self.store.claim(self._scope, name, mine, self._ttl))
            if found is None:
                work = self._send_and_settle(name, hashed, mine, send, encode)
                return await see_through(work, deadline, lambda: IdempotencyInFlight(hashed))
            while found is not None:
                if found.fingerprint != print_:
                    raise IdempotencyKeyReused(hashed)
                if found.state is not State.IN_FLIGHT:
                    return await self._replay(hashed, found, decode, replayed)
                if found.until <= time.time():  # its sender's replica died before it settled
                    raise OutcomeUnknown(hashed)
                wait = found.until - time.time()
                if deadline is not None:
                    if deadline <= time.monotonic():
                        raise IdempotencyInFlight(hashed)
                    wait = min(wait, deadline - time.monotonic())
                await self._store_call(self.store.changed(self._scope, name, wait))
                found = await self._store_call(self.store.get(self._scope, name))
            # Released (TIW did nothing): this call tries in its turn.

    async def _send_and_settle(
        self,
        name: str,
        hashed: str,
        mine: Record,
        send: Callable[[], Awaitable[M]],
        encode: Callable[[M], tuple[bytes, str]],
    ) -> M:
        try:
            response = await send()
        except BaseException as exc:
            await self._settle(name, hashed, mine, settled_by(mine, exc))
            raise
        answer, request_id = encode(response)
        record = dataclasses.replace(mine, state=State.ANSWERED, answer=answer, request_id=request_id)
        await self._settle(name, hashed, mine, record)
        return response

    async def _settle(self, name: str, hashed: str, mine: Record, record: Record | None) -> None:
        try:
            await self.store.settle(self._scope, name, mine.token, record, self._ttl)
        except STORE_ERRORS as exc:
            # The caller still gets the outcome; a retry finds the claim in flight until it lapses,
            # then OUTCOME_UNKNOWN: never a second send.
            log.warning(
                "could not record the outcome under an idempotency key",
                extra={
                    "idempotency_key_sha256": hashed,
                    "state": record.state.value if record else "released",
                    "tiw_request_id": record.request_id if record else "",
                    "error": shared_redis.describe(exc),
                    "kind": shared_redis.classify(exc),
                },
            )

    @staticmethod
    async def _replay(
        hashed: str, record: Record, decode: Callable[[bytes], M], replayed: Callable[[], Awaitable[None]]
    ) -> M:
        if record.state is State.UNKNOWN:
            raise OutcomeUnknown(hashed)
        if record.state is State.LOST:
            raise IdempotencyRecordsLost(hashed)
        await replayed()
        if record.state is State.FAILED:
            raise TiwError(record.code, record.message, record.request_id)
        return decode(record.answer)

    async def _store_call(self, pending: Awaitable[M]) -> M:
        try:
            return await pending
        except STORE_ERRORS as exc:
            raise IdempotencyUnavailable(type(exc).__name__) from exc
