"""Waiting for another replica's request: the replica holding a key's lease in Redis asks TIW, and
the others' flights of that key wait for its answer there instead of asking too.

The wait polls Redis, from PEER_POLL up to PEER_POLL_MAX apart: most answers come within a round
trip to TIW, and a replica with many keys waiting must not flood Redis meanwhile. Every
PEER_LEASE_EVERY-th look also tries to take the lease: it outlives the answer only when its holder
died, and then it runs out and this replica asks TIW itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tiw_facade.answers._coalesce import Late
from tiw_facade.answers._entries import Entry, Key
from tiw_facade.answers._stores import Stores
from tiw_facade.failures import Outcome

PEER_POLL = 0.01
PEER_POLL_MAX = 0.08
PEER_LEASE_EVERY = 4


async def peer_answer(
    stores: Stores,
    key: Key,
    deadline: float | None,
    *,
    lease_seconds: float,
    monotonic: Callable[[], float] = time.monotonic,
) -> Entry | None:
    """Another replica's answer for ``key`` (kept here and published), or None once its lease is
    gone (then the lease is ours). Raises ``Late`` (NOT_SENT) at ``deadline`` (``monotonic``), and
    StoreUnavailable. That request may have been sent before this flight's callers came: each
    checks the answer against its own bound."""
    assert stores.shared is not None
    known = await stores.read_shared(key)
    known_at = known.answered_at if known is not None else float("-inf")
    pause = PEER_POLL
    polls = 0
    while True:
        if deadline is not None and monotonic() + pause >= deadline:
            # Another replica holds the lease: under saturation, most likely waiting for a slot.
            raise Late(
                "another replica's request for this answer has not been answered in time", Outcome.NOT_SENT
            )
        await asyncio.sleep(pause)
        pause = min(2 * pause, PEER_POLL_MAX)
        found = await stores.read_shared(key)
        if found is not None and found.answered_at > known_at:
            stores.adopt(key, found)
            return found
        polls += 1
        if polls % PEER_LEASE_EVERY == 0 and await stores.shared.lease(key, lease_seconds):
            return None
