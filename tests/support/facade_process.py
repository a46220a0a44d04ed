"""A facade in a process of its own, so that its memory (VmRSS) is its own to measure."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.redis_server import free_port
from support.tiw import SERVICE


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def start_facade_process(environment: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``tiw-facade serve`` with ``environment`` (support.facade.facade_environment's) on a free gRPC port,
    logging to ``log``; the process and its gRPC target. The caller kills it."""
    port = free_port()
    # PYTHONPATH passes on, so that a run against another tree's package measures that package.
    inherited = {key: os.environ[key] for key in ("PATH", "PYTHONPATH") if key in os.environ}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "tiw_facade.cli", "serve"],
            env=inherited | environment | {"TIW_GRPC_PORT": str(port)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return process, f"127.0.0.1:{port}"


async def wait_serving(channel: grpc.aio.Channel, process: subprocess.Popen[bytes]) -> None:
    """Until the facade behind ``channel``, run by ``process``, reports SERVING; fails if it exits."""
    health = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + 20
    while True:
        assert process.poll() is None, "the facade exited"
        try:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        assert time.monotonic() < end, "the facade did not become SERVING"
        await asyncio.sleep(0.1)
