"""STS's ``AssumeRoleWithWebIdentity`` (version 2018-08-13), as TKE pod identity calls it, and the
temporary credentials it issues: accepted by the emulated TIW, with their ``X-TC-Token``, until
they expire.

The call is not signed (there is no key yet): the official SDKs send ``Authorization: SKIP``. The
emulator accepts a web identity token it was configured with (``EmulatorConfig.web_identity_tokens``)
and issues credentials for ``min(DurationSeconds, EmulatorConfig.sts_max_seconds)``, so a test can
watch them expire in seconds.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Mapping
from typing import Any, Final

from tiw_facade.emulator.config import EmulatorConfig
from tiw_facade.emulator.protocol import EmulatedTiwError

ACTION: Final = "AssumeRoleWithWebIdentity"
VERSION: Final = "2018-08-13"
MAX_DURATION: Final = 43200
DEFAULT_DURATION: Final = 7200
# What the real API answers for temporary credentials past their expiry (or a token not theirs).
TOKEN_FAILURE: Final = "AuthFailure.TokenFailure"
_REQUIRED: Final = ("ProviderId", "WebIdentityToken", "RoleArn", "RoleSessionName")


@dataclasses.dataclass(frozen=True)
class Issued:
    secret_key: str = dataclasses.field(repr=False)
    token: str = dataclasses.field(repr=False)
    expires: float  # the emulator's clock


class SecurityTokenService:
    """Issues temporary credentials and remembers them for the TIW side's checks."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._issued: dict[str, Issued] = {}
        self.calls = 0  # AssumeRoleWithWebIdentity requests answered with credentials
        self.refused = 0

    def secret_key(self, secret_id: str) -> str | None:
        issued = self._issued.get(secret_id)
        return issued.secret_key if issued is not None else None

    def check_token(self, secret_id: str, token: str, now: float) -> str | None:
        """``None`` for a long-term key, or a temporary one with its token, unexpired; else the code."""
        issued = self._issued.get(secret_id)
        if issued is None:
            return None  # a long-term key; a token with it is ignored (tests use the demo key so)
        if token != issued.token or now >= issued.expires:
            return TOKEN_FAILURE
        return None

    def assume_role(self, headers: Mapping[str, str], params: Any, now: float) -> dict[str, Any]:
        """The ``Response`` fields of a successful call, or raise the ``EmulatedTiwError`` STS answers."""
        try:
            self._check(headers, params)
        except EmulatedTiwError:
            self.refused += 1
            raise
        duration = params.get("DurationSeconds", DEFAULT_DURATION)
        lifetime = min(duration, self._config.sts_max_seconds)
        secret_id = "AKIDtmp" + secrets.token_hex(12)
        issued = Issued(secrets.token_urlsafe(24), secrets.token_urlsafe(48), now + lifetime)
        self._issued[secret_id] = issued
        self.calls += 1
        expired_time = int(issued.expires)  # Unix seconds, as STS answers: never later than the truth
        return {
            "Credentials": {
                "Token": issued.token,
                "TmpSecretId": secret_id,
                "TmpSecretKey": issued.secret_key,
            },
            "ExpiredTime": expired_time,
            "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expired_time)),
        }

    def _check(self, headers: Mapping[str, str], params: Any) -> None:
        if headers.get("X-TC-Version", "") != VERSION:
            raise EmulatedTiwError(
                "NoSuchVersion", f"The API version `{headers.get('X-TC-Version', '')}` does not exist."
            )
        if not headers.get("X-TC-Region"):
            raise EmulatedTiwError(
                "MissingParameter", "The request is missing a required parameter `Region`."
            )
        if not isinstance(params, dict):
            raise EmulatedTiwError("InvalidParameter", "The request body must be a JSON object.")
        for name in _REQUIRED:
            if not isinstance(params.get(name), str) or not params[name]:
                raise EmulatedTiwError(
                    "MissingParameter", f"The request is missing a required parameter `{name}`."
                )
        duration = params.get("DurationSeconds", DEFAULT_DURATION)
        if type(duration) is not int or not 0 < duration <= MAX_DURATION:
            raise EmulatedTiwError(
                "InvalidParameter", f"DurationSeconds must be an integer 1..{MAX_DURATION}."
            )
        if params["WebIdentityToken"] not in self._config.web_identity_tokens:
            raise EmulatedTiwError(
                "InvalidParameter.WebIdentityTokenError", "The WebIdentityToken is not valid."
            )
