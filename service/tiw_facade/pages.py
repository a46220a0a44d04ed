"""The HTTP side of the facade: /metrics and /healthz, served from threads of their own.

Apart from the gRPC event loop on purpose: a scrape storm or a client that never reads costs the
gRPC side at most a share of the GIL, never its loop. The standard library's threaded HTTP server is
enough for two small pages; what it lacks (time-outs on every read and write, a cap on
connections, one shared render per scrape burst) is added here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.message
import gzip
import http.server
import logging
import math
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("tiw_facade.server")

# A page gets the request's headers and answers (status, headers, body).
Answer = tuple[int, dict[str, str], bytes]
Headers = email.message.Message  # what http.server parses; .get() as a mapping's
Page = Callable[[Headers], Answer]

HEALTH_TIMEOUT = 2.0  # seconds /healthz waits for the event loop before answering 503
# Renders of the exposition are at least this far apart (one costs ~10 ms of CPU, under the GIL
# the gRPC loop needs); a scrape still gets one begun after it arrived, never an older one.
MIN_RENDER_INTERVAL = 0.25


def on_loop(loop: asyncio.AbstractEventLoop, function: Callable[[], Any], timeout: float) -> Any:
    """``function()`` run on ``loop`` (from another thread), waiting at most ``timeout`` seconds."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(function())
        except Exception as exc:
            future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return future.result(timeout)


class Exposition:
    """The /metrics page: one render shared by every scrape waiting for it, gzipped once."""

    def __init__(self, registry: CollectorRegistry, min_interval: float = MIN_RENDER_INTERVAL) -> None:
        self._registry = registry
        self._min_interval = min_interval
        self._lock = threading.Lock()
        self._rendered_at = -math.inf
        self._plain = self._gzipped = b""

    def render(self) -> tuple[bytes, bytes]:
        """The exposition as plain text and gzipped, rendered no earlier than this call."""
        asked = time.monotonic()
        with self._lock:
            if self._rendered_at < asked:  # else a render begun after we asked finished meanwhile
                time.sleep(max(0.0, self._rendered_at + self._min_interval - time.monotonic()))
                self._rendered_at = time.monotonic()
                self._plain = generate_latest(self._registry)
                self._gzipped = gzip.compress(self._plain, compresslevel=6)
            return self._plain, self._gzipped

    def page(self, headers: Headers) -> Answer:
        plain, gzipped = self.render()
        # Prometheus asks for gzip; the exposition shrinks ~10x.
        offered = {part.split(";")[0].strip() for part in headers.get("Accept-Encoding", "").split(",")}
        fields = {"Content-Type": CONTENT_TYPE_LATEST, "Vary": "Accept-Encoding"}
        if "gzip" in offered:
            return 200, {**fields, "Content-Encoding": "gzip"}, gzipped
        return 200, fields, plain


def listen(bind_host: str, port: int) -> socket.socket:
    """A listening TCP socket, as the gRPC server listens for the same TIW_BIND_HOST."""
    host = bind_host.strip("[]")
    # [::] (or 0.0.0.0) means every interface of both families, as for the gRPC server.
    if host in ("", "::", "0.0.0.0"):
        if socket.has_dualstack_ipv6():
            return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("0.0.0.0", port))
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family)


class PageServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """HTTP/1.1 with keep-alive, a thread per connection, at most ``max_connections`` of them.

    Every read and write of a connection may wait ``timeout`` seconds: a client that never ends
    its headers, idles, or stops reading is closed then. Over the cap a connection is closed at
    once (a scraper retries next interval) rather than queued behind ones that may be hostile.
    """

    daemon_threads = True
    block_on_close = False  # close() ends connections itself; it does not wait for their timeouts

    def __init__(
        self, listener: socket.socket, pages: Mapping[str, Page], timeout: float, max_connections: int
    ) -> None:
        super().__init__(listener.getsockname()[:2], _PageHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.pages = pages
        self.io_timeout = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        self._open.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._open.discard(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A time-out or a reset: the connection's own trouble, already closed. No traceback on stderr.
        log.debug("HTTP connection from %s ended", client_address, exc_info=True)

    def close(self) -> None:
        """Stop accepting, close the listener, and end every open connection."""
        self.shutdown()
        self.server_close()
        for connection in list(self._open):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _PageHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus keeps its connection between scrapes
    server: PageServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.io_timeout)  # every read and write, headers included

    def do_GET(self) -> None:  # http.server's naming
        page = self.server.pages.get(urllib.parse.urlsplit(self.path).path)
        if page is None:
            self.send_error(404)
            return
        status, headers, body = page(self.headers)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        pass  # scrapes and probes are not worth a line each
