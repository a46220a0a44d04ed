"""A TCP proxy in the test's own event loop that can hold replies back or cut its client off: a Redis
that is slow or unreachable for one client, without touching Redis itself (which other clients keep
using at full speed)."""

from __future__ import annotations

import asyncio
import contextlib


class DelayProxy:
    """``async with DelayProxy(redis_port) as proxy: ... proxy.url ... proxy.delay = 0.3``.

    Each chunk the server sends waits ``delay`` (as it is when the chunk arrives) before it goes on
    to the client; requests pass at once. A client that gives up closes its connection, and the
    proxy closes the other side: nothing late reaches a fresh connection.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.port = 0
        self.cut_off = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        """Cut the client off: its connections drop and new ones are refused (it may reconnect
        after ``restore``), while Redis itself stays up for everyone else."""
        self.cut_off = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        self.cut_off = False
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            client_writer.close()
            return
        self._writers.add(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            self._writers.discard(client_writer)
            return
        self._writers.add(server_writer)
        await asyncio.gather(
            self._pipe(client_reader, server_writer, delayed=False),
            self._pipe(server_reader, client_writer, delayed=True),
        )
        self._writers.difference_update((client_writer, server_writer))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if delayed and self.delay > 0:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
