"""TKE pod identity (OIDC): the pod's projected service-account token exchanged at STS
(``AssumeRoleWithWebIdentity``) for temporary credentials, refreshed in the background well before
they expire (docs/credentials.md#tke-pod-identity-oidc).

STS is called through the same Tencent API client as TIW (tencent_api.py, over transport.py): the
same caps and the same handling of whatever a hostile endpoint answers. Every failure of a refresh
is a ``CredentialsError`` whose text names STS and never holds the token or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import socket
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from tiw_facade import secret_files
from tiw_facade.failures import CredentialsError, TiwError, UpstreamFailure
from tiw_facade.metrics import Metrics
from tiw_facade.signing import TOKEN_TEXT, Credentials
from tiw_facade.tencent_api import TencentApi, encode
from tiw_facade.tencent_clock import parse_http_date
from tiw_facade.transport import CONNECT_TIMEOUT, AiohttpTransport

if TYPE_CHECKING:
    from tiw_facade.settings import Settings

# The credentials' logger, as before this module was split from credentials.py: filters know it.
log = logging.getLogger("tiw_facade.credentials")

STS_ENDPOINT: Final = "https://sts.tencentcloudapi.com"
STS_SERVICE: Final = "sts"
STS_ACTION: Final = "AssumeRoleWithWebIdentity"
STS_VERSION: Final = "2018-08-13"
STS_MAX_DURATION: Final = 43200
STS_TIMEOUT: Final = 10.0
STS_MAX_ANSWER: Final = 64 << 10
# An ExpiredTime beyond this is no time STS gives (Unix seconds, while a float still holds it exactly).
MAX_EXPIRED_TIME: Final = 2**53
# A failed refresh is tried again after a quarter of the time the current credentials have left,
# within these bounds: often enough to recover before they expire, not so often as to hammer STS.
RETRY_MIN: Final = 0.5
RETRY_MAX: Final = 30.0
# Credentials are not used in their last moments: a request signed then could arrive after expiry.
EXPIRY_GUARD_MAX: Final = 5.0
MAX_MESSAGE: Final = 512

_SESSION_NAME_TEXT: Final = re.compile(r"[^\w+=,.@-]")


def refresh_lead(lifetime: float, margin: float) -> float:
    """How long before expiry to refresh: ``margin`` or a third of the lifetime, whichever is more,
    but never before half of it is used (a margin longer than the lifetime would refresh in a loop)."""
    return min(max(margin, lifetime / 3), lifetime / 2)


@dataclasses.dataclass(frozen=True, slots=True)
class WebIdentityConfig:
    """What TKE sets (the four ``TKE_*``; all empty: not configured) and how STS is asked."""

    region: str = ""  # TKE_REGION: of the STS call
    provider_id: str = ""  # TKE_PROVIDER_ID
    token_file: str = ""  # TKE_WEB_IDENTITY_TOKEN_FILE
    role_arn: str = ""  # TKE_ROLE_ARN
    sts_endpoint: str = STS_ENDPOINT  # TIW_STS_ENDPOINT: base URL
    duration: int = 7200  # TIW_STS_DURATION: seconds asked for
    refresh_margin: float = 300.0  # TIW_CREDENTIALS_REFRESH_MARGIN
    connect_timeout: float = CONNECT_TIMEOUT  # TIW_CONNECT_TIMEOUT

    @classmethod
    def from_settings(cls, settings: Settings) -> WebIdentityConfig:
        from tiw_facade.settings import configure

        return configure(
            cls,
            settings,
            region=settings.tke_region,
            provider_id=settings.tke_provider_id,
            token_file=settings.tke_web_identity_token_file,
            role_arn=settings.tke_role_arn,
            duration=settings.sts_duration,
            refresh_margin=settings.credentials_refresh_margin,
        )

    @property
    def variables(self) -> dict[str, str]:
        """The four values TKE sets, by their environment variables: set together, or none of them."""
        return {
            "TKE_REGION": self.region,
            "TKE_PROVIDER_ID": self.provider_id,
            "TKE_WEB_IDENTITY_TOKEN_FILE": self.token_file,
            "TKE_ROLE_ARN": self.role_arn,
        }


class WebIdentity:
    """Temporary credentials from STS ``AssumeRoleWithWebIdentity``, kept fresh in the background.

    Holds its own STS client (started and closed with it); ``clock``: Tencent's time, Unix seconds.
    """

    def __init__(self, config: WebIdentityConfig, *, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.description = f"TKE pod identity (role {config.role_arn})"
        endpoint = config.sts_endpoint + "/"
        transport = AiohttpTransport(
            endpoint, name="STS", max_answer_bytes=STS_MAX_ANSWER, connect_timeout=config.connect_timeout
        )
        host = urllib.parse.urlsplit(endpoint).netloc
        self._sts = TencentApi(
            transport,
            name="STS",
            host=host,
            service=STS_SERVICE,
            version=STS_VERSION,
            region=config.region,
        )
        self._open = False
        self._provider_id = config.provider_id
        self._token_file = config.token_file
        self._role_arn = config.role_arn
        self._duration = config.duration
        self._margin = config.refresh_margin
        self._metrics = metrics
        self._clock = clock
        # CAM's audit log shows the session name: the pod's name says which replica assumed the role.
        self._session_name = ("tiw-facade-" + _SESSION_NAME_TEXT.sub("-", socket.gethostname()))[:64]
        self._credentials: Credentials | None = None
        self._usable_until = 0.0  # time.monotonic()
        self._refresh_at = 0.0  # time.monotonic()
        self._failures = 0  # failed refreshes in a row
        self._inflight: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._sts.start()
        self._open = True
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
        if self._open:
            self._open = False
            await self._sts.aclose()

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
            _, text = await asyncio.to_thread(secret_files.read, self._token_file)
        except secret_files.Unreadable as exc:
            raise CredentialsError(f"TKE_WEB_IDENTITY_TOKEN_FILE: {exc}") from None
        token = text.strip()
        if not token:
            raise CredentialsError("TKE_WEB_IDENTITY_TOKEN_FILE is empty")
        body = encode(
            {
                "ProviderId": self._provider_id,
                "WebIdentityToken": token,
                "RoleArn": self._role_arn,
                "RoleSessionName": self._session_name,
                "DurationSeconds": self._duration,
            }
        )
        if not self._open:
            raise CredentialsError("the STS client is closed")
        try:
            # Not signed (there is no key yet): the official SDKs send "SKIP" as the Authorization.
            answer = await self._sts.send(
                STS_ACTION, body, credentials=None, timestamp=int(self._clock()), timeout=STS_TIMEOUT
            )
            response = self._sts.read(answer)
        except TiwError as exc:  # STS's own error envelope, checked as TIW's are
            refusal = f"{exc.code}: {exc.message[:MAX_MESSAGE]} (RequestId {exc.request_id or None})"
            raise CredentialsError(f"STS refused: {refusal}") from None
        except UpstreamFailure as exc:  # its text names STS and never holds the request
            raise CredentialsError(str(exc)) from None
        answered_at = parse_http_date(answer.date)
        now = answered_at + 0.5 if answered_at is not None else self._clock()  # Date has whole seconds
        credentials, expired_time = _sts_credentials(response)
        remaining = expired_time - now
        if remaining <= 0:
            raise CredentialsError("STS answered credentials that have already expired")
        return credentials, expired_time, remaining


def _sts_credentials(response: dict[str, Any]) -> tuple[Credentials, int]:
    found = response.get("Credentials")
    expired_time = response.get("ExpiredTime")
    names = ("TmpSecretId", "TmpSecretKey", "Token")
    if not isinstance(found, dict) or type(expired_time) is not int:
        raise CredentialsError("STS's answer lacks Credentials or ExpiredTime")
    if not 0 < expired_time < MAX_EXPIRED_TIME:  # a larger int would not even subtract from a float
        raise CredentialsError("STS's ExpiredTime is no time STS gives")
    values = [found.get(name) for name in names]
    texts = [value for value in values if isinstance(value, str) and TOKEN_TEXT.fullmatch(value)]
    if len(texts) != len(names):
        raise CredentialsError("STS's Credentials are incomplete")
    secret_id, secret_key, token = texts
    return Credentials(secret_id, secret_key, token), expired_time
