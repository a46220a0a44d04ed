"""A facade in a process of its own, so that its memory (VmRSS) is its own to measure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.redis_server import free_port


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def start_facade_process(environment: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``tiw-facade serve`` with ``environment`` (conftest.facade_environment's) on a free gRPC port,
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
