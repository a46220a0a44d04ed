"""The Redis that replicas share state through: where each role's is, how to connect, what failed.

Four roles keep state in Redis, each possibly in a Redis of its own: the limiter's tokens
(``limiter``), the Describe answers (``answers``), the idempotency keys (``idempotency``) and TIW's
events with the callbacks already seen (``events``). This
module is the one place that knows

- where a role's Redis is (``target``): a URL (``redis://``, ``rediss://``, ``unix://``), a master
  found through Sentinel, or a Redis Cluster seeded by the URL;
- how to connect to it (``connect``): short time-outs, one immediate retry on a broken connection;
- what an error was (``classify``): Redis unreachable, too slow, or refusing the command;
- how its keys are named (``prefix``): one prefix per role, each with the account's {hash tag},
  keeping every key of an account in one Cluster slot, so every script's keys stay in one slot.

The stores themselves (limiter/_store.py, answers/_shared.py, idempotency/_redis.py) keep their scripts.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any, Literal

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    MaxClientsReachedError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tiw_facade.settings import redact_url

if TYPE_CHECKING:
    from tiw_facade.settings import Settings

Role = Literal["limiter", "answers", "idempotency", "events"]
ROLES: tuple[Role, ...] = ("limiter", "answers", "idempotency", "events")
# What went wrong, for logs and the ``kind`` label: no connection (refused, reset, DNS, no master
# known), no answer in time, or an answer that is an error (OOM, READONLY, NOSCRIPT, MASTERDOWN...).
Kind = Literal["unreachable", "timeout", "refused"]
KINDS: tuple[Kind, ...] = ("unreachable", "timeout", "refused")
# Everything that means "Redis is not answering properly": redis-py wraps socket errors, a few
# OS-level ones surface directly, and the cluster client's own errors are not RedisErrors.
ERRORS = (RedisError, RedisClusterException, OSError)
# Errors that carry Redis's own answer, though redis-py files some of them under ConnectionError.
_ANSWERED = (ResponseError, AuthenticationError, AuthorizationError, BusyLoadingError, MaxClientsReachedError)
# The start of every key of a role, ``{tag}`` the account's hash. Each holds the {hash tag}, so every
# key of an account is in one Cluster slot. The limiter's and the idempotency records' are the names
# earlier releases used: replicas of two releases side by side during a rolling upgrade must share
# one set of tokens (or the account gets twice its rate) and see every record (or a retry during
# the upgrade creates a second task).
_PREFIXES: dict[Role, str] = {
    "limiter": "tiw:limiter:{{{tag}}}",
    "answers": "tiw:{{{tag}}}:answers",
    "idempotency": "tiw-facade:idempotency:{{{tag}}}",
    "events": "tiw:{{{tag}}}:events",
}
_MAX_DETAIL = 200
_PHRASES: dict[Kind, str] = {
    "unreachable": "unreachable",
    "timeout": "did not answer in time",
    "refused": "refused the command",
}

Client = Redis | RedisCluster


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One role's Redis. With ``sentinels``, the URL gives only the password, TLS and database:
    the master is whichever the sentinels name ``master``. With ``cluster``, the URL is a seed node."""

    url: str = dataclasses.field(repr=False)  # may hold a password: ``where`` is what to show
    timeout: float = 0.25
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    cluster: bool = False

    @property
    def where(self) -> str:
        """For logs and /healthz: no password, no query (which may hold one)."""
        if self.sentinels:
            nodes = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"sentinel master {self.master!r} via {nodes}"
        return ("cluster " if self.cluster else "") + redact_url(self.url)


def target(settings: Settings, role: Role) -> Target | None:
    """Where ``role`` keeps its state: its own URL, else TIW_REDIS_URL; None: in process.

    Sentinel selects the Redis of the roles without a URL of their own (with Sentinel TIW_REDIS_URL
    is optional: the sentinels say where the master is), so that the answers, say, can still be
    given an evicting Redis of their own beside a durable Sentinel-watched one. Cluster applies to
    every role (one kind of Redis per deployment).
    """
    own = {
        "answers": settings.answers_redis_url,
        "idempotency": settings.idempotency_redis_url,
        "events": settings.events_redis_url,
    }.get(role)
    if own:
        return Target(own, settings.redis_timeout, cluster=settings.redis_cluster)
    if not settings.redis_url and not settings.redis_sentinels:
        return None
    return Target(
        settings.redis_url or "redis://",
        settings.redis_timeout,
        settings.redis_sentinels,
        settings.redis_sentinel_master,
        settings.redis_cluster,
    )


def connect(where: Target) -> Client:
    """A client of ``where``; it connects on first use (no event loop needed here).

    Short time-outs, connecting included: a slow call must not stall callers for long (the roles
    fall back or retry, and only failures that persist count). One immediate retry on a broken
    connection only (a pooled connection that died with a Redis restart or a failover); never on
    a time-out, which would double the stall.
    """
    options: dict[str, Any] = {
        "socket_timeout": where.timeout,
        "socket_connect_timeout": where.timeout,
        "retry": Retry(NoBackoff(), 1, (RedisConnectionError,)),
    }
    if where.cluster:
        return RedisCluster.from_url(where.url, **options)
    if where.sentinels:
        return _master(where, options)
    return Redis.from_url(where.url, **options)


class _SentinelMaster(Redis):
    """The master's client, which also closes the sentinels' connections (redis-py leaves them open)."""

    discovery: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.discovery is not None:
            for node in self.discovery.sentinels:
                await node.aclose()


def _master(where: Target, options: dict[str, Any]) -> Redis:
    # The URL's credentials and database go to the master; its host is the sentinels' to say.
    url: dict[str, Any] = dict(parse_url(where.url))
    tls = where.url.startswith("rediss://")
    master = {key: url[key] for key in ("username", "password", "db") if key in url}
    # The sentinels are asked without the master's password (they seldom share it), over TLS if it is.
    sentinel_options = {key: options[key] for key in ("socket_timeout", "socket_connect_timeout")}
    discovery = Sentinel(where.sentinels, sentinel_kwargs={**sentinel_options, "ssl": tls}, **options)
    client: _SentinelMaster = discovery.master_for(
        where.master, redis_class=_SentinelMaster, ssl=tls, **master
    )
    client.discovery = discovery
    return client


def classify(exc: BaseException) -> Kind:
    """Which ``Kind`` of failure ``exc`` is (looking through the exceptions it wraps)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, RedisTimeoutError | TimeoutError):
            return "timeout"
        if isinstance(seen, _ANSWERED):
            return "refused"
        seen = seen.__cause__ or seen.__context__
    return "unreachable"


def describe(exc: BaseException) -> str:
    """What happened, for a log line after "Redis at <where> ": what Redis answered, if it did."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if len(detail) > _MAX_DETAIL:
        detail = detail[: _MAX_DETAIL - 1] + "…"
    return f"{_PHRASES[classify(exc)]} ({detail})"


def prefix(role: Role, account: str) -> str:
    """The start of every key of ``role`` for ``account``, with the account's {hash tag}.

    The account (a SecretId) is hashed: no need to spell it out in Redis.
    """
    return _PREFIXES[role].format(tag=hashlib.sha256(account.encode()).hexdigest()[:16])
