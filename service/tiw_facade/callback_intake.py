"""The intake of TIW's callbacks: ``POST /callbacks/push``, ``/callbacks/snapshot``, ``/callbacks/video``
on a port of their own (TIW_CALLBACK_PORT), the one port meant for the internet.

An aiohttp server on the facade's own asyncio loop, not a thread or a process of its own: what it
does with a verified callback, the event log's append (and the hints that follow), is async on this
loop; aiohttp is already a dependency (the transport, the emulator); and nothing else is served on
this port, so its low-level ``web.Server`` is enough: one handler sees every request, with no
router, middleware or default page of aiohttp's in front of it to answer (and go uncounted) first.

Answers, each counted in ``tiw_callbacks_total{kind, result}`` (``kind`` ``other`` for any other
path) and each a small JSON object, never a stack trace:

- 200 ``{"code":0}``: taken (accepted) or already taken (replayed: TIW's retry or a replay of a
  signed body; acknowledged and ignored). TIW retries anything else.
- 400 bad_json, bad_fields; 404 not_found; 405 bad_method (with ``Allow: POST``); 413 too_large.
- 403 bad_sign, unknown_app, expired, too_far_ahead: the credential is the body's Sign, not an HTTP
  authentication scheme, so 401 and the WWW-Authenticate challenge it requires would mean nothing.
- 503 unavailable: the event log failed, or took longer than ``take_timeout``; TIW retries.
- 500 for anything unexpected, logged with its traceback (and counted as unavailable: not taken).

A body is never read past ``max_bytes``: a Content-Length above it is refused before any of the body
is read, and a body without one (chunked) is read at most one byte past the cap. What the client
still sends after a refusal is discarded for ``LINGER`` seconds (aiohttp's lingering close, so that
the client, still writing, gets the answer instead of a reset), never kept.

Refusals are logged without the body, a key or the Sign, and at most one line per reason every
``log_every`` seconds, which tells how many were left out: a flood of forged callbacks is one line
per reason (and the counter) rather than a line each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from tiw_facade import events
from tiw_facade.callbacks import CallbackKeys, Refusal, Refused, verify
from tiw_facade.metrics import Metrics
from tiw_facade.pages import listen

log = logging.getLogger("tiw_facade.callback_intake")

PATHS: Final = {f"/callbacks/{kind}": kind for kind in events.KINDS}
OTHER_KIND: Final = "other"  # tiw_callbacks_total's kind for any other path

# How long the event log may take to take one event before TIW is told to retry (503).
TAKE_TIMEOUT: Final = 5.0
# How long a body may take to arrive whole: a client trickling its body holds a connection no longer.
BODY_TIMEOUT: Final = 10.0
# At most one log line per reason of refusal this often.
LOG_EVERY: Final = 10.0
# How long what a client sends after its refusal is read and discarded before the connection closes.
LINGER: Final = 1.0

STATUS: Final[dict[Refusal, int]] = {
    Refusal.BAD_JSON: 400,
    Refusal.BAD_FIELDS: 400,
    Refusal.BAD_SIGN: 403,
    Refusal.UNKNOWN_APP: 403,
    Refusal.EXPIRED: 403,
    Refusal.TOO_FAR_AHEAD: 403,
    Refusal.NOT_FOUND: 404,
    Refusal.BAD_METHOD: 405,
    Refusal.TOO_LARGE: 413,
    Refusal.UNAVAILABLE: 503,
}
# What scanners of any internet-facing port cause: logged at INFO, the rest at WARNING.
QUIET: Final = frozenset({Refusal.NOT_FOUND, Refusal.BAD_METHOD})

# Every answer says who answers, not aiohttp's and Python's versions (aiohttp's default).
HEADERS: Final = {"Server": "tiw-facade"}

Take = Callable[[events.Event], Awaitable["events.Event | None"]]


def _answer(status: int, fields: dict[str, object], **headers: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(fields, separators=(",", ":")).encode(),
        content_type="application/json",
        headers={**HEADERS, **headers},
    )


class CallbackIntake:
    """TIW's callbacks over HTTP, verified with ``keys``, each event handed to ``take`` (the event
    log's append: the event with its cursor, None if already taken; raises EventLogUnavailable).

    ``clock``: wall-clock seconds, for ExpireTime, the events' ``received_at`` and the spacing of
    log lines. ``max_bytes``, ``max_ahead``: TIW_CALLBACK_MAX_BYTES, TIW_CALLBACK_MAX_AHEAD.
    """

    def __init__(
        self,
        keys: CallbackKeys,
        take: Take,
        *,
        metrics: Metrics,
        max_bytes: int,
        max_ahead: float,
        clock: Callable[[], float] = time.time,
        take_timeout: float = TAKE_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        log_every: float = LOG_EVERY,
    ) -> None:
        self._keys = keys
        self._take = take
        self._metrics = metrics
        self._max_bytes = max_bytes
        self._max_ahead = max_ahead
        self._clock = clock
        self._take_timeout = take_timeout
        self._body_timeout = body_timeout
        self._log_every = log_every
        # Per reason: when its last line was written, and how many refusals went unlogged since.
        self._logged: dict[Refusal, tuple[float, int]] = {}
        self._runner: web.ServerRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port; ``[::]`` every interface of both families, as
        the other servers listen for TIW_BIND_HOST); the port bound."""
        if self._runner is not None:
            raise RuntimeError("the callback intake is already running")
        # The socket made as the HTTP pages' is: asyncio would bind "::" to IPv6 alone.
        listener = listen(host, port)
        # No access log: every answer is counted, and refusals are logged (rate-limited) below.
        server = web.Server(self._handle, access_log=None, lingering_time=LINGER)
        # A stop waits for answers in progress as long as one may take (the event log's time-out).
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=self._take_timeout)
        await runner.setup()
        try:
            await web.SockSite(runner, listener).start()
        except BaseException:
            listener.close()
            await runner.cleanup()
            raise
        self._runner = runner
        bound: int = listener.getsockname()[1]
        log.info("callback intake listening", extra={"host": host, "port": bound})
        return bound

    async def aclose(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        kind = PATHS.get(request.path, OTHER_KIND)
        try:
            taken = await self._intake(request, kind)
        except Refused as refused:
            self._count(kind, refused.reason)
            self._log_refusal(request, kind, refused)
            allow = {"Allow": "POST"} if refused.reason is Refusal.BAD_METHOD else {}
            return _answer(
                STATUS[refused.reason], {"code": STATUS[refused.reason], "reason": refused.reason}, **allow
            )
        except Exception:
            self._count(kind, Refusal.UNAVAILABLE)
            log.error(
                "callback failed unexpectedly: not taken, TIW will retry",
                extra={"kind": kind, "remote": request.remote},
                exc_info=True,
            )
            return _answer(500, {"code": 500})
        if taken is None:
            self._count(kind, "replayed")
        else:
            self._count(kind, "accepted")
            self._metrics.callback_last_accepted.labels(kind=kind).set(self._clock())
        return _answer(200, {"code": 0})

    async def _intake(self, request: web.BaseRequest, kind: str) -> events.Event | None:
        """The event taken, or None if it was already; else ``Refused``."""
        if kind == OTHER_KIND:
            raise Refused(Refusal.NOT_FOUND, "not a callback path")
        if request.method != "POST":
            raise Refused(Refusal.BAD_METHOD, f"{request.method[:16]} instead of POST")
        body = await self._read(request)
        now = self._clock()
        event = verify(body, kind, self._keys, now=now, max_ahead=self._max_ahead, received_at=now)
        try:
            async with asyncio.timeout(self._take_timeout):
                return await self._take(event)
        except events.EventLogUnavailable:
            raise Refused(Refusal.UNAVAILABLE, "the event log failed", sdk_app_id=event.sdk_app_id) from None
        except TimeoutError:
            raise Refused(
                Refusal.UNAVAILABLE,
                f"the event log did not take it within {self._take_timeout:g} s",
                sdk_app_id=event.sdk_app_id,
            ) from None

    async def _read(self, request: web.BaseRequest) -> bytes:
        """The body, of at most ``max_bytes``: never read further (``request.read()`` would read a
        whole chunk past its ``client_max_size`` before refusing)."""
        declared = request.content_length
        if declared is not None and declared > self._max_bytes:
            raise Refused(
                Refusal.TOO_LARGE, f"Content-Length {declared} is more than {self._max_bytes} bytes"
            )
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._body_timeout):
                while chunk := await request.content.read(self._max_bytes + 1 - size):
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise Refused(Refusal.TOO_LARGE, f"a body of more than {self._max_bytes} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise Refused(
                Refusal.BAD_JSON, f"the body did not arrive whole within {self._body_timeout:g} s"
            ) from None
        except (ConnectionError, HttpProcessingError):  # the client went away, or a malformed chunk
            raise Refused(Refusal.BAD_JSON, "the body did not arrive whole") from None
        return b"".join(chunks)

    def _count(self, kind: str, result: str) -> None:
        self._metrics.callbacks.labels(kind=kind, result=result).inc()

    def _log_refusal(self, request: web.BaseRequest, kind: str, refused: Refused) -> None:
        """One line per reason every ``log_every`` seconds, with how many were left out before it."""
        now = self._clock()
        last, left_out = self._logged.get(refused.reason, (None, 0))
        # A clock stepped back (before ``last``) lets the next line through rather than silencing them.
        if last is not None and last <= now < last + self._log_every:
            self._logged[refused.reason] = (last, left_out + 1)
            return
        self._logged[refused.reason] = (now, 0)
        log.log(
            logging.INFO if refused.reason in QUIET else logging.WARNING,
            "callback refused (%s)",
            refused.reason.value,
            extra={
                "reason": refused.reason.value,
                "kind": kind,
                "sdk_app_id": refused.sdk_app_id,
                "remote": request.remote,
                "detail": refused.detail,
                "left_out": left_out,  # refusals of this reason since its last line, not logged
            },
        )
