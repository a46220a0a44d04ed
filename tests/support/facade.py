"""A facade under test, as conftest's ``start_facade`` fixture starts it: the server, the emulator
it asks, and a gRPC channel and stub to it."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc
from tiw_facade.emulator import DEMO_REGION, DEMO_SECRET_ID, DEMO_SECRET_KEY, Emulator
from tiw_facade.server import FacadeServer


@dataclasses.dataclass
class Facade:
    server: FacadeServer
    emulator: Emulator
    channel: grpc.aio.Channel
    stub: tiw_pb2_grpc.TiwServiceStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"


# start_facade(endpoint=None, **extra_environment): another facade, stopped at the test's end.
StartFacade = Callable[..., Awaitable[Facade]]


def facade_environment(endpoint: str, **extra: str) -> dict[str, str]:
    """The environment of a facade asking the TIW at ``endpoint`` with the emulator's demo key, on
    ports the system chooses, listening on loopback only."""
    return {
        "TENCENTCLOUD_SECRET_ID": DEMO_SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": DEMO_SECRET_KEY,
        "TENCENTCLOUD_REGION": DEMO_REGION,
        "TIW_ENDPOINT": endpoint,
        "TIW_GRPC_PORT": "0",
        "TIW_HTTP_PORT": "0",
        "TIW_BIND_HOST": "127.0.0.1",
        **extra,
    }
