"""Assembly and lifecycle: the gRPC server (TiwService, TaskWatcher, EventStream, health,
reflection), the HTTP server (/metrics, /healthz), the intake of TIW's callbacks, and a graceful stop.

The one composition root: ``FacadeServer.start`` builds every store, client and background task
(metrics, limiter, TIW transport, credentials source, idempotency keys, TIW client, answers, event
log and callback intake, the handlers) from ``Settings``, each from the small config it takes
(``X.from_settings``), and hands each its collaborators. No component reads ``Settings`` itself, so
a test builds any of them alone.

The HTTP server (pages.py) runs in threads of its own, apart from the gRPC event loop.

SIGTERM → health NOT_SERVING → new RPCs refused, in-flight ones drain within the grace period →
callback intake, event log, HTTP server, answers, TIW client (once the calls it sees through end),
idempotency keys, credentials source, TIW transport and limiter closed, in that order → exit 0.

Every resource registers its close on an AsyncExitStack the moment it is open, so a start that
fails halfway closes what it opened, and one close that raises does not skip the others. The stack
closes in the reverse order of registration: whatever a component uses is registered before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import signal
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tiw_facade import __version__, background, credentials, identity, tls
from tiw_facade.answers import SHARED_ACTIONS, Answers, shared_store
from tiw_facade.answers import Config as AnswersConfig
from tiw_facade.authn import AuthnConfig, TokenVerifier
from tiw_facade.authz import Authorizer, AuthzConfig
from tiw_facade.callback_flow import CallbackFlow
from tiw_facade.callback_intake import CallbackIntake
from tiw_facade.callbacks import CallbackKeys
from tiw_facade.credentials import CredentialsConfig
from tiw_facade.event_watch import SERVICE as EVENTS
from tiw_facade.event_watch import event_stream_handler
from tiw_facade.events import EventLog
from tiw_facade.events._open import open_log
from tiw_facade.handler import SERVICE, build_handler, fetcher
from tiw_facade.idempotency import Keys, KeysConfig
from tiw_facade.interceptor import RpcObserver
from tiw_facade.limiter import Limiter, LimiterConfig, create_limiter
from tiw_facade.metrics import CallerSeries, Metrics
from tiw_facade.pages import HEALTH_TIMEOUT, Answer, Exposition, Headers, Page, PageServer, listen, on_loop
from tiw_facade.settings import Settings, variable
from tiw_facade.standard_services import REFLECTION_V1, HealthServicer, add_reflection
from tiw_facade.tencent_clock import TencentClock
from tiw_facade.transport import AiohttpTransport
from tiw_facade.upstream import ClientConfig, TiwClient
from tiw_facade.watcher import SERVICE as WATCHER
from tiw_facade.watcher import WatchSlots, build_watcher

log = logging.getLogger("tiw_facade.server")

SERVING = health_pb2.HealthCheckResponse.SERVING


class BindError(OSError):
    """A server cannot listen where its setting says; the message names the setting."""


# RPCs besides TiwService's that may be in flight at once: health probes, reflection.
OTHER_RPCS = 100


def max_calls_in_flight(settings: Settings) -> int:
    """RPCs the gRPC server holds at once; beyond it, grpc answers RESOURCE_EXHAUSTED itself.

    Sized so the limiter refuses first (with RetryInfo): every call it may queue per action, every
    call holding a slot while its upstream attempt lasts, every watch TIW_MAX_WATCHES allows (so
    the watcher refuses the one too many with its own status, naming the cap; the per-caller cap is
    within it and needs no room of its own), plus probes. Each unary call holds at most
    ``max_request_bytes`` of request, so that product bounds their memory (defaults: 6,100 calls x
    16 KiB, at most about 95 MiB); the watches' memory, request included, is their share of
    TIW_MEMORY_BUDGET (``budget.WATCH_COST`` each).
    """
    per_action = settings.max_queue_length + settings.rate_limit * math.ceil(settings.upstream_timeout)
    return len(SERVICE.methods) * per_action + settings.max_watches + OTHER_RPCS


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    in_flight = max_calls_in_flight(settings)
    return [
        # A larger request is refused by grpc before it is read (RESOURCE_EXHAUSTED, "Received
        # message larger than max"); the default 4 MiB let callers drive memory without bound.
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        # Without BDP probing, a stream's flow-control window stays at 64 KiB: grpc otherwise
        # widens it to megabytes and takes in an oversized message before it reads its length
        # (100 refused 4 MiB requests cost 35 to 230 MiB of RSS). TIW's calls are far too small
        # to gain from wider windows.
        ("grpc.http2.bdp_probe", 0),
        # Calls arrived but not yet taken by the event loop. grpc's defaults (1,000, then random
        # early drops up to 3,000) cancelled bursts the limiter would have queued or refused.
        ("grpc.server.max_pending_requests", in_flight),
        ("grpc.server.max_pending_requests_hard_limit", in_flight),
        # grpc sets SO_REUSEPORT by default: a second facade on the same port would silently share
        # it instead of failing the way a busy HTTP port does.
        ("grpc.so_reuseport", 0),
        # gRFC A9: connections are recycled so new replicas behind a Service get traffic.
        ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace * 1000)),
        # Go and Java clients commonly ping every 10 s or more; accept that, with or without calls,
        # instead of answering GOAWAY too_many_pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        # Our own pings find dead client connections.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def tiw_transport(settings: Settings) -> AiohttpTransport:
    """The HTTP transport to TIW (not started)."""
    return AiohttpTransport(
        settings.endpoint + "/",
        max_answer_bytes=settings.max_answer_bytes,
        connect_timeout=settings.connect_timeout,
        # The limiter already bounds calls in flight (a token per attempt); this only guards
        # against a misconfiguration opening unbounded sockets.
        pool_limit=max(100, settings.rate_limit * 10),
    )


class FacadeServer:
    """One facade: start() binds and serves (port 0 picks a free port), stop() drains and closes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(__version__)
        self.health = HealthServicer()
        self.grpc_port = 0
        self.http_port = 0
        self.callback_port: int | None = None  # the intake's bound port, when TIW_CALLBACK_PORT is set
        self._limiter: Limiter | None = None
        self.answers: Answers | None = None
        self._gate: tuple[TokenVerifier | None, Authorizer | None] = (None, None)
        self._resources: contextlib.AsyncExitStack | None = None
        self._drain_events: list[Callable[[], None]] = []
        self._grace = settings.shutdown_grace
        self._serving = False

    async def start(self) -> None:
        if self._resources is not None:
            raise RuntimeError("already started")
        settings, metrics = self.settings, self.metrics
        async with contextlib.AsyncExitStack() as resources:  # closes everything if start fails
            by_caller = CallerSeries(metrics, (name for name, _ in settings.caller_weights))
            limiter = self._limiter = create_limiter(
                LimiterConfig.from_settings(settings), metrics, observer=by_caller
            )
            resources.push_async_callback(limiter.aclose)
            metrics.prime(
                SERVICE.full_name, [m.name for m in SERVICE.methods], settings.rate_limit, limiter.backend
            )
            metrics.prime_answers(sorted(SHARED_ACTIONS))
            for method in WATCHER.methods:
                metrics.method("server_stream", WATCHER.full_name, method.name)
            for method in EVENTS.methods:
                metrics.method("server_stream", EVENTS.full_name, method.name)
            metrics.prime_callbacks(sorted(SHARED_ACTIONS))
            transport = tiw_transport(settings)
            resources.push_async_callback(transport.aclose)
            await transport.start()
            # Tencent's clock, learnt from TIW's answers: pod identity stamps its STS calls by it too.
            clock = TencentClock(metrics)
            source = credentials.chain(CredentialsConfig.from_settings(settings), metrics, clock=clock.now)
            resources.push_async_callback(source.aclose)
            await source.start()
            # Registered before the client, so closed after it: a create the client sees through
            # past the gRPC drain (its caller gone) still settles its idempotency key when TIW answers,
            # and the client's close waits for those calls.
            keys = Keys.from_config(KeysConfig.from_settings(settings), metrics)
            resources.push_async_callback(keys.aclose)
            client = TiwClient(
                ClientConfig.from_settings(settings),
                limiter,
                transport=transport,
                credentials=source,
                clock=clock,
                metrics=metrics,
            )
            resources.push_async_callback(client.aclose)
            # Closed before the client (the exit stack unwinds in reverse): its refreshes use it.
            answers_config = AnswersConfig.from_settings(settings)
            shared_answers = shared_store(settings, answers_config, self.metrics)
            if shared_answers is not None:  # closed after the answers' flights settle
                resources.push_async_callback(shared_answers.aclose)
            answers = self.answers = Answers(
                answers_config, fetcher(client), metrics=self.metrics, shared=shared_answers
            )
            resources.push_async_callback(answers.aclose)
            await answers.start()
            self._gate = await self._start_gate(resources)
            # HTTP before gRPC, so it closes after the drain: probes and scrapes see it through.
            await self._start_http(resources)
            events = await self._start_events(resources, answers)
            await self._start_grpc(resources, client, keys, answers, events)
            self._resources = resources.pop_all()

        for service in ("", SERVICE.full_name, WATCHER.full_name, EVENTS.full_name):
            await self.health.set(service, SERVING)
        self._serving = True
        log.info(
            "serving",
            extra={
                "grpc_port": self.grpc_port,
                "http_port": self.http_port,
                "endpoint": settings.endpoint,
                "region": settings.region,
                "limiter": limiter.backend,
                "rate_limit": settings.rate_limit,
                "reflection": settings.reflection,
                "tls": tls.TlsFiles.from_settings(settings).mode,
                "authentication": "on" if self._gate[0] else "off",
                "authorization": "on" if self._gate[1] else "off",
                "callback_port": self.callback_port,
                "version": __version__,
            },
        )

    async def _start_events(self, resources: contextlib.AsyncExitStack, answers: Answers) -> EventLog:
        """The event log (Redis's stream, or this process's ring), this replica's follower of it, and
        the intake of TIW's callbacks when TIW_CALLBACK_PORT is set. Closed before the answers (the
        hints they give run there) and after the gRPC drain (WatchEvents streams read the log)."""
        settings = self.settings
        log_ = open_log(settings, self.metrics)
        resources.push_async_callback(log_.aclose)
        flow = CallbackFlow(log_, answers)
        follower = asyncio.create_task(flow.run(), name="callbacks-follower")
        resources.push_async_callback(background.stop, [follower])
        if settings.callback_port is None:
            return log_
        keys = CallbackKeys.from_settings(settings, self.metrics)
        resources.push_async_callback(keys.aclose)
        await keys.start()  # an unusable key file fails the start, naming it
        intake = CallbackIntake(
            keys,
            flow.take,
            metrics=self.metrics,
            max_bytes=settings.callback_max_bytes,
            max_ahead=settings.callback_max_ahead,
        )
        resources.push_async_callback(intake.aclose)
        try:
            self.callback_port = await intake.start(settings.bind_host, settings.callback_port)
        except OSError as exc:
            raise BindError(
                f"{variable('callback_port')}: cannot listen on {settings.bind_host}:"
                f"{settings.callback_port} ({exc.strerror or exc})"
            ) from None
        return log_

    async def _start_grpc(
        self,
        resources: contextlib.AsyncExitStack,
        client: TiwClient,
        keys: Keys,
        answers: Answers,
        events: EventLog,
    ) -> None:
        settings = self.settings
        quiet = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1})
        secured = tls.server_credentials(tls.TlsFiles.from_settings(settings))  # None: plaintext
        callers = identity.CallerCheck(
            frozenset({SERVICE.full_name, WATCHER.full_name, EVENTS.full_name}),
            mutual=bool(settings.tls_client_ca_file),
            listed=(name for name, _ in settings.caller_weights),
            verifier=self._gate[0],
            authorizer=self._gate[1],
        )
        server = grpc.aio.server(
            # The observer first (outermost), so the calls CallerCheck refuses are counted and logged.
            interceptors=[RpcObserver(self.metrics, logging.getLogger("tiw_facade.rpc"), quiet), callers],
            options=grpc_options(settings),
            maximum_concurrent_rpcs=max_calls_in_flight(settings),
        )
        resources.push_async_callback(self._drain, server)
        server.add_generic_rpc_handlers((build_handler(client, keys, answers),))
        slots = WatchSlots(settings.max_watches, settings.max_watches_per_caller)
        server.add_generic_rpc_handlers((build_watcher(answers, self.metrics, slots=slots),))
        event_stream, drain_events = event_stream_handler(events, self.metrics, slots=slots)
        self._drain_events.append(drain_events)
        server.add_generic_rpc_handlers((event_stream,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if settings.reflection:
            add_reflection(
                server, (SERVICE.full_name, WATCHER.full_name, EVENTS.full_name, health.SERVICE_NAME)
            )
        address = f"{settings.bind_host}:{settings.grpc_port}"
        try:
            if secured is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, secured)
        except RuntimeError:  # grpc says no more than "Failed to bind"
            raise BindError(
                f"{variable('grpc_port')}: cannot listen on {address} (in use, or no such local address)"
            ) from None
        await server.start()

    async def _start_gate(
        self, resources: contextlib.AsyncExitStack
    ) -> tuple[TokenVerifier | None, Authorizer | None]:
        """Token authentication and the authorization policy, each when its settings turn it on."""
        verifier, authorizer = None, None
        if (authn := AuthnConfig.from_settings(self.settings)).enabled:
            verifier = TokenVerifier(authn, metrics=self.metrics)
            resources.push_async_callback(verifier.aclose)
            await verifier.start()
        if (authz := AuthzConfig.from_settings(self.settings)).enabled:
            methods = [
                f"/{service.full_name}/{m.name}"
                for service in (SERVICE, WATCHER, EVENTS)
                for m in service.methods
            ]
            authorizer = Authorizer(authz, self.metrics, methods=methods)
            resources.push_async_callback(authorizer.aclose)
            await authorizer.start()  # a malformed policy fails the start (PolicyError)
        return verifier, authorizer

    async def _drain(self, server: grpc.aio.Server) -> None:
        if self.answers is not None:
            self.answers.begin_drain()  # open watches end UNAVAILABLE now, not when the grace runs out
        for drain in self._drain_events:
            drain()
        await server.stop(self._grace)

    async def _start_http(self, resources: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        exposition = Exposition(self.metrics.registry)
        pages = {"/metrics": exposition.page, "/healthz": self._healthz_page(asyncio.get_running_loop())}
        try:
            listener = listen(settings.bind_host, settings.http_port)
        except OSError as exc:
            raise BindError(
                f"{variable('http_port')}: cannot listen on {settings.bind_host}:{settings.http_port}"
                f" ({exc.strerror or exc})"
            ) from None
        pages_server = PageServer(listener, pages, settings.http_timeout, settings.http_max_connections)
        self.http_port = listener.getsockname()[1]  # the bound port, when TIW_HTTP_PORT is 0
        serve = functools.partial(pages_server.serve_forever, poll_interval=0.1)  # close() waits one poll
        thread = threading.Thread(target=serve, name="tiw-facade-http", daemon=True)
        thread.start()
        resources.push_async_callback(asyncio.to_thread, pages_server.close)

    def _healthz_page(self, loop: asyncio.AbstractEventLoop) -> Page:
        """/healthz, answered from an HTTP thread: the limiter's state is read on the event loop."""

        def state() -> tuple[int, dict[str, object]]:
            limiter = self._limiter.health() if self._limiter is not None else {}
            status = "SERVING" if self._serving else "NOT_SERVING"
            return (200 if self._serving else 503), {"status": status, "limiter": limiter}

        def page(_: Headers) -> Answer:
            try:
                code, body = on_loop(loop, state, HEALTH_TIMEOUT)
            except (TimeoutError, RuntimeError):  # the loop is stuck, or gone (stopping)
                code, body = 503, {"status": "UNKNOWN", "detail": "the event loop did not answer"}
            return code, {"Content-Type": "application/json"}, json.dumps(body).encode()

        return page

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, then close everything.

        Safe to call twice, or after a failed start: what is already closed is not closed again.
        """
        resources, self._resources = self._resources, None
        self._serving = False
        if resources is None:
            return
        self._grace = self.settings.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"grace_seconds": self._grace})
        try:
            await resources.aclose()
        finally:
            log.info("stopped")


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then stop gracefully. Returns the exit code."""
    server = FacadeServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
        log.info("signal received: stopping")
    finally:
        await server.stop()
    return 0
