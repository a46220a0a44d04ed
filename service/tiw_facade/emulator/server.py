"""The emulator's HTTP server: its lifecycle and its Python API. TIW's ``POST /`` is ``gateway``'s;
the ``/_emulator/...`` admin endpoints are ``admin``'s; the callbacks it sends are ``callbacks``'s."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from aiohttp import web

from tiw_facade.emulator import sts
from tiw_facade.emulator.admin import Admin
from tiw_facade.emulator.callbacks import CallbackFault, CallbackSender, CallbackStats
from tiw_facade.emulator.config import EmulatorConfig
from tiw_facade.emulator.gateway import Gateway
from tiw_facade.emulator.task_states import TaskRecord
from tiw_facade.emulator.tasks import TaskStore
from tiw_facade.emulator.traffic import ActionStats, Fault, Faults

logger = logging.getLogger(__name__)


class Emulator:
    """An independent TIW (version 2019-09-19) over HTTP, for tests, demos and benchmarks.

    ``await start()`` returns the base URL; ``stop()`` closes it. Between the two, the Python
    methods below (faults, stats, tasks) and their admin endpoints act on the running server.
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self._clock = self.config.clock
        self.sts = sts.SecurityTokenService(self.config)
        self.tasks = TaskStore(self.config)
        # TIW's callbacks, sent while the server runs; `callbacks.routes` are the Set...Callback
        # actions' per SdkAppId, `callbacks.wake()` for a test that has just moved its clock.
        self.callbacks = CallbackSender(self.config, self.tasks)
        self._faults = Faults()
        self._gateway = Gateway(self.config, self.tasks, self._faults, self.sts, self.callbacks.routes)
        # Accepted TIW requests per SecretId that signed them: which key a client used, and when.
        self.signers = self._gateway.signers
        # Tasks the five actions cannot create, added now (by the emulator's clock) unless told when;
        # see TaskStore's methods.
        self.add_snapshot_task = self.tasks.add_snapshot
        self.add_push_task = self.tasks.add_push
        self.add_video_task = self.tasks.add_video
        self.reset()
        self.app = self._make_app()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle ---

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); return the base URL, e.g. http://127.0.0.1:PORT."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        # No access log: it would cost more than the emulated action on the benchmarks' hot path.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        await self.callbacks.start()
        bound_port = runner.addresses[0][1]
        self.url = f"http://[{host}]:{bound_port}" if ":" in host else f"http://{host}:{bound_port}"
        logger.debug("TIW emulator listening on %s", self.url)  # the CLI says where, and with which key
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await self.callbacks.stop()
            self._gateway.stopping.set()
            await runner.cleanup()
            self._gateway.stopping = asyncio.Event()

    async def serve_forever(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start, then serve until cancelled (what the CLI runs)."""
        await self.start(host, port)
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- the Python API of faults, stats and tasks ---

    def reset(self) -> None:
        """Forget tasks, counters and faults, the callbacks' too; seed the documented example tasks
        again. Their changes from now on are sent as callbacks, none before."""
        now = self._clock()
        self._gateway.reset()
        self._faults.clear()
        self.callbacks.reset(now)  # before the seed, which it must hear of
        self.tasks.reset(now)

    def add_fault(self, fault: Fault) -> None:
        self._faults.add(fault)

    def clear_faults(self, action: str | None = None) -> None:
        self._faults.clear(action)

    def faults(self) -> list[Fault]:
        return self._faults.active()

    def stats(self) -> dict[str, ActionStats]:
        return self._gateway.stats()

    def add_callback_fault(self, fault: CallbackFault) -> None:
        self.callbacks.faults.add(fault)

    def clear_callback_faults(self, event_type: str | None = None) -> None:
        self.callbacks.faults.clear(event_type)

    def callback_faults(self) -> list[CallbackFault]:
        return self.callbacks.faults.active()

    def callback_stats(self) -> CallbackStats:
        return self.callbacks.stats()

    def arrivals(self, action: str) -> list[float]:
        """Accepted arrival times of ``action`` (the latest ``config.arrival_history``)."""
        return self._gateway.arrivals(action)

    def task_records(self) -> list[TaskRecord]:
        """Every task's changes of state, by the emulator's clock (Unix seconds unless it was given
        another): fixed when the task was created, so those still to come are included."""
        return self.tasks.records()

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self._gateway.answer)
        Admin(self).add_routes(app.router)
        return app
