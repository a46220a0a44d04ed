"""A hostile TIW: a TCP server that reads each HTTP request and answers it by a scripted behaviour.

What the emulator cannot do, because it is a well-behaved HTTP server: answer bytes that are not
HTTP, cut a body short, reset the connection, redirect, stream an endless body, send a gzip bomb.
Every request is recorded (head and body), so a test can see what the facade sent (its signature,
its session token) and how many times.

``async with RawUpstream(behaviour) as upstream: ... upstream.url ... upstream.requests``; the
behaviour may be swapped between calls (``upstream.behaviour = ...``); ``serve`` may also be
handed to ``asyncio.start_server`` directly. One request per connection:
a well-formed answer says ``Connection: close``, so the facade never reuses a connection the
server is about to drop (which would make a different failure than the one scripted).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Request:
    head: bytes
    body: bytes

    @property
    def headers(self) -> dict[str, str]:
        """Header names lower-cased."""
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        pairs = (line.split(":", 1) for line in lines if ":" in line)
        return {name.strip().lower(): value.strip() for name, value in pairs}

    @property
    def action(self) -> str:
        return self.headers.get("x-tc-action", "")


Behaviour = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    def __init__(self, behaviour: Behaviour | bytes) -> None:
        """``behaviour``: how to answer each request; bytes: answer them, as they are."""
        self.behaviour = answer(behaviour) if isinstance(behaviour, bytes) else behaviour
        self.requests: list[Request] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(Request(head, b"").headers.get("content-length", "0"))
            request = Request(head, await reader.readexactly(length))
            self.requests.append(request)
            await self.behaviour(request, writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the facade gave up on us: that is what many behaviours are about
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


# --- answers ---------------------------------------------------------------------------------------


def http(
    body: bytes = b"", status: int = 200, headers: Mapping[str, str] | None = None, *, length: bool = True
) -> bytes:
    """One raw HTTP/1.1 answer that closes the connection."""
    lines = [f"HTTP/1.1 {status} X", "Connection: close"]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def envelope(response: Mapping[str, Any]) -> bytes:
    return json.dumps({"Response": response}).encode()


def answer(raw: bytes) -> Behaviour:
    """Write ``raw`` as it is, then close."""

    async def behave(_: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)

    return behave


def ok(response: Mapping[str, Any]) -> Behaviour:
    return answer(http(envelope(response)))


def reset(after: bytes = b"") -> Behaviour:
    """Write ``after`` (e.g. a head and part of a body), then reset the connection (RST, not FIN)."""

    async def behave(_: Request, writer: asyncio.StreamWriter) -> None:
        if after:
            writer.write(after)
            await writer.drain()
            await asyncio.sleep(0.05)  # let the facade read what was sent before the reset
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    return behave


def redirect(location: str, status: int = 302) -> Behaviour:
    return answer(http(b"", status=status, headers={"Location": location}))


def stream(total: int, chunk: int = 1 << 16) -> Behaviour:
    """A 200 with a chunked body of ``total`` bytes, written as the facade reads it (never held whole)."""

    async def behave(_: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n" % chunk + b" " * chunk + b"\r\n"
        for _written in range(total // chunk):
            writer.write(piece)
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    return behave


def stall(seconds: float) -> Behaviour:
    async def behave(_: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(seconds)

    return behave


@functools.cache
def gzip_bomb(expanded: int = 500 << 20) -> bytes:
    """A gzip body (one member) of about a thousandth of ``expanded`` bytes of spaces, made in
    milliseconds: after a full flush the compressor starts afresh, so every further megabyte of
    spaces compresses to the same bytes, and only the trailer (CRC-32, size) needs the whole."""
    block = b" " * (1 << 20)
    count = max(1, expanded // len(block))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: gzip framing
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    last_block = compressor.flush()[:-8]  # without the trailer, which is for 2 blocks only
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(block, crc)
    return (
        first + again * (count - 1) + last_block + struct.pack("<II", crc, (count * len(block)) & 0xFFFFFFFF)
    )
