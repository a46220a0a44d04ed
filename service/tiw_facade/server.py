"""Assembly and lifecycle: the gRPC server (TiwService, health, reflection), the HTTP server
(/metrics, /healthz), and a graceful stop.

SIGTERM → health NOT_SERVING → new RPCs refused, in-flight ones drain within the grace period →
upstream sessions, limiter and HTTP server closed → exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tiw_facade import __version__
from tiw_facade.emulator import Emulator, EmulatorConfig
from tiw_facade.handler import SERVICE, build_handler
from tiw_facade.limiter import Limiter, create_limiter
from tiw_facade.metrics import Metrics, RpcObserver
from tiw_facade.settings import Settings
from tiw_facade.upstream import TiwClient

log = logging.getLogger("tiw_facade.server")

SERVING = health_pb2.HealthCheckResponse.SERVING


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
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


class FacadeServer:
    """One facade: start() binds and serves (port 0 picks a free port), stop() drains."""

    def __init__(self, settings: Settings, *, with_emulator: bool = False) -> None:
        self.settings = settings
        self._with_emulator = with_emulator
        self.metrics = Metrics(__version__)
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.http_port = 0
        self.emulator: Emulator | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._limiter: Limiter | None = None
        self._client: TiwClient | None = None
        self._serving = False

    async def start(self) -> None:
        settings = self.settings
        if self._with_emulator:
            self.emulator = Emulator(EmulatorConfig())
            url = await self.emulator.start("127.0.0.1", 0)
            settings = self.settings = dataclasses.replace(settings, endpoint=url)
            log.info("embedded TIW emulator started", extra={"endpoint": url})

        self._limiter = create_limiter(settings, self.metrics)
        self.metrics.prime(
            SERVICE.full_name, [m.name for m in SERVICE.methods], settings.rate_limit, self._limiter.backend
        )
        self._client = TiwClient(settings, self._limiter, self.metrics)
        await self._client.start()

        quiet = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})
        server = self._grpc = grpc.aio.server(
            interceptors=[RpcObserver(self.metrics, logging.getLogger("tiw_facade.rpc"), quiet)],
            options=grpc_options(settings),
        )
        server.add_generic_rpc_handlers((build_handler(self._client, settings.upstream_host),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        self.grpc_port = server.add_insecure_port(f"{settings.bind_host}:{settings.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot listen on {settings.bind_host}:{settings.grpc_port} (TIW_GRPC_PORT)")
        await server.start()
        await self._start_http(settings)

        for service in ("", SERVICE.full_name):
            await self.health.set(service, SERVING)
        self._serving = True
        log.info(
            "serving",
            extra={
                "grpc_port": self.grpc_port,
                "http_port": self.http_port,
                "endpoint": settings.endpoint,
                "region": settings.region,
                "limiter": self._limiter.backend,
                "rate_limit": settings.rate_limit,
                "reflection": settings.reflection,
                "version": __version__,
            },
        )

    async def _start_http(self, settings: Settings) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/healthz", self._healthz)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        host = settings.bind_host.strip("[]")
        # "::" alone would make asyncio set IPV6_V6ONLY and refuse IPv4 scrapes; None listens on
        # every interface of both families, as the gRPC server does for [::].
        every_interface = host in ("", "::", "0.0.0.0")
        site = web.TCPSite(self._http, host=None if every_interface else host, port=settings.http_port)
        await site.start()
        self.http_port = self._http.addresses[0][1]  # the bound port, when TIW_HTTP_PORT is 0

    async def _metrics_page(self, _: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        limiter = self._limiter.health() if self._limiter is not None else {}
        status = "SERVING" if self._serving else "NOT_SERVING"
        return web.json_response({"status": status, "limiter": limiter}, status=200 if self._serving else 503)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, then close everything."""
        self._serving = False
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            log.info(
                "draining",
                extra={"grace_seconds": grace if grace is not None else self.settings.shutdown_grace},
            )
            await self._grpc.stop(grace if grace is not None else self.settings.shutdown_grace)
        if self._client is not None:
            await self._client.aclose()
        if self._limiter is not None:
            await self._limiter.aclose()
        if self._http is not None:
            await self._http.cleanup()
        if self.emulator is not None:
            await self.emulator.stop()
        log.info("stopped")


async def serve(settings: Settings, *, with_emulator: bool = False) -> int:
    """Run until SIGTERM or SIGINT, then stop gracefully. Returns the exit code."""
    server = FacadeServer(settings, with_emulator=with_emulator)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    await stop.wait()
    log.info("signal received: stopping")
    await server.stop()
    return 0
