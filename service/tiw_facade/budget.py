"""One memory budget, shared out among everything that grows with what callers do.

A replica's memory must be bounded whatever its callers send: the pod has a hard limit (256Mi in
the shipped manifests) and a replica killed for it drops every call it held. Each structure that
grows with callers has a count bound; the defaults of those bounds come from one figure,
``TIW_MEMORY_BUDGET``, so an operator who changes the pod's limit changes one setting, and every
bound moves with it. A bound set explicitly wins over its derived default.

The cost of one item of each kind was measured (the figures and how are beside each constant) and
rounded up; tests/test_memory_bounds.py and tests/test_watch_limits.py check, by the RSS of a real
process, that floods stay inside the budget. The shares leave what is not listed (the interpreter,
grpc, aiohttp, the limiter: about 65 MiB resident at start) outside the budget; the default budget
is the shipped pod limit less that and headroom.

docs/limits.md has the arithmetic for callers and operators.
"""

from __future__ import annotations

import dataclasses

MiB = 1 << 20
# The shipped pod limit (k8s/base) is 256Mi; the process needs about 65 MiB before any caller
# arrives, and the rest of the 256 is headroom for allocator fragmentation and the unforeseen.
DEFAULT_BUDGET = 160 * MiB

# Bytes per item, for each kind of bounded item.
# An answer kept in process: its key, the entry, its mark in the wanted set and the refresh schedule.
# tracemalloc over 20,000 LocalStore entries of a 629-byte DescribeSnapshotTask answer (four result
# URLs) gave 1.2 KB each; 4 KiB leaves room for larger answers and the allocator's fragmentation.
ANSWER_COST = 4096
# An open watch stream: grpc's stream (a bare grpc.aio server holding as many takes 23.5 KiB each),
# the handler's generators, its wait on the topic. Measured at about the default cap (2,340 streams,
# 8 connections): 26.7 KiB each while they wait, 28.6 at the peak when their one task changes and
# every stream sends at once (over 40 tasks, 24; at 10,000 streams, 27 at the peak: grpc's part
# varies). tests/test_watch_limits.py checks that a flood to the cap stays within the share. Since
# streams wait on one timer (answers._topics.Deadlines), the watch bench's 10,000 streams take 25.6
# KiB each at the peak, a bare grpc.aio server with the facade's options 25.0 (bench/RESULTS.md).
WATCH_COST = 30 * 1024
# An idempotency record kept in process (no Redis): the key, the fingerprint, the serialized answer,
# and the asyncio.Event its retries wait on. tracemalloc over 20,000 MemoryStore records with
# 255-character keys (the longest allowed) gave 1.8 KB each.
IDEMPOTENCY_COST = 2048

# What share of the budget each kind may take. The calls in flight (a request held while it waits
# for a rate-limit slot) are bounded apart: by the queue bounds times the request size.
ANSWERS_SHARE = 0.40
WATCHES_SHARE = 0.40
IDEMPOTENCY_SHARE = 0.20
# One caller (one proven identity, or all unproven callers together) may hold this share of the
# watch streams: one caller cannot take every slot.
WATCHES_PER_CALLER_SHARE = 0.25


@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """The count bounds a budget allows."""

    cache_entries: int
    max_watches: int
    max_watches_per_caller: int
    idempotency_max_keys: int


def bounds(budget: int, *, max_watches: int | None = None) -> Bounds:
    """The default bounds for ``budget`` bytes; the per-caller watch bound is a share of
    ``max_watches`` when that is set explicitly."""
    watches = max_watches or max(1, int(budget * WATCHES_SHARE) // WATCH_COST)
    return Bounds(
        cache_entries=max(1, int(budget * ANSWERS_SHARE) // ANSWER_COST),
        max_watches=watches,
        max_watches_per_caller=max(1, int(watches * WATCHES_PER_CALLER_SHARE)),
        idempotency_max_keys=max(1, int(budget * IDEMPOTENCY_SHARE) // IDEMPOTENCY_COST),
    )
