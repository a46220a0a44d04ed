"""Verifying TIW's callbacks: which keys are accepted, and whether a body is a callback TIW signed.

TIW signs a callback with ``Sign`` = hex MD5 of ``CallbackKey + str(ExpireTime)`` (docs/tiw-api.md,
"Callbacks"). The Sign covers the key and the expiry only, not the body: anyone who saw one callback
can post any body under its Sign until its ExpireTime. So an ExpireTime far ahead is refused
(``max_ahead``: a Sign meant to be replayed for ever), and what a callback says is a hint the facade
confirms with a Describe, never an answer in itself; the event log takes each event once
(``Event.identity``), so a replayed body is acknowledged and ignored.

This module knows nothing of HTTP: the intake (callback_intake.py) reads the body and answers;
``verify`` says what the body is, or why it is refused. Nothing refused is ever quoted back or logged
with a key or a Sign: a ``Refused``'s detail names fields and numbers only.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from tiw_facade import events, secret_files, settings
from tiw_facade.secret_files import FileVersion

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics

log = logging.getLogger("tiw_facade.callbacks")

# How often the key file is looked at: a rotation adds the new key some seconds before TIW signs with it.
KEY_FILE_POLL: Final = 2.0

KeyPairs = tuple[tuple[int, str], ...]


class Refusal(enum.StrEnum):
    """Why a callback was refused: ``tiw_callbacks_total``'s result values other than accepted and
    replayed (metrics.CALLBACK_RESULTS; a test keeps the two equal)."""

    BAD_SIGN = "bad_sign"  # the Sign matches none of the SdkAppId's keys
    EXPIRED = "expired"  # ExpireTime is past
    TOO_FAR_AHEAD = "too_far_ahead"  # ExpireTime further ahead than TIW_CALLBACK_MAX_AHEAD
    UNKNOWN_APP = "unknown_app"  # no key for the SdkAppId
    TOO_LARGE = "too_large"  # a body larger than TIW_CALLBACK_MAX_BYTES
    BAD_METHOD = "bad_method"  # not a POST
    NOT_FOUND = "not_found"  # not one of the intake's paths
    BAD_JSON = "bad_json"  # not a JSON object (or not received whole)
    BAD_FIELDS = "bad_fields"  # a field missing or of the wrong type
    UNAVAILABLE = "unavailable"  # the event log could not take it (TIW retries)


class Refused(Exception):
    """A callback refused: ``reason``, and a ``detail`` safe to log (field names and numbers, never a
    key, a Sign or the body); ``sdk_app_id`` once known."""

    def __init__(self, reason: Refusal, detail: str, *, sdk_app_id: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.sdk_app_id = sdk_app_id


def sign(key: str, expire_time: str) -> str:
    """The Sign TIW sends: lowercase hex MD5 of the key followed by ExpireTime as it is spelled."""
    return hashlib.md5((key + expire_time).encode(), usedforsecurity=False).hexdigest()


# --- the keys ------------------------------------------------------------------------------------------


class KeyFileError(Exception):
    """The key file cannot be used; the message says why, never with the file's content."""


def _load_key_file(path: str) -> tuple[FileVersion, KeyPairs]:
    """The key file's version and pairs, or ``KeyFileError``; in a worker thread (reading, parsing)."""
    try:
        version, text = secret_files.read(path)  # a regular file, of at most 64 KiB, never blocking
    except secret_files.Unreadable as exc:
        raise KeyFileError(str(exc)) from None
    try:
        pairs = settings.callback_keys(text)
    except settings.Invalid as exc:  # its message names the format, never the content
        raise KeyFileError(str(exc)) from None
    if not pairs:
        # An empty version is more likely a file caught while rewritten than a wish to refuse every
        # callback: refused like a malformed one (and fatal at start, where it is surely a mistake).
        raise KeyFileError("names no SdkAppId=key pair")
    return version, pairs


class _KeyFile(secret_files.WatchedFile[KeyPairs]):
    """The key file, polled for a new version; the last good keys serve until a new one parses."""

    unusable = (KeyFileError,)

    def __init__(self, path: str, *, poll: float, keys: CallbackKeys, refused: Callable[[], None]) -> None:
        super().__init__(path, poll=poll, name="callback-keys-watch")
        self._keys = keys
        self._count_refusal = refused

    def _load(self) -> tuple[FileVersion, KeyPairs]:
        return _load_key_file(self.path)

    def _adopt(self, pairs: KeyPairs, *, first: bool) -> None:
        self._keys._use_file(pairs)
        log.info(
            "callback key file read" if first else "callback key file changed: its new keys are in use",
            extra={"key_file": self.path, "sdk_app_ids": _apps(pairs), "key_count": len(pairs)},
        )

    def _refused(self, why: str) -> None:
        self._count_refusal()
        log.error(
            "callback key file ignored: its last good keys stay in use",
            extra={"key_file": self.path, "error": why},
        )


def _apps(pairs: KeyPairs) -> str:
    return ",".join(str(app) for app in sorted({app for app, _ in pairs}))


def _by_app(pairs: Iterable[tuple[int, str]]) -> dict[int, tuple[str, ...]]:
    found: dict[int, list[str]] = {}
    for app, key in pairs:
        keys = found.setdefault(app, [])
        if key not in keys:
            keys.append(key)
    return {app: tuple(keys) for app, keys in found.items()}


class CallbackKeys:
    """The keys accepted per SdkAppId: ``pairs`` (TIW_CALLBACK_KEYS) and, with ``key_file``
    (TIW_CALLBACK_KEY_FILE), that file's, re-read when it changes. Every key named for an SdkAppId
    is accepted, in either source: a rotation adds the new key, switches TIW to it, then removes
    the old one, without a restart when the keys are in the file."""

    def __init__(
        self,
        pairs: Iterable[tuple[int, str]] = (),
        *,
        key_file: str = "",
        poll: float = KEY_FILE_POLL,
        metrics: Metrics | None = None,
    ) -> None:
        self._fixed: KeyPairs = tuple(pairs)
        self._keys = _by_app(self._fixed)
        failures = metrics.callback_key_reload_failures if metrics is not None else None
        refused = failures.inc if failures is not None else lambda: None
        self._file = _KeyFile(key_file, poll=poll, keys=self, refused=refused) if key_file else None

    @classmethod
    def from_settings(cls, config: settings.Settings, metrics: Metrics | None = None) -> CallbackKeys:
        return cls(config.callback_keys, key_file=config.callback_key_file, metrics=metrics)

    def keys_for(self, sdk_app_id: int) -> tuple[str, ...]:
        """The keys a callback of ``sdk_app_id`` may be signed with; () if none."""
        return self._keys.get(sdk_app_id, ())

    async def start(self) -> None:
        """Read the key file, then watch it. An unusable file at start is fatal (``KeyFileError``
        naming the file): there are no older keys to serve with."""
        if self._file is not None:
            await self._file.start()
        if not self._keys:
            log.warning(
                "no callback key: every callback will be refused (TIW_CALLBACK_KEYS, TIW_CALLBACK_KEY_FILE)"
            )

    async def aclose(self) -> None:
        if self._file is not None:
            await self._file.aclose()

    async def check_file(self) -> None:
        """Look at the key file now, as the poll does (tests drive it by hand)."""
        if self._file is not None:
            await self._file.check()

    def _use_file(self, pairs: KeyPairs) -> None:
        self._keys = _by_app((*self._fixed, *pairs))  # one dict, replaced whole


# --- the body ------------------------------------------------------------------------------------------


def _field(fields: dict[str, object], name: str, sdk_app_id: int | None = None) -> object:
    if name not in fields:
        raise Refused(Refusal.BAD_FIELDS, f"{name} is missing", sdk_app_id=sdk_app_id)
    return fields[name]


def _integer(value: object, name: str, sdk_app_id: int | None = None, *, spelled: bool = False) -> int:
    """An integer field: a JSON integer (never a boolean, never a float), or with ``spelled`` its
    ASCII decimal digits in a string, as TIW might spell a time."""
    if type(value) is int:
        return value
    if spelled and isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    what = "an integer or a string of digits" if spelled else "an integer"
    raise Refused(Refusal.BAD_FIELDS, f"{name} must be {what}", sdk_app_id=sdk_app_id)


def _text(value: object, name: str, sdk_app_id: int) -> str:
    if not isinstance(value, str):
        raise Refused(Refusal.BAD_FIELDS, f"{name} must be a string", sdk_app_id=sdk_app_id)
    return value


def _task_id(fields: dict[str, object], sdk_app_id: int) -> str:
    """EventData's TaskId (push, video) or TaskID (snapshot), "" if none."""
    data = fields.get("EventData")
    if data is None:
        return ""
    if not isinstance(data, dict):
        raise Refused(Refusal.BAD_FIELDS, "EventData must be an object", sdk_app_id=sdk_app_id)
    for name in ("TaskId", "TaskID"):
        if name in data:
            return _text(data[name], f"EventData.{name}", sdk_app_id)
    return ""


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # json.loads takes NaN and Infinity unless told


def verify(
    body: bytes, kind: str, keys: CallbackKeys, *, now: float, max_ahead: float, received_at: float
) -> events.Event:
    """The event ``body`` carries if it is a callback TIW signed for ``kind``, still valid at ``now``
    and expiring within ``max_ahead`` seconds of it; else ``Refused``. Checked in this order: JSON,
    fields, key, Sign, expiry, so that only a signed callback learns about time. ``body`` is kept
    exactly as received."""
    if kind not in events.KINDS:
        raise ValueError(f"unknown kind of callback {kind!r}")
    try:
        fields = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise Refused(Refusal.BAD_JSON, "not JSON") from None
    if not isinstance(fields, dict):
        raise Refused(Refusal.BAD_JSON, "not a JSON object")

    sdk_app_id = _integer(_field(fields, "SdkAppId"), "SdkAppId")
    raw_expiry = _field(fields, "ExpireTime", sdk_app_id)
    expire_time = _integer(raw_expiry, "ExpireTime", sdk_app_id, spelled=True)
    given_sign = _text(_field(fields, "Sign", sdk_app_id), "Sign", sdk_app_id)
    event_type = _text(_field(fields, "EventType", sdk_app_id), "EventType", sdk_app_id)
    if not event_type:
        raise Refused(Refusal.BAD_FIELDS, "EventType is empty", sdk_app_id=sdk_app_id)
    timestamp = fields.get("Timestamp")
    timestamp = 0 if timestamp is None else _integer(timestamp, "Timestamp", sdk_app_id, spelled=True)
    task_id = _task_id(fields, sdk_app_id)

    accepted = keys.keys_for(sdk_app_id)
    if not accepted:
        raise Refused(
            Refusal.UNKNOWN_APP, f"no callback key for SdkAppId {sdk_app_id}", sdk_app_id=sdk_app_id
        )
    # Signed over ExpireTime as TIW spelled it (a number's decimal digits, or the string itself).
    spelled = raw_expiry if isinstance(raw_expiry, str) else str(expire_time)
    # Bytes, so that a Sign of any text compares (compare_digest refuses non-ASCII str); hex in
    # either case, though TIW's is lowercase.
    given = given_sign.lower().encode()
    # Every key compared, in constant time each: the time taken says nothing of which came close.
    matches = [hmac.compare_digest(sign(key, spelled).encode(), given) for key in accepted]
    if not any(matches):
        raise Refused(
            Refusal.BAD_SIGN,
            f"the Sign matches none of the {len(accepted)} key(s) of SdkAppId {sdk_app_id}",
            sdk_app_id=sdk_app_id,
        )
    if expire_time < now:
        raise Refused(
            Refusal.EXPIRED,
            f"ExpireTime {expire_time} is {now - expire_time:.0f} s past",
            sdk_app_id=sdk_app_id,
        )
    if expire_time > now + max_ahead:
        raise Refused(
            Refusal.TOO_FAR_AHEAD,
            f"ExpireTime {expire_time} is {expire_time - now:.0f} s ahead, more than {max_ahead:g}",
            sdk_app_id=sdk_app_id,
        )
    return events.Event(
        kind=kind,
        sdk_app_id=sdk_app_id,
        event_type=event_type,
        task_id=task_id,
        timestamp=timestamp,
        expire_time=expire_time,
        body=body,
        received_at=received_at,
    )
