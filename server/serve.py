"""Run the app under uvicorn with a graceful drain: on SIGTERM/SIGINT /health turns 503, new requests are
refused, in-flight requests finish (up to ``drain_timeout``), then the process exits 0."""

from __future__ import annotations

import signal

import uvicorn

from server.app import create_app
from server.http_limits import bounded_protocol
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


def uvicorn_config(app, settings: Settings, **kwargs) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: the settings' address, log level and drain, and the head's
    deadline and limits (``server.http_limits``); ``kwargs`` override (tests: ``log_level``)."""
    kw = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
              timeout_graceful_shutdown=int(settings.drain_timeout),
              http=bounded_protocol(settings.max_header_bytes, settings.max_headers, settings.header_timeout))
    return uvicorn.Config(app, **{**kw, **kwargs})


def serve(settings: Settings) -> None:
    app = create_app(settings)
    DrainingServer(uvicorn_config(app, settings), app.state.vlm).run()
