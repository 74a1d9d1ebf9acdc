"""Run the app under uvicorn with a graceful drain: on SIGTERM/SIGINT /health turns 503, new requests are
refused, in-flight requests finish (up to ``drain_timeout``), then the process exits 0."""

from __future__ import annotations

import signal

import uvicorn

from server.app import create_app
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


def serve(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.drain_timeout))
    DrainingServer(config, app.state.vlm).run()
