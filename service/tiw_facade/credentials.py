"""Where the facade's Tencent Cloud credentials come from, and how they stay current without a restart.

The chain is the official SDKs' default chain, first match wins (docs/credentials.md):

1. the environment: ``TENCENTCLOUD_SECRET_ID``, ``TENCENTCLOUD_SECRET_KEY`` (and ``_SESSION_TOKEN``);
2. a profile file (INI, ``[default]`` with ``secret_id``, ``secret_key``, optional ``token``):
   ``TENCENTCLOUD_CREDENTIALS_FILE``, else ``~/.tencentcloud/credentials``, else
   ``/etc/tencentcloud/credentials``; re-read whenever it changes (a Secret volume is swapped by
   Kubernetes in one atomic rename), an invalid version ignored with a warning;
3. TKE pod identity: ``TKE_REGION``, ``TKE_PROVIDER_ID``, ``TKE_WEB_IDENTITY_TOKEN_FILE`` and
   ``TKE_ROLE_ARN`` exchanged at STS (``AssumeRoleWithWebIdentity``) for temporary credentials,
   refreshed in the background well before they expire.

Unlike the Python SDK there is no CVM instance role: on a pod it is the node's identity, and the SDK
tries it before the pod's own. ``Source.get()`` answers from memory whenever valid credentials are
held; only when none are does it wait, for the one refresh in flight. No key, token or exception
text that might hold one is ever logged.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import email.utils
import json
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiohttp

from tiw_facade.metrics import Metrics
from tiw_facade.signing import Credentials

if TYPE_CHECKING:
    from tiw_facade.settings import Settings

log = logging.getLogger("tiw_facade.credentials")

# Where the official SDKs look for a profile file when none is named.
DEFAULT_PROFILES: Final = ("~/.tencentcloud/credentials", "/etc/tencentcloud/credentials")
PROFILE_SECTION: Final = "default"

STS_ACTION: Final = "AssumeRoleWithWebIdentity"
STS_VERSION: Final = "2018-08-13"
STS_MAX_DURATION: Final = 43200
STS_TIMEOUT: Final = 10.0
STS_MAX_ANSWER: Final = 64 << 10
# A failed refresh is tried again after a quarter of the time the current credentials have left,
# within these bounds: often enough to recover before they expire, not so often as to hammer STS.
RETRY_MIN: Final = 0.5
RETRY_MAX: Final = 30.0
# Credentials are not used in their last moments: a request signed then could arrive after expiry.
EXPIRY_GUARD_MAX: Final = 5.0

# A profile is a few hundred bytes, a projected service-account token a few KiB, and STS documents
# temporary keys of at most 1 KiB and tokens of at most 4 KiB. A larger file is not one of them, and
# reading it whole would cost its size in memory and seconds of work.
MAX_FILE_BYTES: Final = 64 << 10
# Every SecretKey Tencent issues has 32 characters, and STS's temporary ones are longer: a shorter
# secret_key was cut short or is a placeholder, and TIW would refuse every call it signed.
MIN_SECRET_KEY_LENGTH: Final = 32

# What a key, a secret or a token may contain: printable ASCII without spaces (they go into headers).
_TOKEN_TEXT: Final = re.compile(r"[!-~]+")
_SESSION_NAME_TEXT: Final = re.compile(r"[^\w+=,.@-]")


class CredentialsError(Exception):
    """No usable credentials (or a misconfigured source); the message never holds a secret."""


class Source(Protocol):
    """Credentials for the next request; ``get`` is cheap whenever valid credentials are held."""

    description: str

    async def start(self) -> None: ...

    async def get(self) -> Credentials: ...

    async def aclose(self) -> None: ...


def from_settings(settings: Settings, metrics: Metrics, *, clock: Callable[[], float]) -> Source:
    """The first source of the chain that is configured; ``clock`` is Tencent's time (Unix seconds).

    Raises ``CredentialsError`` when none is, or one is half configured.
    """
    tke = {
        "TKE_REGION": settings.tke_region,
        "TKE_PROVIDER_ID": settings.tke_provider_id,
        "TKE_WEB_IDENTITY_TOKEN_FILE": settings.tke_web_identity_token_file,
        "TKE_ROLE_ARN": settings.tke_role_arn,
    }
    if settings.secret_id or settings.secret_key:
        if not (settings.secret_id and settings.secret_key):
            missing = "TENCENTCLOUD_SECRET_KEY" if settings.secret_id else "TENCENTCLOUD_SECRET_ID"
            raise CredentialsError(f"{missing} is not set, but its pair is: set both, or neither")
        key = Credentials(settings.secret_id, settings.secret_key, settings.session_token)
        return Static(key, "the environment (TENCENTCLOUD_SECRET_ID)")
    profile = settings.credentials_file or next(
        (path for path in map(os.path.expanduser, DEFAULT_PROFILES) if os.path.exists(path)), ""
    )
    if profile:
        return ProfileFile(profile, poll=settings.credentials_poll, metrics=metrics)
    if any(tke.values()):
        if missing_tke := [name for name, value in tke.items() if not value]:
            raise CredentialsError(f"TKE pod identity is half configured: {', '.join(missing_tke)} not set")
        if settings.sts_duration > STS_MAX_DURATION:
            raise CredentialsError(f"TIW_STS_DURATION must be at most {STS_MAX_DURATION} seconds")
        return WebIdentity(settings, metrics=metrics, clock=clock)
    raise CredentialsError(
        "no credentials: set TENCENTCLOUD_SECRET_ID and TENCENTCLOUD_SECRET_KEY, or "
        "TENCENTCLOUD_CREDENTIALS_FILE, or TKE pod identity (TKE_*); see docs/credentials.md"
    )


class Static:
    """A long-term key (or fixed temporary credentials) from the environment."""

    def __init__(self, credentials: Credentials, description: str) -> None:
        self._credentials = credentials
        self.description = description

    async def start(self) -> None:
        log.info("credentials", extra={"source": self.description, "secret_id": self._credentials.secret_id})

    async def get(self) -> Credentials:
        return self._credentials

    async def aclose(self) -> None:
        pass


# --- the profile file -----------------------------------------------------------------------------


def parse_profile(text: str) -> Credentials:
    """The ``[default]`` credentials of a profile file; ``CredentialsError`` says what is wrong.

    Only a file that looks whole is taken: one read while it was being written in place would
    otherwise yield a secret cut short, which parses but signs nothing TIW accepts. Every line of a
    profile ends in a newline (editors, ``printf '...\\n'``, a YAML ``|`` block write one), so a
    write cut short almost always leaves a last line without one; cut exactly at a line's end, the
    lines there are whole and a missing secret_id or secret_key is refused below. The secret_key
    must also have a SecretKey's length, which every key Tencent issues has. No rule on the
    SecretId's: a temporary one has no documented shape, and the emulator's demo one is shorter.
    """
    if text and not text.endswith("\n"):
        raise CredentialsError("the last line does not end in a newline (cut short while being written?)")
    parser = configparser.ConfigParser(interpolation=None)  # a "%" in a key is a "%"
    try:
        parser.read_string(text)
    except configparser.Error as exc:  # its text may quote a line of the file, i.e. a secret
        line = getattr(exc, "lineno", None)
        where = f" at line {line}" if line else ""
        raise CredentialsError(f"not an INI file ({type(exc).__name__}{where})") from None
    if not parser.has_section(PROFILE_SECTION):
        raise CredentialsError(f"no [{PROFILE_SECTION}] section")
    section = parser[PROFILE_SECTION]
    values = {name: section.get(name, "").strip() for name in ("secret_id", "secret_key", "token")}
    for name in ("secret_id", "secret_key"):
        if not values[name]:
            raise CredentialsError(f"[{PROFILE_SECTION}] has no {name}")
    for name, value in values.items():
        if value and not _TOKEN_TEXT.fullmatch(value):
            raise CredentialsError(f"[{PROFILE_SECTION}] {name} holds spaces or characters no key has")
    if len(values["secret_key"]) < MIN_SECRET_KEY_LENGTH:
        raise CredentialsError(
            f"[{PROFILE_SECTION}] secret_key is shorter than a SecretKey's {MIN_SECRET_KEY_LENGTH} characters"
        )
    return Credentials(values["secret_id"], values["secret_key"], values["token"])


# What identifies one version of a file: a Secret volume's update swaps the `..data` symlink, so the
# resolved file is a new inode; an edit in place changes the modification time or the size.
FileVersion = tuple[int, int, int, int]
MISSING: Final[FileVersion] = (-1, -1, -1, -1)


def _version_of(status: os.stat_result) -> FileVersion:
    return (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)


def _version(path: str) -> FileVersion:
    return _version_of(os.stat(path))  # follows the symlinks to the file of the current version


def _check_shape(status: os.stat_result) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise CredentialsError("not a regular file")
    if status.st_size > MAX_FILE_BYTES:
        raise CredentialsError(f"larger than {MAX_FILE_BYTES} bytes")


def _read(path: str) -> tuple[FileVersion, str]:
    """A credentials file's version and text; blocking, so called through ``asyncio.to_thread``.

    Only a regular file (after the symlinks: a Secret volume's file is a link to one) of at most
    MAX_FILE_BYTES: a FIFO would block open() and read() until some writer came, a device or a huge
    file would take forever or seconds and its size in memory. The stat before the open keeps a
    device from being opened at all; O_NONBLOCK and the check of the open descriptor cover a FIFO
    put in place between the two; the read itself is bounded, for a file growing meanwhile. The
    version is the open file's, so that a swap during the read is noticed at the next poll.
    Raises OSError, or CredentialsError (never with the content).
    """
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
        raise CredentialsError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        return _version_of(status), b"".join(chunks).decode()
    except UnicodeDecodeError:
        raise CredentialsError("not UTF-8 text") from None


def _load(path: str) -> tuple[FileVersion, Credentials]:
    """The profile file's version and credentials, or ``CredentialsError``; in a worker thread."""
    try:
        version, text = _read(path)
    except OSError as exc:
        raise CredentialsError(_why(exc)) from None
    return version, parse_profile(text)


def _why(exc: OSError) -> str:
    return f"cannot read ({exc.strerror or type(exc).__name__})"


class ProfileFile:
    """A profile file, polled for a new version; the old credentials serve until a new one parses."""

    def __init__(self, path: str, *, poll: float, metrics: Metrics) -> None:
        self.path = path
        self.description = f"the profile file {path}"
        self._poll = poll
        self._metrics = metrics
        self._credentials: Credentials | None = None
        self._seen: FileVersion | None = None  # the version the credentials came from
        self._rejected: FileVersion | None = None  # the latest version found invalid (logged once)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # At start an unreadable file is fatal: there is nothing older to serve with.
        try:
            version, credentials = await asyncio.to_thread(_load, self.path)
        except CredentialsError as exc:
            raise CredentialsError(f"{self.path}: {exc}") from None
        self._credentials, self._seen = credentials, version
        self._metrics.credentials_expiry.set(0)
        log.info("credentials", extra={"source": self.description, "secret_id": credentials.secret_id})
        self._task = asyncio.create_task(self._watch(), name="credentials-file-watch")

    async def get(self) -> Credentials:
        if self._credentials is None:
            raise CredentialsError("the credentials file was not read yet (start() not awaited)")
        return self._credentials

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            await self.check()

    async def check(self) -> None:
        """Take a new version of the file into use if there is one and it is valid.

        In a worker thread, even the stat: whatever the path now names (a FIFO, a huge file, a
        stalled volume), the event loop serving the calls never waits for it.
        """
        try:
            version = await asyncio.to_thread(_version, self.path)
        except OSError as exc:
            self._reject(MISSING, _why(exc))
            return
        if version == self._seen:
            return
        try:
            version, credentials = await asyncio.to_thread(_load, self.path)
        except CredentialsError as exc:
            # Maybe half written: read again at the next poll, but say so once per version.
            self._reject(version, str(exc))
            return
        previous = self._credentials
        self._credentials, self._seen, self._rejected = credentials, version, None
        if credentials != previous:
            self._metrics.credentials_refreshes.inc()
            log.info(
                "credentials file changed: new credentials in use",
                extra={"source": self.description, "secret_id": credentials.secret_id},
            )

    def _reject(self, version: FileVersion, why: str) -> None:
        if version == self._rejected:
            return
        self._rejected = version
        self._metrics.credentials_refresh_failures.inc()
        log.warning(
            "credentials file ignored: the previous credentials stay in use",
            extra={"source": self.description, "error": why},
        )


# --- TKE pod identity (OIDC) ----------------------------------------------------------------------


def parse_http_date(value: str | None) -> float | None:
    """Unix seconds of an HTTP ``Date`` header (``None`` when absent or malformed)."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def refresh_lead(lifetime: float, margin: float) -> float:
    """How long before expiry to refresh: ``margin`` or a third of the lifetime, whichever is more,
    but never before half of it is used (a margin longer than the lifetime would refresh in a loop)."""
    return min(max(margin, lifetime / 3), lifetime / 2)


class WebIdentity:
    """Temporary credentials from STS ``AssumeRoleWithWebIdentity``, kept fresh in the background."""

    def __init__(self, settings: Settings, *, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.description = f"TKE pod identity (role {settings.tke_role_arn})"
        self._url = settings.sts_endpoint + "/"
        self._host = self._url.split("://", 1)[1].rstrip("/")
        self._region = settings.tke_region
        self._provider_id = settings.tke_provider_id
        self._token_file = settings.tke_web_identity_token_file
        self._role_arn = settings.tke_role_arn
        self._duration = settings.sts_duration
        self._margin = settings.credentials_refresh_margin
        self._metrics = metrics
        self._clock = clock
        # CAM's audit log shows the session name: the pod's name says which replica assumed the role.
        self._session_name = ("tiw-facade-" + _SESSION_NAME_TEXT.sub("-", socket.gethostname()))[:64]
        self._session: aiohttp.ClientSession | None = None
        self._credentials: Credentials | None = None
        self._usable_until = 0.0  # time.monotonic()
        self._refresh_at = 0.0  # time.monotonic()
        self._failures = 0  # failed refreshes in a row
        self._inflight: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"Accept-Encoding": "identity"},
            auto_decompress=False,
        )
        await self._refresh_once()  # without credentials nothing can be served: fail the start
        self._task = asyncio.create_task(self._keep_fresh(), name="credentials-sts-refresh")

    async def get(self) -> Credentials:
        now = time.monotonic()
        if self._credentials is not None and now < self._usable_until:
            return self._credentials  # the hot path: no I/O, no lock
        if self._inflight is None and self._failures and now < self._refresh_at:
            # Between the retries the background task makes: callers do not each call STS.
            raise CredentialsError("the temporary credentials expired and STS could not renew them")
        await self._refresh_once()
        assert self._credentials is not None  # a successful refresh set them
        return self._credentials

    async def aclose(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, CredentialsError):
                    await task
        self._task = self._inflight = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._refresh_at - time.monotonic()))
            with contextlib.suppress(CredentialsError):  # logged and counted by _refresh
                await self._refresh_once()

    async def _refresh_once(self) -> None:
        """Refresh, or join the refresh in flight: one STS call however many callers wait."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh(), name="credentials-sts-call")
            self._inflight.add_done_callback(self._refreshed)
        # Shielded: a caller that goes away does not cancel the refresh the others wait for.
        await asyncio.shield(self._inflight)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here, so an abandoned failure is not reported as unhandled

    async def _refresh(self) -> None:
        try:
            credentials, expired_time, remaining = await self._assume_role()
        except CredentialsError as exc:
            self._failed(str(exc))
            raise
        now = time.monotonic()
        self._credentials = credentials
        self._usable_until = now + remaining - min(EXPIRY_GUARD_MAX, remaining / 10)
        self._refresh_at = now + remaining - refresh_lead(remaining, self._margin)
        self._failures = 0
        self._metrics.credentials_refreshes.inc()
        self._metrics.credentials_expiry.set(expired_time)
        log.info(
            "temporary credentials from STS",
            extra={
                "source": self.description,
                "secret_id": credentials.secret_id,
                "expires_in": round(remaining, 1),
                "refresh_in": round(self._refresh_at - now, 1),
            },
        )

    def _failed(self, why: str) -> None:
        now = time.monotonic()
        self._failures += 1
        self._metrics.credentials_refresh_failures.inc()
        left = self._usable_until - now if self._credentials is not None else 0.0
        # While valid: a quarter of what is left. Expired: back off, as every retry is a call to STS.
        retry = max(RETRY_MIN, left / 4) if left > 0 else RETRY_MIN * 2 ** min(self._failures, 8)
        retry = min(RETRY_MAX, retry)
        self._refresh_at = now + retry
        extra = {"source": self.description, "error": why, "retry_in": round(retry, 1)}
        if left > 0:
            log.warning(
                "STS refresh failed: the current credentials stay in use",
                extra={**extra, "valid_for": round(left, 1)},
            )
        else:
            log.error(
                "STS refresh failed and no valid credentials remain: calls fail until it succeeds",
                extra=extra,
            )

    async def _assume_role(self) -> tuple[Credentials, int, float]:
        """New credentials, their ExpiredTime (Unix seconds, Tencent's) and seconds left on them."""
        try:
            # The kubelet rotates it: read it each time, with the profile file's care.
            _, text = await asyncio.to_thread(_read, self._token_file)
        except OSError as exc:
            raise CredentialsError(f"TKE_WEB_IDENTITY_TOKEN_FILE: {_why(exc)}") from None
        except CredentialsError as exc:
            raise CredentialsError(f"TKE_WEB_IDENTITY_TOKEN_FILE: {exc}") from None
        token = text.strip()
        if not token:
            raise CredentialsError("TKE_WEB_IDENTITY_TOKEN_FILE is empty")
        body = json.dumps(
            {
                "ProviderId": self._provider_id,
                "WebIdentityToken": token,
                "RoleArn": self._role_arn,
                "RoleSessionName": self._session_name,
                "DurationSeconds": self._duration,
            }
        ).encode()
        # Not signed (there is no key yet): the official SDKs send "SKIP" as the Authorization.
        headers = {
            "Host": self._host,
            "Content-Type": "application/json",
            "X-TC-Action": STS_ACTION,
            "X-TC-Version": STS_VERSION,
            "X-TC-Region": self._region,
            "X-TC-Timestamp": str(int(self._clock())),
            "Authorization": "SKIP",
        }
        status, raw, date = await self._post(body, headers)
        answered_at = parse_http_date(date)
        now = answered_at + 0.5 if answered_at is not None else self._clock()  # Date has whole seconds
        response = _sts_response(status, raw)
        credentials, expired_time = _sts_credentials(response)
        remaining = expired_time - now
        if remaining <= 0:
            raise CredentialsError("STS answered credentials that have already expired")
        return credentials, expired_time, remaining

    async def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str | None]:
        if self._session is None:
            raise CredentialsError("the STS client is closed")
        where = self._host
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=STS_TIMEOUT),
                allow_redirects=False,
            ) as response:
                raw = await response.content.read(STS_MAX_ANSWER + 1)
                return response.status, raw, response.headers.get("Date")
        except TimeoutError:
            raise CredentialsError(f"STS at {where} did not answer within {STS_TIMEOUT:g}s") from None
        except aiohttp.ClientError as exc:  # its text may hold the request: name the kind only
            raise CredentialsError(f"STS at {where} failed ({type(exc).__name__})") from None


def _sts_response(status: int, raw: bytes) -> dict[str, Any]:
    if status != 200:
        raise CredentialsError(f"STS answered HTTP {status}")
    if len(raw) > STS_MAX_ANSWER:
        raise CredentialsError("STS's answer is too large")
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError):
        raise CredentialsError("STS's answer is not JSON") from None
    response = envelope.get("Response") if isinstance(envelope, dict) else None
    if not isinstance(response, dict):
        raise CredentialsError("STS's answer has no Response object")
    error = response.get("Error")
    if isinstance(error, dict):
        code, message = str(error.get("Code", ""))[:128], str(error.get("Message", ""))[:512]
        raise CredentialsError(f"STS refused: {code}: {message} (RequestId {response.get('RequestId')})")
    return response


def _sts_credentials(response: dict[str, Any]) -> tuple[Credentials, int]:
    found = response.get("Credentials")
    expired_time = response.get("ExpiredTime")
    names = ("TmpSecretId", "TmpSecretKey", "Token")
    if not isinstance(found, dict) or type(expired_time) is not int:
        raise CredentialsError("STS's answer lacks Credentials or ExpiredTime")
    values = [found.get(name) for name in names]
    texts = [value for value in values if isinstance(value, str) and _TOKEN_TEXT.fullmatch(value)]
    if len(texts) != len(names):
        raise CredentialsError("STS's Credentials are incomplete")
    secret_id, secret_key, token = texts
    return Credentials(secret_id, secret_key, token), expired_time
