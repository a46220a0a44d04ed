"""Idempotency keys: a request sent to TIW at most once per key, its answer replayed to every retry.

Per account and key the store keeps the request's fingerprint and where it stands: in flight (one
sender, on one replica, owns it), answered (the response's bytes), failed with a TIW error TIW did
execute (replayed as that error), or unknown (sent, never answered: never sent again). An outcome
that proves TIW did nothing releases the key, so a retry tries again. docs/idempotency.md is the
callers' side of this.

Two stores, one interface: in process (bounded; the oldest key is forgotten first) and Redis (a hash
per key, claimed and settled by Lua scripts, so two replicas never both own a key). Knows nothing
of gRPC: the handler reads the key from metadata and says how a replay is marked.

A Redis that comes back empty (restarted without persistence, flushed, failed over to an empty
replica) has forgotten every key: a retry would be sent again. So the Redis store keeps a marker
beside the records, checked by every claim (in the same script) and every ``MARKER_INTERVAL``: a
marker this process saw, then missing, is a loss. It is written again with the loss's time, and for
``TIW_IDEMPOTENCY_LOSS_WINDOW`` after it every replica refuses a key it has no record of
(``IdempotencyRecordsLost``) rather than risk a second task.

A marker notices a loss; ``TIW_IDEMPOTENCY_REPLICAS`` prevents the commonest one, a failover to a
replica the claim had not reached: with it, a claim must be acknowledged by that many replicas
(Redis ``WAIT``) before the request is sent, else it is released and nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from redis.asyncio import Redis

from tiw_facade import background, shared_redis
from tiw_facade.failures import (
    FacadeError,
    IdempotencyInFlight,
    IdempotencyKeyReused,
    IdempotencyRecordsLost,
    IdempotencyUnavailable,
    InvalidRequest,
    Outcome,
    OutcomeUnknown,
    TiwError,
)

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics
    from tiw_facade.settings import Settings

log = logging.getLogger("tiw_facade.idempotency")

M = TypeVar("M")

# TIW's codes that say it refused the request without executing it: the key is released.
NOT_EXECUTED = (
    "RequestLimitExceeded",
    "AuthFailure",
    "InvalidParameter",
    "MissingParameter",
    "UnknownParameter",
)
# Beyond the longest the sender itself may take, what writing the outcome (and replicas' clocks
# disagreeing) may add: past it, an in-flight record's sender is taken to be gone (its replica died).
SETTLE_SLACK = 5.0
# How often a waiter on another replica's request looks at Redis again.
POLL_INTERVAL = 0.05
STORE_ERRORS = shared_redis.ERRORS
MAX_KEY_LENGTH = 255
# How often an idle replica looks at the marker: a loss is noticed (logged, counted, the window
# started) soon after Redis comes back, not only at the next keyed create.
MARKER_INTERVAL = 10.0
# WAIT's own time-out, as a share of the client's socket time-out: its answer (a count, perhaps too
# small) must come back before the socket gives up, which would say nothing of the replicas.
WAIT_SHARE = 0.8


class State(enum.StrEnum):
    IN_FLIGHT = "in_flight"  # claimed by a sender that has not settled it yet
    ANSWERED = "answered"  # TIW answered: ``answer`` is the response's bytes
    FAILED = "failed"  # TIW answered an error it executed (or may have): replayed as that error
    UNKNOWN = "unknown"  # sent, never answered: TIW may have executed it; never sent again
    # Unknown to the store soon after it lost its records (it may have been sent before): refused
    # for the rest of its TTL, so a retry after the loss window cannot send it either.
    LOST = "lost"


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    fingerprint: str
    state: State
    token: str = ""  # the claim's: only its owner settles it
    until: float = 0.0  # IN_FLIGHT: Unix time by which the owner settles it, unless it died
    answer: bytes = b""
    code: str = ""
    message: str = ""
    request_id: str = ""

    def fields(self) -> dict[str, str | bytes]:
        return {
            "fingerprint": self.fingerprint,
            "state": self.state.value,
            "token": self.token,
            "until": repr(self.until),
            "answer": self.answer,
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
        }

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> Record:
        text = {name.decode(): value for name, value in fields.items()}
        return cls(
            fingerprint=text["fingerprint"].decode(),
            state=State(text["state"].decode()),
            token=text["token"].decode(),
            until=float(text["until"]),
            answer=text["answer"],
            code=text["code"].decode(),
            message=text["message"].decode(),
            request_id=text["request_id"].decode(),
        )


def key_violation(key: str) -> str | None:
    """Why ``key`` is not an idempotency key (1..255 printable ASCII characters), or None."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        return f"must be 1 to {MAX_KEY_LENGTH} characters long, not {len(key)}"
    if not all(" " <= c <= "~" for c in key):
        return "must be printable ASCII (space to ~)"
    return None


def key_hash(key: str) -> str:
    """How a key appears in Redis, logs and statuses: a key may be something the caller keeps secret."""
    return hashlib.sha256(key.encode()).hexdigest()


def fingerprint(action: str, request: bytes) -> str:
    """Of a request's canonical bytes (``SerializeToString(deterministic=True)``)."""
    return hashlib.sha256(action.encode() + b"\0" + request).hexdigest()


class Store(Protocol):
    backend: str

    async def claim(self, scope: str, key: str, record: Record, ttl: float) -> Record | None:
        """Store ``record`` (in flight, ours) unless the key has one: None if stored, else that one."""

    async def get(self, scope: str, key: str) -> Record | None: ...

    async def settle(self, scope: str, key: str, token: str, record: Record | None, ttl: float) -> None:
        """Replace the claim ``token`` owns with ``record`` (None: release the key); a claim no longer
        ours (expired, forgotten) is left alone."""

    async def changed(self, scope: str, key: str, at_most: float) -> None:
        """Return when the key's record may have changed, or after ``at_most`` seconds."""

    async def aclose(self) -> None: ...


@dataclasses.dataclass(slots=True)
class _Entry:
    record: Record
    expires: float  # time.monotonic()
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class MemoryStore:
    """This process's keys, at most ``max_keys``: the oldest is forgotten first (a retry with a
    forgotten key is a new request). Waiters on an in-flight key wake on an asyncio.Event."""

    backend = "memory"

    def __init__(self, max_keys: int) -> None:
        self._max_keys = max_keys
        # In order of expiry: every write gives the full TTL and moves its entry to the end.
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def _live(self, scope: str, key: str) -> _Entry | None:
        entry = self._entries.get((scope, key))
        if entry is not None and entry.expires <= time.monotonic():
            self._drop((scope, key))
            return None
        return entry

    def _drop(self, name: tuple[str, str]) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            entry.changed.set()

    def _put(self, name: tuple[str, str], record: Record, ttl: float) -> None:
        now = time.monotonic()
        while self._entries:
            oldest, entry = next(iter(self._entries.items()))
            if entry.expires > now and len(self._entries) < self._max_keys:
                break
            self._drop(oldest)
        self._entries[name] = _Entry(record, now + ttl)

    async def claim(self, scope: str, key: str, record: Record, ttl: float) -> Record | None:
        entry = self._live(scope, key)
        if entry is not None:
            return entry.record
        self._put((scope, key), record, ttl)
        return None

    async def get(self, scope: str, key: str) -> Record | None:
        entry = self._live(scope, key)
        return entry.record if entry is not None else None

    async def settle(self, scope: str, key: str, token: str, record: Record | None, ttl: float) -> None:
        entry = self._live(scope, key)
        if entry is None or entry.record.token != token:
            return
        self._drop((scope, key))  # wakes the waiters
        if record is not None:
            self._put((scope, key), record, ttl)

    async def changed(self, scope: str, key: str, at_most: float) -> None:
        entry = self._live(scope, key)
        if entry is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.changed.wait(), at_most)

    async def aclose(self) -> None:
        self._entries.clear()


# The marker's check, the start of both scripts below. KEYS[1] the marker (a hash: ``written``, when
# it was written, and ``lost``, when it was written again after a loss, or ''). ARGV[1] now (Unix
# seconds), ARGV[2] the ``written`` this process last saw ('' none). Missing: written anew, and a
# loss if this process had seen it (a Redis empty at a process's first use is a fresh one).
_MARKER_LUA = """
local written = redis.call('HGET', KEYS[1], 'written')
local lost = redis.call('HGET', KEYS[1], 'lost') or ''
if not written then
  written = ARGV[1]
  if ARGV[2] ~= '' then lost = ARGV[1] end
  redis.call('HSET', KEYS[1], 'written', written, 'lost', lost)
end
"""
MARKER_SCRIPT = _MARKER_LUA + "return {written, lost}\n"
# KEYS[2] the key's hash. ARGV[3] the loss window in seconds, ARGV[4] TTL in ms, then the record's
# fields as name, value pairs. Returns {written, lost, what}: what is the key's record (HGETALL),
# 'claimed', or 'lost' (no record within the window after a loss: recorded as such, not claimed).
CLAIM_SCRIPT = (
    _MARKER_LUA
    + """
if redis.call('EXISTS', KEYS[2]) == 1 then return {written, lost, redis.call('HGETALL', KEYS[2])} end
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if lost ~= '' and tonumber(ARGV[1]) - tonumber(lost) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[2], 'state', 'lost')
  return {written, lost, 'lost'}
end
return {written, lost, 'claimed'}
"""
)
# ARGV: the claim's token, TTL in ms, then the new record's fields (none: release).
SETTLE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if #ARGV > 2 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""


class RedisStore:
    """The keys of every replica: a hash per key, claimed with one atomic script (so two replicas
    never both send), polled by waiters; and the marker that tells a lost store (see the module)."""

    backend = "redis"

    def __init__(
        self,
        client: shared_redis.Client,
        *,
        metrics: Metrics | None = None,
        where: str = "",
        loss_window: float = 0.0,
        replicas: int = 0,
        replica_timeout: float = 0.25,
    ) -> None:
        self._client = client
        self._replicas = replicas  # that must acknowledge a claim before it is sent; 0: no WAIT
        self._wait_ms = max(1, int(replica_timeout * 1000 * WAIT_SHARE))  # WAIT 0 would block forever
        self._claim = self._client.register_script(CLAIM_SCRIPT)
        self._settle = self._client.register_script(SETTLE_SCRIPT)
        self._mark = self._client.register_script(MARKER_SCRIPT)
        self._errors = metrics.store_errors if metrics is not None else None
        self._lost_counter = metrics.idempotency_records_lost if metrics is not None else None
        self._where = where  # Target.where: no secrets
        self._loss_window = loss_window
        self._seen = ""  # the marker's ``written`` this process last saw: '' before the first use
        self.lost_at = 0.0  # Unix time of the last loss (noticed here or by another replica); 0 none

    @staticmethod
    def _name(scope: str, key: str) -> str:
        return f"{shared_redis.prefix('idempotency', scope)}:{key}"

    @staticmethod
    def _marker(scope: str) -> str:
        # In the account's {hash tag}, like its records: one Cluster slot for the claim's two keys.
        return f"{shared_redis.prefix('idempotency', scope)}:marker"

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        try:
            yield
        except STORE_ERRORS as exc:
            self._count(exc)
            raise

    def _count(self, exc: BaseException) -> None:
        if self._errors is not None:
            self._errors.labels(role="idempotency", kind=shared_redis.classify(exc)).inc()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[shared_redis.Client]:
        """Where to write: with WAIT to follow, one connection held for both, since WAIT counts the
        acknowledgements of its own connection's last write (on another pooled connection it would
        count an older write, or none). Cluster is refused with replicas by the settings."""
        if not self._replicas or not isinstance(self._client, Redis):
            yield self._client
            return
        async with self._client.client() as pinned:
            yield pinned

    async def _acknowledged(self, client: shared_redis.Client) -> tuple[int, str]:
        """WAIT for the replicas to have ``client``'s last write: how many do, and why not ('' none)."""
        try:
            acked = int(await client.wait(self._replicas, self._wait_ms))
        except STORE_ERRORS as exc:
            self._count(exc)
            return 0, shared_redis.describe(exc)
        if acked < self._replicas:
            return acked, f"{acked} of {self._replicas} replicas acknowledged it within {self._wait_ms} ms"
        return acked, ""

    @staticmethod
    def _pairs(record: Record) -> list[str | bytes]:
        return [item for pair in record.fields().items() for item in pair]

    def _marked(self, written: bytes, lost: bytes) -> None:
        """Take in the marker a script found (and wrote, if missing): a loss if it is not the one seen."""
        now_written = written.decode()
        if lost:
            self.lost_at = max(self.lost_at, float(lost))
        if self._seen and now_written != self._seen:
            # Missing (written again by this script) or written again by another replica's: either
            # way the records this process relied on are gone. Once per loss: _seen moves on.
            log.error(
                "the idempotency records were lost: Redis at %s came back without them; keys it has "
                "no record of are refused (IDEMPOTENCY_RECORDS_LOST) for TIW_IDEMPOTENCY_LOSS_WINDOW",
                self._where,
                extra={"redis": self._where, "lost_at": self.lost_at, "loss_window": self._loss_window},
            )
            if self._lost_counter is not None:
                self._lost_counter.inc()
        self._seen = now_written

    async def check(self, scope: str) -> None:
        """Look at the marker (writing it if missing): notices a loss without waiting for a claim."""
        with self._counted():
            written, lost = await self._mark(keys=[self._marker(scope)], args=[repr(time.time()), self._seen])
        self._marked(written, lost)

    async def claim(self, scope: str, key: str, record: Record, ttl: float) -> Record | None:
        args = [repr(time.time()), self._seen, repr(self._loss_window), int(ttl * 1000), *self._pairs(record)]
        with self._counted():
            async with self._connection() as client:
                written, lost, found = await self._claim(
                    keys=[self._marker(scope), self._name(scope, key)], args=args, client=client
                )
                self._marked(written, lost)
                if found == b"claimed":
                    if self._replicas:
                        await self._durable(client, scope, key, record.token)
                    return None
        if found == b"lost":
            raise IdempotencyRecordsLost(key, self.lost_at)
        return Record.parse(dict(zip(found[::2], found[1::2], strict=True)))

    async def _durable(self, client: shared_redis.Client, scope: str, key: str, token: str) -> None:
        """Return once enough replicas have the claim just written; else release it and refuse."""
        _, why = await self._acknowledged(client)
        if not why:
            return
        # The claim may or may not be on a replica, and nothing was sent: delete it (our token only),
        # so a retry may claim the key again. If the delete does not reach the replica either, a
        # failover brings the claim back, in flight: retries wait for it, then get OUTCOME_UNKNOWN.
        # Wrongly pessimistic, never a second task. Keeping it instead would block the key even
        # without a failover; marking it released is a write that can fail to replicate in the same way.
        try:
            await self._settle(keys=[self._name(scope, key)], args=[token, 0], client=client)
        except STORE_ERRORS as exc:
            self._count(exc)  # the claim then lapses: OUTCOME_UNKNOWN, as when a sender dies
        log.warning(
            "an idempotency claim did not reach the replicas: released, and the create was not sent",
            extra={"idempotency_key_sha256": key, "redis": self._where, "error": why},
        )
        raise IdempotencyUnavailable(f"the record could not be made durable: {why}")

    async def get(self, scope: str, key: str) -> Record | None:
        with self._counted():
            found = cast(dict[bytes, bytes], await self._client.hgetall(self._name(scope, key)))
        return Record.parse(found) if found else None

    async def settle(self, scope: str, key: str, token: str, record: Record | None, ttl: float) -> None:
        fields = self._pairs(record) if record is not None else []
        why = ""
        with self._counted():
            async with self._connection() as client:
                mine = await self._settle(
                    keys=[self._name(scope, key)], args=[token, int(ttl * 1000), *fields], client=client
                )
                # A release is not waited for: nothing was sent, and if it is lost the key is only
                # blocked (OUTCOME_UNKNOWN), never sent twice.
                if mine and record is not None and self._replicas:
                    _, why = await self._acknowledged(client)
        if why:
            # The create was sent and its caller gets the answer; only a failover now would lose it.
            log.warning(
                "the outcome under an idempotency key did not reach the replicas: after a failover "
                "now, retries would get OUTCOME_UNKNOWN instead of the answer",
                extra={"idempotency_key_sha256": key, "redis": self._where, "error": why},
            )

    async def changed(self, scope: str, key: str, at_most: float) -> None:
        await asyncio.sleep(min(at_most, POLL_INTERVAL))

    async def aclose(self) -> None:
        await self._client.aclose()


def settled_by(mine: Record, exc: BaseException) -> Record | None:
    """What a failed send leaves under its key: None (released) when it proves TIW did nothing."""
    if isinstance(exc, TiwError):
        if exc.code.startswith(NOT_EXECUTED):
            return None
        return dataclasses.replace(
            mine, state=State.FAILED, code=exc.code, message=exc.message, request_id=exc.request_id
        )
    if isinstance(exc, InvalidRequest) or getattr(exc, "outcome", None) is Outcome.NOT_SENT:
        return None
    return dataclasses.replace(mine, state=State.UNKNOWN)  # a time-out, a lost connection, a bug


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
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Keys:
        where = shared_redis.target(settings, "idempotency")
        store: Store = (
            RedisStore(
                shared_redis.connect(where),
                metrics=metrics,
                where=where.where,
                loss_window=settings.idempotency_loss_window,
                replicas=settings.idempotency_replicas,
                replica_timeout=where.timeout,
            )
            if where is not None
            else MemoryStore(settings.idempotency_max_keys)
        )
        return cls(
            store,
            scope=settings.account,
            ttl=settings.idempotency_ttl,
            sender_budget=settings.upstream_timeout,
        )

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
    ) -> M:
        """``send()`` once for ``key`` and request fingerprint ``print_``, or the outcome recorded for it.

        ``see_through(work, deadline, overdue)`` runs the send on past the caller's deadline (and
        past its going away) so the outcome is recorded; ``encode`` gives an answer's bytes and
        RequestId, ``decode`` makes an answer of them; ``replayed`` is awaited before a replay.
        """
        hashed = key_hash(key)
        while True:
            budget = (deadline - time.monotonic()) if deadline is not None else self._sender_budget
            mine = Record(
                print_,
                State.IN_FLIGHT,
                token=secrets.token_hex(16),
                until=time.time() + max(budget, 0.0) + self._sender_budget + SETTLE_SLACK,
            )
            found = await self._store_call(self.store.claim(self._scope, hashed, mine, self._ttl))
            if found is None:
                work = self._send_and_settle(hashed, mine, send, encode)
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
                await self._store_call(self.store.changed(self._scope, hashed, wait))
                found = await self._store_call(self.store.get(self._scope, hashed))
            # Released (TIW did nothing): this call tries in its turn.

    async def _send_and_settle(
        self,
        hashed: str,
        mine: Record,
        send: Callable[[], Awaitable[M]],
        encode: Callable[[M], tuple[bytes, str]],
    ) -> M:
        try:
            response = await send()
        except BaseException as exc:
            await self._settle(hashed, mine, settled_by(mine, exc))
            raise
        answer, request_id = encode(response)
        record = dataclasses.replace(mine, state=State.ANSWERED, answer=answer, request_id=request_id)
        await self._settle(hashed, mine, record)
        return response

    async def _settle(self, hashed: str, mine: Record, record: Record | None) -> None:
        try:
            await self.store.settle(self._scope, hashed, mine.token, record, self._ttl)
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
