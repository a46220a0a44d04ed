"""One POST to TIW over pyreqwest (Rust reqwest/hyper): the candidate transport docs/http-client.md
evaluates against the aiohttp one the service uses (tiw_facade.transport). Pooled keep-alive, nothing
automatic.

No redirect is followed and nothing is decompressed, so the bytes returned are the bytes TIW sent;
the answer is read as a stream and dropped past ``max_answer_bytes``, so a huge body is never
buffered. Failures come out as :class:`TransportFailure` with a ``kind`` saying whether the request
can have reached the server.

Known limit (pyreqwest 0.15.1, measured in tests/test_transport_pyreqwest.py): cancelling the task
that awaits :meth:`PyreqwestTransport.post` does not abort the request. pyreqwest runs it as a task
of its own Tokio runtime and, on cancellation, drops that task's handle without aborting it, so the
request goes on (and may still be sent, if it was waiting to connect) until it completes or its own
``timeout`` runs out. The time-out passed here is therefore the bound on a cancelled request's life.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Literal

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import (
    DetailedPyreqwestError,
    PoolTimeoutError,
    PyreqwestError,
    RequestTimeoutError,
)
from pyreqwest.http import Url

FailureKind = Literal["not_sent", "timeout", "broken", "too_large"]

# pyreqwest's exception classes do not say whether the request left: a time-out waiting for the
# answer comes out as ConnectTimeoutError, and a server closing the connection after reading the
# request as ConnectError. What does say it is hyper-util's own error in the cause chain: its
# Display is "client error (<kind>)", and kind Connect means the connector failed (refused, DNS,
# connect time-out), before a byte of the request was written.
_CONNECT_FAILED = "client error (Connect)"
# Shorter header values are not worth scrubbing (and would mangle ordinary words in the detail).
_SCRUB_MIN_LENGTH = 8


class TransportFailure(Exception):
    """No complete answer. ``kind``: not_sent | timeout | broken | too_large; ``detail``: for logs,
    never containing a request header's value."""

    def __init__(self, kind: FailureKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind: FailureKind = kind
        self.detail = detail


class PyreqwestTransport:
    def __init__(
        self,
        url: str,
        *,
        max_answer_bytes: int,
        connect_timeout: float,
        keepalive_timeout: float,
        pool_limit: int,
    ) -> None:
        self._url = Url(url)  # parsed once, not on every request
        self._max_answer_bytes = max_answer_bytes
        self._connect_timeout = connect_timeout
        self._keepalive_timeout = keepalive_timeout
        self._pool_limit = pool_limit
        self._client: Client | None = None

    async def start(self) -> None:
        self._client = (
            ClientBuilder()
            .follow_redirects(False)
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
            # A connect time-out must end in the connector (cause "client error (Connect)") to be
            # told apart from a time-out after sending: keep it below the per-request time-outs.
            .connect_timeout(datetime.timedelta(seconds=self._connect_timeout))
            .pool_idle_timeout(datetime.timedelta(seconds=self._keepalive_timeout))
            .pool_max_idle_per_host(self._pool_limit)
            # Requests in flight beyond this wait for a slot (within their own time-out).
            .max_connections(self._pool_limit)
            .build()
        )

    async def aclose(self) -> None:
        """Close the pool; requests still in flight fail as "broken" (they may have been sent)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # ``timeout`` is handed to reqwest rather than enforced with asyncio.timeout: only reqwest's own
    # time-out also ends a request whose awaiting task was cancelled (see the module's docstring).
    async def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, bytes]:
        """One POST; returns (status, body) with no redirect followed and no decompression."""
        client = self._client
        if client is None:
            raise TransportFailure("not_sent", "the transport is not started or already closed")
        request = (
            client.post(self._url)
            .headers(headers)
            .body_bytes(body)
            # Total: from connecting to the last byte of the answer.
            .timeout(datetime.timedelta(seconds=timeout))
            .build_streamed()
        )
        try:
            async with request as response:
                declared = response.get_header("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self._max_answer_bytes:
                    raise TransportFailure("too_large", self._too_large(f"declared {declared} bytes"))
                chunks: list[bytes] = []
                size = 0
                while (chunk := await response.body_reader.read_chunk()) is not None:
                    size += len(chunk)
                    if size > self._max_answer_bytes:
                        # Leaving the ``async with`` drops the response and, with it, the connection.
                        raise TransportFailure(
                            "too_large", self._too_large(f"over {size - len(chunk)} bytes")
                        )
                    chunks.append(bytes(chunk))
                return response.status, b"".join(chunks)
        except PyreqwestError as exc:
            raise TransportFailure(_kind(exc), _scrub(_describe(exc), headers)) from None

    def _too_large(self, seen: str) -> str:
        return f"the answer exceeds {self._max_answer_bytes} bytes ({seen})"


def _causes(exc: PyreqwestError) -> list[str]:
    if not isinstance(exc, DetailedPyreqwestError):
        return []
    return [cause["message"] for cause in exc.details.get("causes") or []]


def _kind(exc: PyreqwestError) -> FailureKind:
    if _CONNECT_FAILED in _causes(exc) or isinstance(exc, PoolTimeoutError):
        return "not_sent"  # the connector failed, or no pool slot came free: nothing was written
    if isinstance(exc, RequestTimeoutError):
        return "timeout"  # includes a total time-out that fired while still connecting: maybe sent
    return "broken"  # the connection failed, or the client was closed under the request


def _describe(exc: PyreqwestError) -> str:
    return " / ".join([type(exc).__name__, exc.message, *_causes(exc)])


def _scrub(text: str, headers: Mapping[str, str]) -> str:
    """``text`` with every request header value removed. pyreqwest's messages name the URL, not the
    headers; this keeps it so if a later version starts quoting the request."""
    for value in headers.values():
        if len(value) >= _SCRUB_MIN_LENGTH:
            text = text.replace(value, "<redacted>")
    return text
