"""The built-in simulator of the mediarithmics Query Exports API.

Two ways to run it on a loopback port:

- ``async with Simulator(config) as sim:`` inside a running event loop (``run --simulate``,
  async tests);
- ``with SimulatorThread(config) as sim:`` on a thread of its own, for synchronous code and
  for tests that run the CLI in a subprocess.

Both expose ``url``, ``token``, ``state`` and ``stats``.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from aiohttp import web

from orchestrator.simulator.app import STATE, create_app
from orchestrator.simulator.config import (
    DEFAULT_TOKEN,
    ExportSpec,
    Faults,
    SimulatorConfig,
    demo_config,
)
from orchestrator.simulator.data import ResultFile
from orchestrator.simulator.state import SimExecution, SimState, SimStats


class Simulator:
    """The simulator served by the current event loop on ``host:port`` (0: a free port)."""

    def __init__(self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or demo_config()
        self.host = host
        self.port = port
        self.app = create_app(self.config)
        self._runner: web.AppRunner | None = None

    @property
    def state(self) -> SimState:
        """The simulated platform's data."""
        return self.app[STATE]

    @property
    def stats(self) -> SimStats:
        """The simulator's accounting."""
        return self.state.stats

    @property
    def token(self) -> str:
        """The token the simulator accepts."""
        return self.config.token

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop serving and close connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class SimulatorThread:
    """A :class:`Simulator` on its own thread and event loop."""

    def __init__(self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sim = Simulator(config, host, port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="simulator", daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the running simulator."""
        return self.sim.url

    @property
    def token(self) -> str:
        """The token the simulator accepts."""
        return self.sim.token

    @property
    def state(self) -> SimState:
        """The simulated platform's data (read it, do not mutate it from another thread)."""
        return self.sim.state

    @property
    def stats(self) -> SimStats:
        """The simulator's accounting."""
        return self.sim.stats

    def __enter__(self) -> SimulatorThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


__all__ = [
    "DEFAULT_TOKEN",
    "ExportSpec",
    "Faults",
    "ResultFile",
    "SimExecution",
    "SimState",
    "SimStats",
    "Simulator",
    "SimulatorConfig",
    "SimulatorThread",
    "demo_config",
]
