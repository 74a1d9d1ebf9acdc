"""Run the app under uvicorn: the port is bound at once and the models load behind it (/health answers 503
``loading``, then 200); a graceful drain: on SIGTERM/SIGINT /health turns 503, new requests are refused,
in-flight requests finish (up to ``drain_timeout``), then the process exits 0. Log lines carry time and
level (``server.logs``)."""

from __future__ import annotations

import signal

import uvicorn

from server.app import create_app
from server.http_limits import bounded_protocol
from server.logs import log_config
from server.settings import Settings


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.vlm_state = state

    def handle_exit(self, sig, frame) -> None:
        self.vlm_state.draining = True
        super().handle_exit(sig, frame)
        # A drained shutdown is a clean one: exit 0 rather than re-raising the signal afterwards.
        captured = getattr(self, "_captured_signals", None)
        if captured is not None:
            captured[:] = [s for s in captured if s != signal.SIGTERM]


    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main-loop tick (every 0.1 s): also exit once loading has failed (``serve`` exits 1)."""
        if self.vlm_state.load_error is not None:
            self.should_exit = True
        return await super().on_tick(counter)


def uvicorn_config(app, settings: Settings, **kwargs) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: the settings' address, log level, log format and drain, and the
    head's deadline and limits (``server.http_limits``); ``kwargs`` override (tests: ``log_level``)."""
    kw = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
              log_config=log_config(settings.log_level), timeout_graceful_shutdown=int(settings.drain_timeout),
              http=bounded_protocol(settings.max_header_bytes, settings.max_headers, settings.header_timeout))
    return uvicorn.Config(app, **{**kw, **kwargs})


def serve(settings: Settings) -> None:
    """Bind the port, then load (``/health`` answers 503 until the models are loaded); exit 0 after a
    drained shutdown, 1 when loading failed (the log says why)."""
    app = create_app(settings)
    DrainingServer(uvicorn_config(app, settings), app.state.vlm).run()
    if app.state.vlm.load_error is not None:
        raise SystemExit(1)
