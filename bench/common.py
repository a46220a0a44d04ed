"""What every suite shares: the run's budget, and the shape of its results (a section and its goals)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

FACADE_SERVICE = "tiw.v20190919.TiwService"


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long each part runs: ``full`` for the run of record, ``quick`` for a smoke run."""

    rounds: int
    seq_calls: int  # per RPC, per target, per round (after warm-up)
    seq_warmup: int
    conc_seconds: float
    conc_warmup: float
    quota_seconds: float
    quota_warmup: float
    local_seconds: float
    answers_seconds: float  # the measuring window of each answers workload
    failover_before: float  # seconds of load before the Redis primary is killed
    failover_after: float  # and after
    concurrency: int = 32

    @classmethod
    def full(cls) -> Budget:
        return cls(
            rounds=5,
            seq_calls=300,
            seq_warmup=30,
            conc_seconds=2.5,
            conc_warmup=0.5,
            quota_seconds=30.0,
            quota_warmup=2.0,
            local_seconds=2.0,
            answers_seconds=30.0,
            failover_before=6.0,
            failover_after=14.0,
        )

    @classmethod
    def quick(cls) -> Budget:
        return cls(
            rounds=2,
            seq_calls=100,
            seq_warmup=20,
            conc_seconds=1.0,
            conc_warmup=0.3,
            quota_seconds=5.0,
            quota_warmup=1.5,
            local_seconds=1.0,
            answers_seconds=10.0,
            failover_before=4.0,
            failover_after=10.0,
        )


@dataclasses.dataclass(frozen=True)
class Goal:
    name: str
    met: bool
    detail: str


@dataclasses.dataclass
class Section:
    title: str
    body: str
    goals: list[Goal] = dataclasses.field(default_factory=list)
    # Numbers other parts of the run react to (e.g. whether to profile).
    notes: dict[str, float] = dataclasses.field(default_factory=dict)


# The request metadata of a call that must reach TIW: the answer cache (docs/answers.md) would
# otherwise answer repeated Describe calls itself, and the sections that measure the way to TIW
# (overhead, quota, fairness, local) would measure the cache. It does not stop the cache serving a
# final answer (a task that is over): those sections also ask each call about a task of its own
# (bench/mirror.py).
FRESH = [["tiw-max-age-ms", "0"]]


def grpc_call(action: str, params: dict[str, object], *, fresh: bool = True) -> dict[str, object]:
    """A worker's description of a facade RPC; ``fresh``: it asks TIW, never the answer cache."""
    return {
        "method": f"/{FACADE_SERVICE}/{action}",
        "request": f"{action}Request",
        "response": f"{action}Response",
        "params": params,
        "metadata": FRESH if fresh else [],
    }


def sdk_call(action: str, params: dict[str, object]) -> dict[str, object]:
    return {"action": action, "params": params}


def rotated(items: Sequence[str], turn: int) -> list[str]:
    """``items`` starting at position ``turn``: each round changes who goes first."""
    turn %= len(items)
    return [*items[turn:], *items[:turn]]


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def fmt_ratio(value: float, digits: int = 2) -> str:
    """``1.23x``; goals use 3 digits, so a ratio just under a bar never reads as on it."""
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}x"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
