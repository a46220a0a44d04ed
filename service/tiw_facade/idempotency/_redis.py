"""The idempotency records of every replica, in Redis (``RedisStore``): a hash per key, claimed and
settled by Lua scripts, so two replicas never both own a key; waiters poll.

A Redis that comes back empty (restarted without persistence, flushed, failed over to an empty
replica) has forgotten every key: a retry would be sent again. So the store keeps a marker beside
the records, checked by every claim (in the same script) and every ``MARKER_INTERVAL`` (``Keys``
calls ``check``): a marker this process saw, then missing, is a loss. It is written again with the
loss's time, and for ``TIW_IDEMPOTENCY_LOSS_WINDOW`` after it every replica refuses a key it has no
record of (``IdempotencyRecordsLost``) rather than risk a second task.

A marker notices a loss; ``TIW_IDEMPOTENCY_REPLICAS`` prevents the commonest one, a failover to a
replica the claim had not reached: with it, a claim must be acknowledged by that many replicas
(Redis ``WAIT``) before the request is sent, else it is released and nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, cast

from redis.asyncio import Redis

from tiw_facade import shared_redis
from tiw_facade.failures import IdempotencyRecordsLost, IdempotencyUnavailable
from tiw_facade.idempotency._records import Record

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics

# The package's logger: operators filter on it, whichever module of the package logs.
log = logging.getLogger("tiw_facade.idempotency")

# How often a waiter on another replica's request looks at Redis again.
POLL_INTERVAL = 0.05
STORE_ERRORS = shared_redis.ERRORS
# WAIT's own time-out, as a share of the client's socket time-out: its answer (a count, perhaps too
# small) must come back before the socket gives up, which would say nothing of the replicas.
WAIT_SHARE = 0.8

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
