"""Python's heap of a role process, by the file that allocated it (tracemalloc).

A role started with ``--heap FILE`` (bench.roles) traces its allocations and writes a snapshot to
FILE.N at each SIGUSR1; ``Heap`` asks for them in turn and compares two. tracemalloc sees Python's
allocations only (objects, frames, buffers made through Python's allocators), not grpc's C core,
and makes each allocation slower: a pass with it measures where memory goes, never how fast.
"""

from __future__ import annotations

import signal
import sys
import time
import tracemalloc
from collections.abc import Mapping
from pathlib import Path

from bench.procs import BenchError, Proc

SNAPSHOT_TIMEOUT = 60.0


class Heap:
    """The snapshots of one process started with ``--heap path``."""

    def __init__(self, proc: Proc, path: Path) -> None:
        self._proc = proc
        self._path = path
        self._taken = 0

    def take(self) -> tracemalloc.Snapshot:
        target = Path(f"{self._path}.{self._taken}")
        self._proc.popen.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + SNAPSHOT_TIMEOUT
        while not target.exists():
            if not self._proc.alive() or time.monotonic() > deadline:
                raise BenchError(f"no heap snapshot from {self._proc.name}; see {self._proc.log}")
            time.sleep(0.05)
        self._taken += 1
        snapshot = tracemalloc.Snapshot.load(str(target))
        target.unlink()
        return snapshot


def grown_by_file(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, per: int) -> dict[str, float]:
    """Bytes held at ``after`` and not at ``before``, per ``per`` (streams, calls), by the file that
    allocated them, shortened to the package path (``tiw_facade/watcher.py``, ``asyncio/events.py``)."""
    roots = import_roots()  # once, not once per file of the comparison
    grown: dict[str, float] = {}
    for stat in after.compare_to(before, "filename"):
        frame = stat.traceback[0]
        name = short_name(frame.filename, roots)
        grown[name] = grown.get(name, 0.0) + stat.size_diff / per
    return grown


def import_roots() -> list[Path]:
    """sys.path's entries, the deepest first: a file is named from the innermost one holding it."""
    return sorted((Path(entry) for entry in sys.path if entry), key=lambda p: -len(p.parts))


def short_name(filename: str, roots: list[Path]) -> str:
    """A source file's path from its top-level package on, as an import would name it."""
    path = Path(filename)
    for root in roots:
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.name


def largest_differences(
    ours: Mapping[str, float], theirs: Mapping[str, float], count: int
) -> list[tuple[str, float, float]]:
    """The ``count`` files whose share differs most between two measurements: (file, ours, theirs)."""
    names = set(ours) | set(theirs)
    ranked = sorted(names, key=lambda name: -abs(ours.get(name, 0.0) - theirs.get(name, 0.0)))
    return [(name, ours.get(name, 0.0), theirs.get(name, 0.0)) for name in ranked[:count]]
