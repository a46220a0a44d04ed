"""Tencent's clock, as far as this process knows it: what requests are stamped and signed with.

Every TIW answer's ``Date`` header measures the offset (Tencent's clock minus ours). It is not used
until Tencent says our clock is off (``AuthFailure.SignatureExpire``: over 5 minutes): from then on
requests are stamped by the measured offset, TIW's and STS's alike (docs/credentials.md#clock-skew).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

from tiw_facade.metrics import Metrics


def parse_http_date(value: str | None) -> float | None:
    """Unix seconds of an HTTP ``Date`` header (``None`` when absent or malformed)."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class TencentClock:
    """Unix seconds by Tencent's clock (``now``), learnt from answers (``observe``) and taken into
    use once Tencent refuses a timestamp (``correct``)."""

    def __init__(self, metrics: Metrics, *, wall: Callable[[], float] = time.time) -> None:
        self._metrics = metrics
        self._wall = wall
        self.offset = 0.0  # what requests are stamped with
        self._measured: float | None = None
        self._last_date = ""

    def now(self) -> float:
        return self._wall() + self.offset

    def observe(self, date: str | None) -> None:
        """Measure Tencent's clock from an answer's Date header (once per new value: once a second)."""
        if not date or date == self._last_date:
            return
        self._last_date = date
        stamp = parse_http_date(date)
        if stamp is None:
            return
        # The header has whole seconds: Tencent's time was, on average, half a second later.
        self._measured = stamp + 0.5 - self._wall()
        self._metrics.upstream_clock_offset.set(self._measured)

    def correct(self) -> float | None:
        """Tencent refused our timestamp: stamp with the measured offset from now on. Returns the
        previous offset, or None when nothing new was measured (requests are stamped as before)."""
        measured = self._measured
        if measured is None or abs(measured - self.offset) < 1:
            return None
        previous, self.offset = self.offset, measured
        return previous
