"""A TIW client as the tests build one: the emulator's demo key, a transport of its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from tiw_facade.credentials import Static
from tiw_facade.emulator import DEMO_REGION, DEMO_SECRET_ID, DEMO_SECRET_KEY
from tiw_facade.limiter import Limiter, LimiterConfig, create_limiter
from tiw_facade.metrics import Metrics
from tiw_facade.signing import Credentials
from tiw_facade.transport import AiohttpTransport
from tiw_facade.upstream import ClientConfig, TiwClient


@contextlib.asynccontextmanager
async def tiw_client(
    endpoint: str,
    limiter: Limiter | None = None,
    metrics: Metrics | None = None,
    *,
    session_token: str = "",
    max_attempts: int = 3,
) -> AsyncIterator[TiwClient]:
    """A client of the TIW at ``endpoint`` signing with the emulator's demo key, over a transport of
    its own; the client, the transport and ``limiter`` (default: the in-process one) closed at the end."""
    limiter = limiter or create_limiter(LimiterConfig(), metrics)
    key = Static(Credentials(DEMO_SECRET_ID, DEMO_SECRET_KEY, session_token), "the emulator's demo key")
    async with contextlib.AsyncExitStack() as resources:
        resources.push_async_callback(limiter.aclose)
        transport = AiohttpTransport(endpoint + "/")
        resources.push_async_callback(transport.aclose)
        await transport.start()
        config = ClientConfig(endpoint, DEMO_REGION, max_attempts=max_attempts)
        client = TiwClient(config, limiter, transport=transport, credentials=key, metrics=metrics)
        resources.push_async_callback(client.aclose)
        yield client
