"""Reading the small files that hold secrets (a credentials profile, a projected service-account
token) whatever their path names meanwhile: never blocking, never whole when too large, never quoted.

A profile is a few hundred bytes, a projected service-account token a few KiB, and STS documents
temporary keys of at most 1 KiB and tokens of at most 4 KiB. A larger file is not one of them, and
reading it whole would cost its size in memory and seconds of work.
"""

from __future__ import annotations

import asyncio
import os
import stat
from typing import Final, Generic, TypeVar

from tiw_facade import background

T = TypeVar("T")

MAX_FILE_BYTES: Final = 64 << 10

# What identifies one version of a file: a Secret volume's update swaps the `..data` symlink, so the
# resolved file is a new inode; an edit in place changes the modification time or the size.
FileVersion = tuple[int, int, int, int]
MISSING: Final[FileVersion] = (-1, -1, -1, -1)


def _version_of(status: os.stat_result) -> FileVersion:
    return (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)


def version(path: str) -> FileVersion:
    return _version_of(os.stat(path))  # follows the symlinks to the file of the current version


class Unreadable(Exception):
    """A file that cannot be read as a secret file; the message says why, never with its content.
    Each reader turns it into its own error (a credentials, policy or key file's)."""


def _check_shape(status: os.stat_result) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise Unreadable("not a regular file")
    if status.st_size > MAX_FILE_BYTES:
        raise Unreadable(f"larger than {MAX_FILE_BYTES} bytes")


def read(path: str) -> tuple[FileVersion, str]:
    """A secret file's version and text; blocking, so called through ``asyncio.to_thread``.

    Only a regular file (after the symlinks: a Secret volume's file is a link to one) of at most
    MAX_FILE_BYTES: a FIFO would block open() and read() until some writer came, a device or a huge
    file would take forever or seconds and its size in memory. The stat before the open keeps a
    device from being opened at all; O_NONBLOCK and the check of the open descriptor cover a FIFO
    put in place between the two; the read itself is bounded, for a file growing meanwhile. The
    version is the open file's, so that a swap during the read is noticed at the next poll.
    Raises Unreadable (never with the content).
    """
    try:
        return _read(path)
    except OSError as exc:
        raise Unreadable(why(exc)) from None


def _read(path: str) -> tuple[FileVersion, str]:
    _check_shape(os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        status = os.fstat(fd)
        _check_shape(status)
        chunks: list[bytes] = []
        left = MAX_FILE_BYTES + 1
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    if left <= 0:
        raise Unreadable(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        return _version_of(status), b"".join(chunks).decode()
    except UnicodeDecodeError:
        raise Unreadable("not UTF-8 text") from None


def why(exc: OSError) -> str:
    """What went wrong reading, without the path's content (there is none in an OSError's strerror)."""
    return f"cannot read ({exc.strerror or type(exc).__name__})"


class WatchedFile(Generic[T]):
    """A file read at ``start()``, then looked at every ``poll`` seconds and read again when its
    version changed: the last good value serves until a new version loads. Every look, the stat
    too, runs in a worker thread: whatever the path names now (a FIFO, a huge file, a stalled
    volume), the event loop serving the calls never waits for it. A version that fails to load
    (maybe half written) is read again at the next look, and reported once.

    Subclasses say what loading is (``_load``, in a worker thread; raising one of ``unusable``),
    and what taking a value into use (``_adopt``) and refusing a version (``_refused``) mean.
    """

    unusable: tuple[type[Exception], ...] = ()

    def __init__(self, path: str, *, poll: float, name: str) -> None:
        self.path = path
        self._seen: FileVersion | None = None  # the version the value in use came from
        self._rejected: FileVersion | None = None  # the latest version found unusable (reported once)
        self._polling = background.Every(poll, self.check, name)

    def _load(self) -> tuple[FileVersion, T]:
        raise NotImplementedError

    def _adopt(self, value: T, *, first: bool) -> None:
        raise NotImplementedError

    def _refused(self, why: str) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Read the file, then watch it. At start an unusable file is fatal: there is nothing older
        to serve with; the error (one of ``unusable``) names the file."""
        try:
            found, value = await asyncio.to_thread(self._load)
        except self.unusable as exc:
            raise type(exc)(f"{self.path}: {exc}") from None
        self._seen = found
        self._adopt(value, first=True)
        self._polling.start()

    async def aclose(self) -> None:
        await self._polling.aclose()

    async def check(self) -> None:
        """Take a new version of the file into use if there is one and it is usable."""
        try:
            found = await asyncio.to_thread(version, self.path)
        except OSError as exc:
            self._reject(MISSING, why(exc))
            return
        if found == self._seen:
            return
        try:
            found, value = await asyncio.to_thread(self._load)
        except self.unusable as exc:
            self._reject(found, str(exc))
            return
        self._seen, self._rejected = found, None
        self._adopt(value, first=False)

    def _reject(self, version: FileVersion, reason: str) -> None:
        if version == self._rejected:
            return
        self._rejected = version
        self._refused(reason)
