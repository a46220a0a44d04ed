"""Callers proven by their Kubernetes projected service-account token (a JWT), sent as
``authorization: Bearer <token>``.

``TokenVerifier`` checks, in this order, without a call per token (the keys are held, authn_keys.py):

1. the header: ``alg`` RS256 or ES256 only, refused before any key is looked at (``none``, HS256
   and every other algorithm are UNSUPPORTED_ALGORITHM: no symmetric key confusion);
2. the key its ``kid`` names among the issuer's (an unknown kid triggers one rate-limited refresh);
3. the signature, with PyJWT, bound to the key's own algorithm;
4. ``aud`` contains the configured audience; ``iss`` equals the configured issuer (when the keys
   come through TIW_AUTH_ISSUER);
5. ``exp`` (required), ``nbf`` and ``iat`` against the clock, with LEEWAY for skew;
6. ``sub`` is ``system:serviceaccount:NAMESPACE:NAME``, and the ``kubernetes.io`` claims, when
   present, name the same namespace and service account.

A token that passes is remembered (an LRU of CACHE_ENTRIES, keyed by its SHA-256, until it
expires), so a caller's every call does not pay a signature check. A refresh that drops a key drops
the remembered tokens it signed: a token signed by a key the issuer removed is refused once the
facade's next refresh has seen it gone, within the refresh interval (TIW_AUTH_ISSUER or
TIW_AUTH_JWKS_URL: 5 minutes) or the file's poll (TIW_AUTH_JWKS_FILE: 1 second).

Every refusal is an ``AuthenticationFailed`` whose ``reason`` is an ``AuthnReason``, counted in
``tiw_authn_failures_total``; its message never holds the token nor anything read from it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, NamedTuple, NoReturn

from tiw_facade import authn_claims
from tiw_facade.authn_claims import LEEWAY, Principal
from tiw_facade.authn_keys import KeySet, KeySource, KeyStore, VerificationKey
from tiw_facade.authn_sources import Discovery, HttpFetcher, JwksFile, JwksUrl
from tiw_facade.failures import AuthenticationFailed, AuthnReason, KeysUnavailable
from tiw_facade.metrics import Metrics

if TYPE_CHECKING:
    from tiw_facade.settings import Settings

__all__ = [
    "CACHE_ENTRIES",
    "DEFAULT_AUDIENCE",
    "LEEWAY",
    "AuthenticationFailed",
    "AuthnConfig",
    "AuthnReason",
    "Principal",
    "TokenVerifier",
]

DEFAULT_AUDIENCE: Final = "tiw-facade"
DEFAULT_REFRESH_INTERVAL: Final = 300.0  # seconds between fetches of the issuer's keys
DEFAULT_FILE_POLL: Final = 1.0  # seconds between looks at TIW_AUTH_JWKS_FILE
CACHE_ENTRIES: Final = 4096  # tokens remembered; a few hundred bytes each
# A projected token is about 1 KiB; gRPC's metadata is 8 KiB. Longer is not one, and not parsed.
MAX_TOKEN_CHARS: Final = 8192
_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_.~+/=-]+")  # RFC 6750's b64token


@dataclasses.dataclass(frozen=True, slots=True)
class AuthnConfig:
    """How callers' tokens are checked. No key source (issuer, jwks_url, jwks_file): not at all."""

    issuer: str = ""  # TIW_AUTH_ISSUER: `iss` must equal it; keys through its discovery
    jwks_url: str = ""  # TIW_AUTH_JWKS_URL
    jwks_file: str = ""  # TIW_AUTH_JWKS_FILE
    audience: str = DEFAULT_AUDIENCE  # TIW_AUTH_AUDIENCE
    required: bool = False  # TIW_AUTH_REQUIRED: a call without a token is refused
    ca_file: str = ""  # TIW_AUTH_CA_FILE: trusted besides the system's CAs for the key fetches
    token_file: str = ""  # TIW_AUTH_TOKEN_FILE: bearer token of the key fetches
    refresh_interval: float = DEFAULT_REFRESH_INTERVAL
    file_poll: float = DEFAULT_FILE_POLL

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthnConfig:
        return cls(
            issuer=settings.auth_issuer,
            jwks_url=settings.auth_jwks_url,
            jwks_file=settings.auth_jwks_file,
            audience=settings.auth_audience,
            required=settings.auth_required,
            ca_file=settings.auth_ca_file,
            token_file=settings.auth_token_file,
        )

    @property
    def enabled(self) -> bool:
        """Tokens are accepted (and checked) at all."""
        return bool(self.issuer or self.jwks_url or self.jwks_file)

    def key_source(self) -> KeySource:
        sources = [value for value in (self.issuer, self.jwks_url, self.jwks_file) if value]
        if len(sources) != 1:
            raise ValueError("exactly one of issuer, jwks_url and jwks_file must be set")
        fetcher = HttpFetcher(ca_file=self.ca_file, token_file=self.token_file)
        if self.issuer:
            return Discovery(self.issuer, fetcher, schedule=self.refresh_interval)
        if self.jwks_url:
            return JwksUrl(self.jwks_url, fetcher, schedule=self.refresh_interval)
        return JwksFile(self.jwks_file, poll=self.file_poll)


class _Remembered(NamedTuple):
    principal: Principal
    fingerprint: str  # of the key that signed it


class TokenVerifier:
    """Checks callers' tokens against the keys of ``config``'s source; ``start()`` before use.

    ``clock``: Unix seconds, for exp, nbf and iat (and the refresh rate limit). ``metrics``: where
    refusals are counted (``tiw_authn_failures_total``), if anywhere. ``source``: where the keys
    come from, instead of the source ``config`` names.
    """

    def __init__(
        self,
        config: AuthnConfig,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        cache_entries: int = CACHE_ENTRIES,
        source: KeySource | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._store = KeyStore(source or config.key_source(), clock=clock, on_change=self._keys_changed)
        self._remembered: collections.OrderedDict[bytes, _Remembered] = collections.OrderedDict()
        self._cache_entries = cache_entries
        self._failures = (
            {reason.value: metrics.authn_failures.labels(reason=reason.value) for reason in AuthnReason}
            if metrics is not None
            else {}
        )

    @property
    def keys(self) -> KeySet | None:
        """The keys held (None until a fetch succeeded)."""
        return self._store.keys

    @property
    def key_fetches(self) -> int:
        """Fetches of the keys started so far (scheduled looks at an unchanged file excluded)."""
        return self._store.fetches

    async def start(self) -> None:
        await self._store.start()

    async def aclose(self) -> None:
        await self._store.aclose()

    async def refresh(self) -> bool:
        """Fetch the keys now; True when keys are held after it."""
        return await self._store.refresh()

    async def authenticate(self, authorization: str | None) -> Principal | None:
        """The caller an ``authorization`` metadata value proves; None when there is none and none
        is required. Raises ``AuthenticationFailed``."""
        if not authorization:
            if self.config.required:
                self._refuse(
                    AuthnReason.MISSING_TOKEN, "no `authorization: Bearer` token, and one is required"
                )
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self._refuse(AuthnReason.MALFORMED_TOKEN, "the authorization metadata is not `Bearer <token>`")
        return await self.verify(token.strip())

    async def verify(self, token: str) -> Principal:
        """The caller ``token`` proves. Raises ``AuthenticationFailed``."""
        try:
            return await self._verify(token)
        except AuthenticationFailed as exc:
            if counter := self._failures.get(exc.reason):
                counter.inc()
            raise

    def _refuse(self, reason: AuthnReason, detail: str) -> NoReturn:
        if counter := self._failures.get(reason.value):
            counter.inc()
        raise AuthenticationFailed(reason, detail)

    async def _verify(self, token: str) -> Principal:
        if not token:
            raise AuthenticationFailed(AuthnReason.MISSING_TOKEN, "the bearer token is empty")
        if len(token) > MAX_TOKEN_CHARS or not _TOKEN_TEXT.fullmatch(token):
            raise AuthenticationFailed(AuthnReason.MALFORMED_TOKEN, "the bearer token is not a JWT")
        digest = hashlib.sha256(token.encode()).digest()
        remembered = self._remembered.get(digest)
        if remembered is not None:
            if remembered.principal.expires_at <= self._clock() - LEEWAY:
                del self._remembered[digest]
                raise authn_claims.expired()
            self._remembered.move_to_end(digest)
            return remembered.principal
        algorithm, kid = authn_claims.header(token)
        key = await self._key(kid, algorithm)
        claims = authn_claims.signed_claims(
            token, key, audience=self.config.audience, issuer=self.config.issuer
        )
        principal = authn_claims.principal(claims, self._clock())
        self._remember(digest, _Remembered(principal, key.fingerprint))
        return principal

    async def _key(self, kid: str | None, algorithm: str) -> VerificationKey:
        keys = self._store.keys
        key = keys.find(kid, algorithm) if keys is not None else None
        if key is None and await self._store.refresh_on_demand():
            keys = self._store.keys
            key = keys.find(kid, algorithm) if keys is not None else None
        if keys is None:
            raise KeysUnavailable()
        if key is None:
            which = (
                "has no key of the token's kid"
                if kid is not None
                else f"has not exactly one {algorithm} key, and the token names none (kid)"
            )
            raise AuthenticationFailed(AuthnReason.UNKNOWN_KEY, f"the token's issuer {which}")
        if key.algorithm != algorithm:
            raise AuthenticationFailed(
                AuthnReason.BAD_SIGNATURE, f"the key the token names does not sign with {algorithm}"
            )
        return key

    def _remember(self, digest: bytes, remembered: _Remembered) -> None:
        self._remembered[digest] = remembered
        while len(self._remembered) > self._cache_entries:
            self._remembered.popitem(last=False)

    def _keys_changed(self, keys: KeySet) -> None:
        """Forget the tokens signed by a key no longer published."""
        for digest in [d for d, r in self._remembered.items() if r.fingerprint not in keys.fingerprints]:
            del self._remembered[digest]
