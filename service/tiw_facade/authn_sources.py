"""Where the keys of the callers' tokens come from: the issuer's OIDC discovery, a JWKS URL, a file.

``Discovery`` does what Vault's Kubernetes auth method and any OIDC relying party do:
``GET {issuer}/.well-known/openid-configuration``, check that the document names the configured
issuer, then ``GET`` its ``jwks_uri``. The API server serves both (``--service-account-issuer``);
inside a cluster over TLS signed by the cluster's CA and, unless anonymous access to them is
granted, only to a caller with a token: TIW_AUTH_CA_FILE and TIW_AUTH_TOKEN_FILE.

Every fetch is bounded: MAX_DOCUMENT_BYTES, FETCH_TIMEOUT, redirects only within one origin (so
the bearer token never reaches another host), and the token only over https or to this host.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.parse
from typing import Any, Final

import aiohttp

from tiw_facade import secret_files
from tiw_facade.authn_keys import KeySet, KeySourceError, parse_jwks
from tiw_facade.secret_files import FileVersion
from tiw_facade.settings import is_loopback, key_url, redact_url

DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
MAX_DOCUMENT_BYTES: Final = 1 << 20  # a discovery document or JWKS is a few KiB
FETCH_TIMEOUT: Final = 5.0  # seconds, the whole fetch (a token waiting for a refresh waits this long at most)
MAX_REDIRECTS: Final = 3
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
MAX_ERROR_TEXT: Final = 300


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _may_carry_token(url: str) -> bool:
    """A bearer token travels only where it cannot be read on the way."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname or ""))


class HttpFetcher:
    """GETs of small JSON documents for the key sources.

    ``ca_file``: a PEM bundle trusted besides the system's CAs, read at each fetch (a rotated
    cluster CA is picked up). ``token_file``: a bearer token sent with each fetch, re-read each time
    (the kubelet rotates a projected token).
    """

    def __init__(
        self,
        *,
        ca_file: str = "",
        token_file: str = "",
        timeout: float = FETCH_TIMEOUT,
        max_bytes: int = MAX_DOCUMENT_BYTES,
    ) -> None:
        self._ca_file = ca_file
        self._token_file = token_file
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No proxies from the environment, no cookies: each fetch stands alone.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get_json(self, url: str) -> Any:
        """The JSON document at ``url``; KeySourceError naming the URL (redacted) otherwise."""
        if self._session is None:
            raise KeySourceError("the key fetcher is not started")
        shown = redact_url(url)
        context = await asyncio.to_thread(self._ssl_context) if url.startswith("https:") else None
        headers = {"Accept": "application/json"}
        if self._token_file and _may_carry_token(url):
            headers["Authorization"] = f"Bearer {await self._token()}"
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with self._session.get(
                    url, headers=headers, ssl=context if context is not None else True, allow_redirects=False
                ) as response:
                    if response.status in REDIRECTS:
                        target = urllib.parse.urljoin(url, response.headers.get("Location", ""))
                        if _origin(target) != _origin(url):
                            raise KeySourceError(f"{shown} redirected to another host")
                        url = target
                        continue
                    if response.status != 200:
                        raise KeySourceError(f"{shown} answered HTTP {response.status}")
                    body = await self._read(response, shown)
            except (aiohttp.ClientError, TimeoutError) as exc:
                detail = str(exc)[:MAX_ERROR_TEXT] or type(exc).__name__
                raise KeySourceError(f"{shown}: {detail}") from None
            try:
                return json.loads(body)
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                raise KeySourceError(f"{shown} answered something that is not JSON") from None
        raise KeySourceError(f"{shown}: more than {MAX_REDIRECTS} redirects")

    async def _read(self, response: aiohttp.ClientResponse, shown: str) -> bytes:
        too_large = KeySourceError(f"{shown} answered more than {self._max_bytes} bytes")
        if response.content_length is not None and response.content_length > self._max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 << 10):  # decompressed: a bomb is bounded too
            size += len(chunk)
            if size > self._max_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self._ca_file:
            try:
                context.load_verify_locations(cafile=self._ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise KeySourceError(f"TIW_AUTH_CA_FILE {self._ca_file}: {type(exc).__name__}") from None
        return context

    async def _token(self) -> str:
        try:
            _, text = await asyncio.to_thread(secret_files.read, self._token_file)
        except secret_files.Unreadable as exc:
            raise KeySourceError(f"TIW_AUTH_TOKEN_FILE: {exc}") from None
        token = text.strip()
        if not token or any(c.isspace() or not c.isprintable() for c in token):
            raise KeySourceError("TIW_AUTH_TOKEN_FILE does not hold one token")
        return token


class JwksUrl:
    """The keys at a JWKS URL."""

    polled = False

    def __init__(self, url: str, fetcher: HttpFetcher, *, schedule: float) -> None:
        self.url = url
        self.description = redact_url(url)
        self.schedule = schedule
        self._fetcher = fetcher

    async def start(self) -> None:
        await self._fetcher.start()

    async def aclose(self) -> None:
        await self._fetcher.aclose()

    async def fetch(self, *, if_changed: bool = False) -> KeySet:
        return parse_jwks(await self._fetcher.get_json(await self._jwks_uri()))

    async def _jwks_uri(self) -> str:
        return self.url


class Discovery(JwksUrl):
    """The issuer's keys, through its OIDC discovery document (``url`` is the issuer)."""

    @property
    def issuer(self) -> str:
        return self.url

    async def _jwks_uri(self) -> str:
        document = await self._fetcher.get_json(self.issuer.rstrip("/") + DISCOVERY_PATH)
        if not isinstance(document, dict):
            raise KeySourceError("the discovery document is not a JSON object")
        # OpenID Connect Discovery 1.0, 4.3: the document must be the issuer's own.
        if document.get("issuer") != self.issuer:
            raise KeySourceError("the discovery document names another issuer than TIW_AUTH_ISSUER")
        jwks_uri = document.get("jwks_uri")
        try:
            if not isinstance(jwks_uri, str):
                raise ValueError
            key_url(jwks_uri)
        except ValueError:  # settings.Invalid included
            raise KeySourceError("the discovery document's jwks_uri is not an https URL") from None
        return jwks_uri


class JwksFile:
    """The keys in a JWKS file, looked at every ``poll`` seconds and read again when it changed
    (a ConfigMap volume is swapped in one rename), read as secret_files reads (bounded, never blocking)."""

    polled = True

    def __init__(self, path: str, *, poll: float) -> None:
        self.path = path
        self.description = path
        self.schedule = poll
        self._seen: FileVersion | None = None  # the version of the keys held

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def fetch(self, *, if_changed: bool = False) -> KeySet | None:
        try:
            if if_changed and await asyncio.to_thread(secret_files.version, self.path) == self._seen:
                return None
            version, text = await asyncio.to_thread(secret_files.read, self.path)
        except OSError as exc:  # the stat of a file gone
            raise KeySourceError(secret_files.why(exc)) from None
        except secret_files.Unreadable as exc:
            raise KeySourceError(str(exc)) from None
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            raise KeySourceError("not JSON") from None
        keys = parse_jwks(document)
        self._seen = version
        return keys
