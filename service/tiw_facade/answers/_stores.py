"""The process's store and Redis's, and the fall-back from one to the other: every read and write of
answers goes through here.

Terminal answers are read from the process (they never change); the others from Redis while it
answers (it alone knows of another replica's stop), else from the process. Writes go to both. Any
failure of Redis is handed to ``Contact`` (``_contact.py``), which says when Redis may be used again
and what is owed to it first; meanwhile the process's store serves, as it does without Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tiw_facade.answers import _policy
from tiw_facade.answers._contact import Contact
from tiw_facade.answers._entries import Entry, Key, Store, StoreUnavailable
from tiw_facade.answers._local import LocalStore
from tiw_facade.answers._shared import RedisAnswerStore

Publish = Callable[[Key, Entry], None]


class Stores:
    """``local`` always; ``shared`` (Redis) when configured, used while ``usable``. ``publish`` is
    told of each newer answer read from Redis (another replica's), for the key's watchers."""

    def __init__(
        self,
        local: LocalStore,
        shared: RedisAnswerStore | None,
        *,
        publish: Publish = lambda key, entry: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.local = local
        self.shared = shared
        self.publish = publish
        self.contact = Contact(
            shared,
            local,
            invalidated=_policy.INVALIDATED_ACTIONS,
            where=shared.where if shared is not None else "(none)",
            stamp_lifetime=shared.stamp_lifetime if shared is not None else 0.0,
            clock=clock,
        )

    @property
    def usable(self) -> bool:
        return self.contact.usable

    def failed(self, exc: StoreUnavailable) -> None:
        self.contact.failed(exc)

    def schedule(self) -> Store:
        """The store whose refresh schedule counts: Redis's (shared by all replicas) while usable."""
        return self.shared if self.shared is not None and self.usable else self.local

    def trusted(self, key: Key, entry: Entry | None) -> Entry | None:
        """``entry`` as read from Redis, if it may be served: not older than a stop this replica
        made (whose invalidation Redis may have lost), nor than this replica's last recovery."""
        if entry is None or not self.contact.trusted(key, entry):
            return None
        if not entry.terminal and entry.answered_at <= self.local.invalidated_at(key):
            return None
        return entry

    def adopt(self, key: Key, entry: Entry) -> None:
        """An answer another replica got: kept here too, and told to the key's watchers."""
        self.local.keep(key, entry, asked_at=entry.answered_at)
        self.publish(key, entry)

    async def lookup(self, key: Key) -> Entry | None:
        """The newest answer of ``key`` to go by."""
        local = self.local.peek(key)
        if self.shared is None or (local is not None and local.terminal) or not self.usable:
            return local
        try:
            shared = self.trusted(key, await self.shared.get(key))
        except StoreUnavailable as exc:
            self.failed(exc)
            return local
        if shared is not None and (local is None or shared.answered_at > local.answered_at):
            self.adopt(key, shared)
        return shared

    async def read_shared(self, key: Key) -> Entry | None:
        """``key``'s answer in Redis, if trusted; raises StoreUnavailable (Redis must be configured)."""
        assert self.shared is not None
        return self.trusted(key, await self.shared.get(key))

    async def adopt_shared(self, keys: Sequence[Key]) -> None:
        """Read ``keys`` from Redis in one round trip, and adopt the answers found (while usable)."""
        if self.shared is None or not keys or not self.usable:
            return
        try:
            found = await self.shared.get_many(keys)
        except StoreUnavailable as exc:
            self.failed(exc)
            return
        for key, read in zip(keys, found, strict=True):
            entry = self.trusted(key, read)
            if entry is not None:
                self.adopt(key, entry)

    async def keep(self, key: Key, entry: Entry, asked_at: float) -> bool:
        """Store ``entry`` here and in Redis; False if a store refused it (an invalidation after
        ``asked_at``, or a later answer already there)."""
        kept = self.local.keep(key, entry, asked_at=asked_at)
        if self.shared is None or not self.usable:
            return kept
        if not self.contact.may_share(key, asked_at):
            # Begun before this replica's last recovery: it may predate a stop Redis lost.
            return False
        try:
            kept = await self.shared.put(key, entry, asked_at=asked_at) and kept
        except StoreUnavailable as exc:
            self.failed(exc)
        return kept

    async def invalidate(self, key: Key, *, at: float) -> None:
        await self.local.invalidate([key], at=at)
        if self.shared is not None and self.usable:
            try:
                await self.shared.invalidate([key], at=at)
            except StoreUnavailable as exc:
                self.failed(exc)

    async def want(self, keys: Sequence[Key], *, until: float) -> None:
        await self.local.want(keys, until=until)
        if self.shared is not None and self.usable:
            try:
                await self.shared.want(keys, until=until)
            except StoreUnavailable as exc:
                self.failed(exc)

    async def unlease(self, key: Key) -> None:
        await self.local.unlease(key)
        if self.shared is None:
            return
        if not self.usable:
            self.contact.owe_lease(key)  # or every replica's callers of the key wait for it to run out
            return
        try:
            await self.shared.unlease(key)
        except StoreUnavailable as exc:
            self.failed(exc)
            self.contact.owe_lease(key)
