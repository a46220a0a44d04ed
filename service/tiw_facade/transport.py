"""One HTTP exchange with a Tencent Cloud API (TIW, STS) over aiohttp: a pooled keep-alive session,
and the one place where aiohttp's and asyncio's exceptions become the facade's failures (model:
httpx's ``map_httpcore_exceptions``).

aiohttp rather than httpx: on this kind of machine httpx 0.28 costs 3-4x aiohttp's CPU per call and
slows down as calls in flight grow (bench/ shows it). Another transport may stand in for this one if
it has the same shape (``Transport``).

Never puts aiohttp's exception text into a failure: some of aiohttp's exceptions carry the request
(``request_info``), whose headers hold the Authorization signature and the X-TC-Token session
token, and a failure's text reaches the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Protocol

import aiohttp
import yarl

from tiw_facade.failures import (
    Outcome,
    UpstreamConnectionLost,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamUnreachable,
)

# TIW answers plain JSON of a few KB; a larger answer is not TIW's (or a fault), and reading it all
# would cost memory for nothing.
MAX_ANSWER_BYTES = 1 << 20
# Connecting should be quick; a connect time-out proves the request never left, so even
# CreateSnapshotTask may be re-sent after one.
CONNECT_TIMEOUT = 2.0
# Idle keep-alive connections are dropped before a typical server-side idle time-out (60 s), so a
# request rarely meets a connection the server is closing, which would be an unsafe failure to
# retry for CreateSnapshotTask.
KEEPALIVE_TIMEOUT = 15.0


class Answer(NamedTuple):
    status: int
    body: bytes
    # The Date header: Tencent's clock, from which the client learns how far off ours is.
    date: str | None = None


class Transport(Protocol):
    """What a Tencent API client (tencent_api.py) needs of HTTP: POST a body, get back the status,
    the whole body and the Date header."""

    async def start(self) -> None: ...

    # The time-out is a parameter, not asyncio.timeout around the call: the transport splits it
    # into a connect time-out (which proves nothing was sent) and the rest.
    async def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109
    ) -> Answer:
        """Raise only the failures module's ``UpstreamUnreachable``, ``UpstreamTimeout``,
        ``UpstreamConnectionLost`` or ``UpstreamMalformed``."""
        ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    def __init__(
        self,
        url: str,
        *,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        connect_timeout: float = CONNECT_TIMEOUT,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        pool_limit: int = 100,
        name: str = "TIW",
    ) -> None:
        """``name``: the API the failures' texts name."""
        # Parsed once: aiohttp would otherwise parse and normalise the URL on every request.
        self._url = yarl.URL(url, encoded=True)
        self._name = name
        self._where = f"{name} at {self._url.host}:{self._url.port}"
        self._max_answer_bytes = max_answer_bytes
        self._connect_timeout = connect_timeout
        self._keepalive_timeout = keepalive_timeout
        self._pool_limit = pool_limit
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._pool_limit, keepalive_timeout=self._keepalive_timeout, ttl_dns_cache=60
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Tencent sets no cookies: a dummy jar spares the cookie bookkeeping on every request.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Tencent answers plain JSON: ask for it, and never inflate what arrives (no zip bomb).
            headers={"Accept-Encoding": "identity"},
            auto_decompress=False,
            raise_for_status=False,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109 (see Transport.post)
    ) -> Answer:
        session = self._session
        if session is None:
            raise RuntimeError("AiohttpTransport.start() was not awaited")
        limits = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, self._connect_timeout))
        try:
            async with session.post(
                self._url, data=body, headers=headers, timeout=limits, allow_redirects=False
            ) as response:
                body = await self._read(response)
                return Answer(response.status, body, response.headers.get("Date"))
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one too
            raise UpstreamUnreachable(f"connecting to {self._where} timed out") from exc
        except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS handshake: nothing was sent
            why = exc.os_error.strerror or type(exc.os_error).__name__
            raise UpstreamUnreachable(f"cannot connect to {self._where}: {why}") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"{self._name} did not answer within {timeout:.3f}s", outcome=Outcome.UNKNOWN
            ) from exc
        except aiohttp.ClientResponseError as exc:  # the answer is not HTTP (its text holds our headers)
            raise UpstreamMalformed(
                f"{self._name}'s answer is not valid HTTP ({type(exc).__name__})"
            ) from exc
        except aiohttp.ClientError as exc:  # whatever arrived before the connection broke, arrived
            raise UpstreamConnectionLost(
                f"the connection to {self._name} broke before its answer was read ({type(exc).__name__})"
            ) from exc

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body, or ``UpstreamMalformed`` as soon as it proves larger than the cap."""
        cap = self._max_answer_bytes
        if (response.content_length or 0) > cap:
            raise UpstreamMalformed(f"{self._name}'s answer is larger than {cap} bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := await response.content.readany():
            size += len(chunk)
            if size > cap:
                raise UpstreamMalformed(f"{self._name}'s answer is larger than {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
