"""The engine's supervision: liveness from its heartbeat, readiness, and what happens when the engine dies.

- Liveness (``GET /health``, what a liveness probe or Docker's HEALTHCHECK asks: "restart me?"): 503 when
  the engine is dead, or when it has had work for ``--engine-stall-timeout`` seconds without completing a
  step (stopped, deadlocked, or stuck in a step); 200 otherwise, draining included (a draining server is
  finishing its work, not broken).
- Readiness (``GET /ready``, what a readiness probe asks: "send me traffic?"): 200 only while serving;
  503 while loading, draining, with the engine dead or stalled.
- An engine that dies (the transformers engine's process, vLLM's engine core) fails every request in flight
  with ``decoding.request.EngineDead`` (500; a stream gets ``data: {"error": ...}`` then ``data: [DONE]``),
  new requests get 503, and ``vlm-steer serve`` drains and exits with status ``EXIT_ENGINE_DEAD`` so that its
  supervisor (Docker's restart policy, Kubernetes) starts a fresh server. vLLM's API server does the same
  when its engine core dies (its launcher's ``terminate_if_errored``): restarting the whole
  process is simpler and surer than reloading an engine inside a server whose state it shared.

The heartbeat is sampled, not pushed: the scheduler's step counter (``steps``, which every engine already
keeps: our step loop's, the engine process's as it crosses the pipe, vLLM's as its steering processor
counts it) and whether it has requests. ``supervise`` samples it a few times a second, so a transition from
idle to busy is seen within a sample and a long idle spell never reads as a stall.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

log = logging.getLogger("vlm_steer.server")

EXIT_ENGINE_DEAD = 1  # `vlm-steer serve`'s exit status when its engine died (a supervisor restarts it)


class Heartbeat:
    """The engine's progress as last sampled: fresh when its step counter moved, or it had no work, at a
    sample; ``stale`` is the seconds since (``clock``: seconds, monotonic). Past ``timeout`` seconds stale,
    the engine is stalled; the first sample that sees it (and the first that sees it recover) logs it."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic):
        self.timeout, self.clock = timeout, clock
        self.steps: int | None = None
        self.fresh = clock()
        self.stalled = False

    def sample(self, scheduler) -> float:
        """Sample ``scheduler`` (``steps``, ``num_running``, ``num_waiting``); return ``stale``."""
        now = self.clock()
        steps = scheduler.steps
        if steps != self.steps or scheduler.num_running + scheduler.num_waiting == 0:
            self.steps, self.fresh = steps, now
        stale = now - self.fresh
        if stale > self.timeout and not self.stalled:
            log.error("the engine has had requests for %.1f s without completing a step (--engine-stall-timeout %s): "
                      "/health and /ready are 503", stale, self.timeout)
        elif stale <= self.timeout and self.stalled:
            log.warning("the engine is no longer stalled (it stepped, or its requests left): /health and /ready are 200")
        self.stalled = stale > self.timeout
        return stale

    @property
    def stale(self) -> float:
        """Seconds since the heartbeat was last fresh (at the last sample that saw a step or no work)."""
        return self.clock() - self.fresh


def engine_alive(state) -> bool:
    return state.scheduler is None or getattr(state.scheduler, "alive", True)


def engine_failure(state) -> str | None:
    """How the engine died, in words (None while it lives)."""
    if state.engine_failure is None and not engine_alive(state):
        return getattr(state.scheduler, "death", "the step loop ended")
    return state.engine_failure


def liveness(state) -> tuple[str, dict]:
    """``("ok" | "draining" | "loading" | "failed" | "engine down" | "engine stalled", details)``: the first two
    are alive. The port is bound before the models load (``server.app.load``): a loading server answers 503
    ``loading`` (a startup probe holds the liveness probe off meanwhile), one whose load failed ``failed``."""
    if state.load_error is not None:
        return "failed", {"reason": str(state.load_error)}
    if not state.ready:
        return ("draining" if state.draining else "loading"), {}
    failure = engine_failure(state)
    if failure is not None:
        return "engine down", {"reason": failure}
    if state.scheduler is not None:
        stale = state.heartbeat.sample(state.scheduler)
        if stale > state.heartbeat.timeout:
            return "engine stalled", {"seconds_since_step": round(stale, 2), "engine_stall_timeout": state.heartbeat.timeout}
    return ("draining" if state.draining else "ok"), {}


def readiness(state) -> tuple[str, dict]:
    """``("ready" | "loading" | "draining" | "engine down" | "engine stalled", details)``."""
    status, details = liveness(state)
    if status == "ok":
        return "ready", {}
    return status, details


async def supervise(state, period: float) -> None:
    """Every ``period`` seconds: sample the heartbeat (which logs when the engine stalls and recovers), and
    when the engine died, record how (``state.engine_failure``) and log it once; ``vlm-steer serve`` then
    drains and exits (``server.serve``). Starts once the models are loaded (a failed load is ``load``'s)."""
    while not state.ready:
        if state.load_error is not None:
            return
        await asyncio.sleep(period)
    while True:
        if state.engine_failure is None and not engine_alive(state):
            state.engine_failure = engine_failure(state)
            log.error("%s: failing the requests in flight, refusing new ones (503), /health and /ready 503",
                      state.engine_failure)
            return
        state.heartbeat.sample(state.scheduler)
        await asyncio.sleep(period)
