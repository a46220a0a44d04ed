"""The ledger's arithmetic in virtual time, over generated call patterns: exact boundaries, zero
latencies, answers that never come, callers that leave, releases right at the end of the hold."""

from __future__ import annotations

import heapq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import max_in_window
from tiw_facade.limiter._ledger import Ledger, LocalLease

WINDOW = 1.0
HOLD = 0.5

call = st.tuples(
    st.floats(0, HOLD),  # latency: an attempt never outlives its hold
    st.floats(0, 1),  # where between admission and answer it reaches TIW
    st.sampled_from(["answered"] * 6 + ["lost", "left"]),
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 6), calls=st.lists(call, min_size=1, max_size=60))
def test_no_window_sees_more_than_limit_and_no_token_idles(
    limit: int, calls: list[tuple[float, float, str]]
) -> None:
    """Callers always waiting; like the pump, the simulation only wakes when the ledger says a token
    can come back, while answers arrive on their own schedule."""
    ledger = Ledger(WINDOW)
    now = 0.0
    arrivals: list[float] = []
    answers: list[tuple[float, int, LocalLease]] = []  # pending answers, a heap
    returns: list[float] = []  # when each token truly comes back, answers to come included
    queue = list(reversed(calls))
    while queue:
        while queue and ledger.room(now, limit) is None:
            latency, where, outcome = queue.pop()
            lease = ledger.add(LocalLease(ledger, now + HOLD + WINDOW))
            if outcome == "left":  # the caller left before sending: nothing arrives, nothing held
                ledger.discard(lease)
            elif outcome == "lost":  # sent, never answered: held to the end of its hold
                arrivals.append(now + where * HOLD)
                returns.append(lease.expires_at)
            else:
                arrivals.append(now + where * latency)
                heapq.heappush(answers, (now + latency, len(arrivals), lease))
                returns.append(min(now + latency + WINDOW, lease.expires_at))
        if not queue:
            break
        wake = ledger.room(now, limit)
        assert wake is not None and wake > now
        # Never sleeps past a token's return, whatever answers come meanwhile: no idle quota.
        assert wake <= min(back for back in returns if back > now)
        while answers and answers[0][0] <= wake:
            at, _, lease = heapq.heappop(answers)
            ledger.release(lease, at)
        now = wake
    assert max_in_window(arrivals, WINDOW) <= limit
