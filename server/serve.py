"""Run the app under uvicorn: the port is bound at once and the models load behind it (/health answers 503
``loading``, then 200), with a drain that ends what it cannot finish and an exit that says why. Log lines
carry time and level (``server.logs``).

- SIGTERM/SIGINT: the server stops listening, refuses new requests on open connections (503), and lets
  in-flight requests and streams run for ``drain_timeout`` seconds; then every one still open ends with a
  503 (a stream: its ``data: {"error": ...}`` event and ``data: [DONE]``, never a body cut mid-way), and
  the process exits 0.
- The engine died (``server.supervision``): the requests in flight have failed (500); the server drains the
  same way and exits with status ``EXIT_ENGINE_DEAD`` (1) so that its supervisor restarts it.
- The engine failed to load (or the port is taken): exit status 3, as ``uvicorn.run``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from server.app import create_app
from server.chat_run import SHUTDOWN
from server.http_limits import bounded_protocol
from server.logs import log_config
from server.settings import Settings
from server.supervision import EXIT_ENGINE_DEAD

log = logging.getLogger("vlm_steer.server")

# uvicorn cancels the tasks still running this long after our own drain deadline: only a request stuck
# outside its event queue (an image still decoding, the judge still scoring) can reach it.
BACKSTOP = 5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_timeout: float):
        super().__init__(config)
        self.vlm_state = state
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig, frame) -> None:
        self.vlm_state.draining = True
        super().handle_exit(sig, frame)
        # A drained shutdown is a clean one: exit 0 rather than re-raising the signal afterwards.
        captured = getattr(self, "_captured_signals", None)
        if captured is not None:
            captured[:] = [s for s in captured if s != signal.SIGTERM]

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main-loop tick (every 0.1 s): also exit when the engine died (drain, then exit 1) or
        loading failed (exit 3)."""
        if self.vlm_state.engine_failure is not None or self.vlm_state.load_error is not None:
            return True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's shutdown (stop listening, wait for the open connections), with our deadline first: at
        ``drain_timeout`` every request still open answers its 503 and ends, so no task is left to cancel."""
        self.vlm_state.draining = True
        deadline = asyncio.get_running_loop().call_later(self.drain_timeout, self._end_open_requests)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _end_open_requests(self) -> None:
        runs = self.vlm_state.runs
        if len(runs):
            log.warning("drain timeout (%s s): ending %d request(s) still open with a 503", self.drain_timeout, len(runs))
        runs.end(SHUTDOWN)


def uvicorn_config(app, settings: Settings, **kwargs) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: the settings' address, log level and drain, and the head's
    deadline and limits (``server.http_limits``); ``kwargs`` override (``serve``: the log format, which tests'
    in-process servers leave to pytest's log capture)."""
    kw = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
              timeout_graceful_shutdown=int(settings.drain_timeout),
              http=bounded_protocol(settings.max_header_bytes, settings.max_headers, settings.header_timeout))
    return uvicorn.Config(app, **{**kw, **kwargs})


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (exit 0), the engine's death (exit ``EXIT_ENGINE_DEAD``) or a failed
    load (exit 3); the port is bound before the models load."""
    app = create_app(settings)
    state = app.state.vlm
    config = uvicorn_config(app, settings, log_config=log_config(settings.log_level),
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout) + BACKSTOP)
    server = DrainingServer(config, state, settings.drain_timeout)
    server.run()
    if not server.started or state.load_error is not None:  # the port or the load failed: uvicorn.run's status
        sys.exit(STARTUP_FAILURE)
    if state.engine_failure is not None:
        log.error("exiting with status %d: %s (a supervisor restarts the server)", EXIT_ENGINE_DEAD, state.engine_failure)
        sys.exit(EXIT_ENGINE_DEAD)
