"""The server's log format: every line with its time, level and logger (``2026-12-05 10:31:02,114 INFO
vlm_steer.server: ...``), for uvicorn's own loggers and the project's (``vlm_steer.*``) alike, in the API
process and in the engine process. Built on uvicorn's ``log_config`` dictionary (``logging.config``)."""

from __future__ import annotations

import copy
import logging
import logging.config

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_config(level: str) -> dict:
    """uvicorn's LOGGING_CONFIG with ``FORMAT`` on every handler and a ``vlm_steer`` logger at ``level``
    (uvicorn's ``log_level`` names: critical, error, warning, info, debug, trace)."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["formatters"]["default"] = {"format": FORMAT}
    cfg["formatters"]["access"]["fmt"] = "%(asctime)s %(levelname)s %(name)s: %(client_addr)s - \"%(request_line)s\" %(status_code)s"
    cfg["formatters"]["access"]["use_colors"] = False
    name = "DEBUG" if level.lower() == "trace" else level.upper()
    cfg["loggers"]["vlm_steer"] = {"handlers": ["default"], "level": name, "propagate": False}
    return cfg


def configure(level: str) -> None:
    """Apply ``log_config(level)`` in this process (the engine process calls it; uvicorn applies it in the
    API process)."""
    logging.config.dictConfig(log_config(level))
