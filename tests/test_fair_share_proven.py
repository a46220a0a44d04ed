"""Fair share kept under what is proven: names a caller merely claims cost nothing to invent, so
unlisted ones share one queue; a listed name, or a client certificate, gets a share of its own.

Real gRPC channels to a facade on the emulator over HTTP, as in test_fair_share_e2e.py.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Sequence

import grpc
import pytest
from cryptography import x509
from prometheus_client import generate_latest
from support.certificates import Files, Issued, authority
from support.facade import Facade, StartFacade
from support.tiw import SDK_APP_ID
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc

pytestmark = pytest.mark.slow

# Stops of push tasks of their own: every one takes a token (no answer is shared or cached), and a
# stop whose caller leaves is dropped. A Describe's request to TIW and a create are seen through past
# their callers, so the flood's last calls would hold the facade's shutdown for seconds.
ACTION = "StopWhiteboardPush"
RATE = 4  # small, so that a few hundred calls queued are a long wait
# The flood's calls are let wait as long as it takes, so that each flooder keeps one call queued
# (as a flood does) without the churn of refusals, which would measure a loaded event loop instead.
PATIENT = {"TIW_RATE_LIMIT": str(RATE), "TIW_MAX_QUEUE_WAIT": "60"}
VICTIM_CALLS = 5
# The victim's deadline. Behind one turn of the flood it waits under a window; behind a turn of each
# of 200 invented names it would wait 200 / RATE = 50 s, and is refused at once.
VICTIM_TIMEOUT = 3.0
# Its longest wait allowed. The flood takes the tokens as they come back, so they come back together,
# once a window: the victim waits for the next batch (0.5 s measured), then gets one of its first two.
# The rest is room for a machine other test runs keep busy.
MOST_WAIT = 1.5


def stop_request(facade: Facade) -> pb.StopWhiteboardPushRequest:
    return pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=facade.emulator.add_push_task())


async def flood(
    stub: tiw_pb2_grpc.TiwServiceStub,
    facade: Facade,
    metadata: Sequence[tuple[str, str]],
    outcomes: list[grpc.StatusCode],
) -> None:
    """One call in flight at all times, until cancelled."""
    while True:
        try:
            await stub.StopWhiteboardPush(stop_request(facade), timeout=60, metadata=metadata)
            outcomes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            outcomes.append(error.code())
            await asyncio.sleep(0.5)


async def victim(
    stub: tiw_pb2_grpc.TiwServiceStub, facade: Facade, metadata: Sequence[tuple[str, str]]
) -> tuple[list[float], list[grpc.StatusCode]]:
    """A call every half second and its wait, once the flood has queued: each wait, every refusal."""
    waits, refusals = [], []
    await asyncio.sleep(1.0)
    for _ in range(VICTIM_CALLS):
        started = time.monotonic()
        try:
            await stub.StopWhiteboardPush(stop_request(facade), timeout=VICTIM_TIMEOUT, metadata=metadata)
            waits.append(time.monotonic() - started)
        except grpc.aio.AioRpcError as error:
            refusals.append(error.code())
        await asyncio.sleep(0.5)
    return waits, refusals


async def stop(flooders: list[asyncio.Task[None]]) -> None:
    for task in flooders:
        task.cancel()
    await asyncio.gather(*flooders, return_exceptions=True)


def sample(facade: Facade, name: str, **labels: str) -> float:
    return facade.server.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_invented_names_share_one_queue_beside_a_listed_victim(start_facade: StartFacade) -> None:
    facade = await start_facade(**PATIENT, TIW_CALLER_WEIGHTS="billing=1")
    stub = facade.stub
    outcomes: list[grpc.StatusCode] = []
    # As in the flood reported: one call in flight under each of 200 made-up names (50 s of quota).
    flooders = [
        asyncio.create_task(flood(stub, facade, [("tiw-caller", f"invented-{n}")], outcomes))
        for n in range(200)
    ]
    try:
        waits, refusals = await victim(stub, facade, [("tiw-caller", "billing")])
    finally:
        await stop(flooders)

    assert refusals == []
    assert len(waits) == VICTIM_CALLS and max(waits) < MOST_WAIT, waits
    assert grpc.StatusCode.OK in outcomes  # the flood got the rest of the quota
    assert (
        sample(facade, "tiw_limiter_caller_admitted_total", action=ACTION, caller="billing") == VICTIM_CALLS
    )
    assert sample(facade, "tiw_limiter_caller_rejected_total", action=ACTION, caller="billing") == 0
    # Every invented name is one caller to the limiter, and so to the metrics: 200 names, no series.
    exposition = generate_latest(facade.server.metrics.registry).decode()
    assert 'caller="unidentified"' in exposition
    assert "invented-" not in exposition


@pytest.fixture
def files(tmp_path: pathlib.Path) -> Files:
    return Files(authority(), tmp_path)


def client(
    facade: Facade, files: Files, issued: Issued
) -> tuple[grpc.aio.Channel, tiw_pb2_grpc.TiwServiceStub]:
    credentials = grpc.ssl_channel_credentials(files.ca.cert, issued.key, issued.cert)
    channel = grpc.aio.secure_channel(f"127.0.0.1:{facade.server.grpc_port}", credentials)
    return channel, tiw_pb2_grpc.TiwServiceStub(channel)


async def test_two_certificate_identities_get_separate_shares(
    start_facade: StartFacade, files: Files
) -> None:
    # Neither identity is listed in TIW_CALLER_WEIGHTS: a certificate is proof enough for a share.
    facade = await start_facade(**PATIENT, **files.env(mutual=True))
    flooding, flood_stub = client(facade, files, files.ca.issue("flooder", [x509.DNSName("flood.svc")]))
    light, light_stub = client(facade, files, files.ca.issue("light", [x509.DNSName("light.svc")]))
    outcomes: list[grpc.StatusCode] = []
    # 20 calls in flight under one proven name: 5 s of quota, longer than the light caller waits.
    flooders = [asyncio.create_task(flood(flood_stub, facade, (), outcomes)) for _ in range(20)]
    try:
        waits, refusals = await victim(light_stub, facade, ())
    finally:
        await stop(flooders)
        await flooding.close()
        await light.close()

    assert refusals == []
    assert len(waits) == VICTIM_CALLS and max(waits) < MOST_WAIT, waits
    assert grpc.StatusCode.OK in outcomes
    # Proven but not listed: a share of its own, counted as `other` (certificates a CA may issue are
    # not a bounded set of labels); nothing fell into the share of the unproven.
    assert sample(facade, "tiw_limiter_caller_admitted_total", action=ACTION, caller="other") > VICTIM_CALLS
    assert sample(facade, "tiw_limiter_caller_admitted_total", action=ACTION, caller="unidentified") == 0
