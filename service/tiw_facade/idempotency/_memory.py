"""The interface every store of idempotency records offers (``Store``), and the in-process one
(``MemoryStore``): bounded, the oldest key forgotten first, waiters woken by an asyncio.Event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from typing import Protocol

from tiw_facade.idempotency._records import Record


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
