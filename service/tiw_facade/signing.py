"""TC3-HMAC-SHA256 request signing and verification, byte for byte as Tencent's official SDK signs.

Pure functions and two small stateful helpers (``Signer`` for the client, ``Verifier`` for the
emulator): bytes, keys and clocks in, strings out. Nothing here does I/O or knows gRPC or HTTP
clients. Secrets never appear in a repr, a log line or an exception message.

The steps (see ``docs/tiw-api.md``)::

    canonical request = POST / <empty query> <canonical headers> <signed headers> sha256(body)
    string to sign    = TC3-HMAC-SHA256 <timestamp> <date>/<service>/tc3_request sha256(canonical)
    signing key       = HMAC(HMAC(HMAC("TC3" + secret key, date), service), "tc3_request")
    signature         = hex(HMAC(signing key, string to sign))
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

ALGORITHM: Final = "TC3-HMAC-SHA256"
CONTENT_TYPE: Final = "application/json"
DEFAULT_SERVICE: Final = "tiw"
DEFAULT_VERSION: Final = "2019-09-19"
# The official SDK's form; Tencent also accepts the X-TC-Action header signed in addition.
SIGNED_HEADERS: Final = "content-type;host"
SIGNED_HEADERS_WITH_ACTION: Final = "content-type;host;x-tc-action"
# Tencent rejects a timestamp further than this from its clock, in either direction.
MAX_CLOCK_SKEW: Final = 300
# The Authorization of a request sent without a key (STS's AssumeRoleWithWebIdentity, which is how a
# pod gets one), as the official SDKs send it.
UNSIGNED: Final = "SKIP"
# What a SecretId, a SecretKey or a token may contain: printable ASCII without spaces (they go into
# headers, and a key is hashed as text).
TOKEN_TEXT: Final = re.compile(r"[!-~]+")

# The TIW error codes verification can answer.
INVALID_AUTHORIZATION: Final = "AuthFailure.InvalidAuthorization"
SECRET_ID_NOT_FOUND: Final = "AuthFailure.SecretIdNotFound"
SIGNATURE_FAILURE: Final = "AuthFailure.SignatureFailure"
SIGNATURE_EXPIRE: Final = "AuthFailure.SignatureExpire"

_SECONDS_PER_DAY: Final = 86400
_AUTHORIZATION_RE: Final = re.compile(
    r"TC3-HMAC-SHA256 Credential=(?P<secret_id>[^/\s,]+)/(?P<date>\d{4}-\d{2}-\d{2})/"
    r"(?P<service>[a-z0-9-]+)/tc3_request, ?SignedHeaders=(?P<signed_headers>[a-z0-9;-]+), ?"
    r"Signature=(?P<signature>[0-9a-f]{64})"
)


@dataclass(frozen=True)
class Credentials:
    """A Tencent Cloud API key; ``token`` only for temporary credentials (sent as X-TC-Token)."""

    secret_id: str
    secret_key: str = field(repr=False)
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class Authorization:
    """The parts of a parsed ``Authorization`` header."""

    secret_id: str
    date: str
    service: str
    signed_headers: str
    signature: str = field(repr=False)


def utc_date(timestamp: int) -> str:
    """The UTC date (``YYYY-MM-DD``) of a Unix timestamp: the date of the credential scope."""
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp))


def payload_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def canonical_request(
    host: str, body_hash: str, *, content_type: str = CONTENT_TYPE, action: str | None = None
) -> str:
    """The canonical request of ``POST /``; ``action`` given means X-TC-Action is signed too."""
    if action is None:
        return f"POST\n/\n\ncontent-type:{content_type}\nhost:{host}\n\n{SIGNED_HEADERS}\n{body_hash}"
    return (
        f"POST\n/\n\ncontent-type:{content_type}\nhost:{host}\nx-tc-action:{action.lower()}\n\n"
        f"{SIGNED_HEADERS_WITH_ACTION}\n{body_hash}"
    )


def credential_scope(date: str, service: str = DEFAULT_SERVICE) -> str:
    return f"{date}/{service}/tc3_request"


def string_to_sign(timestamp: int, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"


def derive_signing_key(secret_key: str, date: str, service: str = DEFAULT_SERVICE) -> bytes:
    k_date = hmac.digest(("TC3" + secret_key).encode("utf-8"), date.encode("utf-8"), "sha256")
    k_service = hmac.digest(k_date, service.encode("utf-8"), "sha256")
    return hmac.digest(k_service, b"tc3_request", "sha256")


def signature(signing_key: bytes, to_sign: str) -> str:
    # hmac.digest is the one-shot C path: several times cheaper than building an hmac.HMAC.
    return hmac.digest(signing_key, to_sign.encode("utf-8"), "sha256").hex()


def sign(
    secret_key: str,
    *,
    host: str,
    body: bytes,
    timestamp: int,
    service: str = DEFAULT_SERVICE,
    content_type: str = CONTENT_TYPE,
    action: str | None = None,
) -> str:
    """The whole computation in one call, uncached: for tests and one-off use."""
    date = utc_date(timestamp)
    canonical = canonical_request(host, payload_hash(body), content_type=content_type, action=action)
    return signature(
        derive_signing_key(secret_key, date, service),
        string_to_sign(timestamp, credential_scope(date, service), canonical),
    )


def authorization_header(secret_id: str, scope: str, signed_headers: str, signature_hex: str) -> str:
    return (
        f"{ALGORITHM} Credential={secret_id}/{scope}, SignedHeaders={signed_headers}, "
        f"Signature={signature_hex}"
    )


def parse_authorization(value: str) -> Authorization | None:
    """Split an ``Authorization`` header into its parts; ``None`` if it is not a TC3 header."""
    match = _AUTHORIZATION_RE.fullmatch(value.strip())
    if match is None:
        return None
    return Authorization(**match.groupdict())


def unsigned_headers(
    host: str, action: str, timestamp: int, *, version: str, region: str = "", language: str = ""
) -> dict[str, str]:
    """Every header of a request sent without a key (``Authorization: SKIP``)."""
    headers = {"Host": host, "Content-Type": CONTENT_TYPE, "X-TC-Version": version}
    if region:
        headers["X-TC-Region"] = region
    if language:
        headers["X-TC-Language"] = language
    headers["X-TC-Action"] = action
    headers["X-TC-Timestamp"] = str(timestamp)
    headers["Authorization"] = UNSIGNED
    return headers


class Signer:
    """Signs TIW requests for one host and one key; caches the derived signing key per UTC date."""

    def __init__(
        self,
        credentials: Credentials,
        host: str,
        *,
        service: str = DEFAULT_SERVICE,
        version: str = DEFAULT_VERSION,
        region: str = "",
        language: str = "",
        sign_action: bool = False,
    ) -> None:
        """``sign_action`` also signs X-TC-Action, so a captured request cannot be replayed as
        another action; off by default, as in the official SDK."""
        self._credentials = credentials
        self._host = host
        self._service = service
        self._sign_action = sign_action
        self._signed_headers = SIGNED_HEADERS_WITH_ACTION if sign_action else SIGNED_HEADERS
        self._canonical_headers = f"POST\n/\n\ncontent-type:{CONTENT_TYPE}\nhost:{host}\n"
        self._common: dict[str, str] = {"Host": host, "Content-Type": CONTENT_TYPE, "X-TC-Version": version}
        if region:
            self._common["X-TC-Region"] = region
        if credentials.token:
            self._common["X-TC-Token"] = credentials.token
        if language:
            self._common["X-TC-Language"] = language
        # (day number, date, signing key), replaced as one object so that a reader in another
        # thread never pairs one day's date with another day's key.
        self._day_key: tuple[int, str, bytes] = (-1, "", b"")

    def __repr__(self) -> str:
        return f"Signer(credentials={self._credentials!r}, host={self._host!r}, service={self._service!r})"

    def _date_and_key(self, timestamp: int) -> tuple[str, bytes]:
        day, date, key = self._day_key
        if timestamp // _SECONDS_PER_DAY != day:
            date = utc_date(timestamp)
            key = derive_signing_key(self._credentials.secret_key, date, self._service)
            self._day_key = (timestamp // _SECONDS_PER_DAY, date, key)
        return date, key

    def headers(self, action: str, body: bytes, timestamp: int) -> dict[str, str]:
        """Every header of the request that carries exactly ``body`` (sign what you send)."""
        date, key = self._date_and_key(timestamp)
        if self._sign_action:
            canonical_headers = f"{self._canonical_headers}x-tc-action:{action.lower()}\n"
        else:
            canonical_headers = self._canonical_headers
        canonical = f"{canonical_headers}\n{self._signed_headers}\n{hashlib.sha256(body).hexdigest()}"
        scope = f"{date}/{self._service}/tc3_request"
        signature_hex = signature(key, string_to_sign(timestamp, scope, canonical))
        headers = self._common.copy()
        headers["X-TC-Action"] = action
        headers["X-TC-Timestamp"] = str(timestamp)
        headers["Authorization"] = authorization_header(
            self._credentials.secret_id, scope, self._signed_headers, signature_hex
        )
        return headers


class Verifier:
    """Checks TC3 signatures as Tencent does; caches derived keys per (secret key, date).

    ``secret_lookup`` maps a SecretId to its SecretKey (``None``: unknown). Headers are looked up
    by their canonical spelling (``Authorization``, ``Host``...): pass a case-insensitive mapping
    such as aiohttp's ``request.headers`` when the sender's spelling is not known.
    """

    _CACHE_LIMIT: Final = 1024

    def __init__(
        self,
        secret_lookup: Callable[[str], str | None],
        *,
        service: str = DEFAULT_SERVICE,
        max_skew: int = MAX_CLOCK_SKEW,
    ) -> None:
        self._lookup = secret_lookup
        self._service = service
        self._max_skew = max_skew
        self._keys: dict[tuple[str, str], bytes] = {}
        self._day_date: tuple[int, str] = (-1, "")

    def __repr__(self) -> str:
        return f"Verifier(service={self._service!r}, max_skew={self._max_skew!r})"

    def _key(self, secret_key: str, date: str) -> bytes:
        cache_key = (secret_key, date)
        key = self._keys.get(cache_key)
        if key is None:
            if len(self._keys) >= self._CACHE_LIMIT:
                self._keys.clear()
            key = self._keys[cache_key] = derive_signing_key(secret_key, date, self._service)
        return key

    def _utc_date(self, timestamp: int) -> str:
        day, date = self._day_date
        if timestamp // _SECONDS_PER_DAY != day:
            date = utc_date(timestamp)
            self._day_date = (timestamp // _SECONDS_PER_DAY, date)
        return date

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> str | None:
        """``None`` if the request is signed correctly and in time, else the TIW error code."""
        auth = parse_authorization(headers.get("Authorization", ""))
        raw_timestamp = headers.get("X-TC-Timestamp", "")
        if auth is None or not raw_timestamp.isascii() or not raw_timestamp.isdigit():
            return INVALID_AUTHORIZATION
        if auth.signed_headers == SIGNED_HEADERS:
            action = None
        elif auth.signed_headers == SIGNED_HEADERS_WITH_ACTION:
            action = headers.get("X-TC-Action", "")
        else:
            return INVALID_AUTHORIZATION
        timestamp = int(raw_timestamp)
        if abs(now - timestamp) > self._max_skew:
            return SIGNATURE_EXPIRE
        secret_key = self._lookup(auth.secret_id)
        if secret_key is None:
            return SECRET_ID_NOT_FOUND
        # A scope for another day or service can never match what we compute: say so early.
        if auth.service != self._service or auth.date != self._utc_date(timestamp):
            return SIGNATURE_FAILURE
        canonical = canonical_request(
            headers.get("Host", ""),
            hashlib.sha256(body).hexdigest(),
            content_type=headers.get("Content-Type", ""),
            action=action,
        )
        expected = signature(
            self._key(secret_key, auth.date),
            string_to_sign(timestamp, f"{auth.date}/{self._service}/tc3_request", canonical),
        )
        if not hmac.compare_digest(expected, auth.signature):
            return SIGNATURE_FAILURE
        return None
