"""The scheduler's interface over an engine that batches by itself (vLLM): submit hands a request to the
engine at once, cancel aborts it there; the same bounded queue (429 beyond ``max_queue`` requests
waiting for one of ``max_batch`` rows) and the same events reach the HTTP layer."""

from __future__ import annotations

import threading
import time
from typing import Callable

from decoding.request import Delta, Failed, Finished
from server.scheduler import QueueFull, Sink, Ticket


class EngineScheduler:
    def __init__(self, engine, max_batch: int = 16, max_queue: int = 64, on_step: Callable | None = None,
                 on_failure: Callable[[Exception], None] | None = None):
        self.engine = engine
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_step, self.on_failure = on_step, on_failure
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[Ticket, object]] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        with self._lock:
            running = list(self._inflight.values())
        for t, fut in running:
            self.cancel(t)

    @property
    def steps(self) -> int:
        return self.engine.steps

    death = "vLLM's engine core exited"  # how it died, in words (vLLM logs the details)

    @property
    def alive(self) -> bool:
        """Whether vLLM's engine core lives (its death fails every request in flight with ``EngineDead``)."""
        return not self.engine.errored

    @property
    def num_running(self) -> int:
        return min(len(self._inflight), self.max_batch)

    @property
    def num_waiting(self) -> int:  # vLLM queues beyond its ``max_num_seqs`` rows
        return max(0, len(self._inflight) - self.max_batch)

    def submit(self, row, sink: Sink) -> Ticket:
        with self._lock:
            if self.num_waiting >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            t = Ticket(row, sink)
            self._inflight[id(t)] = (t, None)

        def on_event(ev) -> None:
            if t.cancelled:
                return
            if isinstance(ev, Delta) and t.first_token is None:
                t.started = t.first_token = time.monotonic()  # vLLM does not report admission: queue time ends here
            if isinstance(ev, (Finished, Failed)):
                with self._lock:
                    self._inflight.pop(id(t), None)
                if isinstance(ev, Failed) and self.on_failure and hasattr(ev.error, "method"):
                    self.on_failure(ev.error)
            sink(ev)
            if self.on_step:
                self.on_step(self)

        fut = self.engine.run(row, on_event)
        with self._lock:
            if id(t) in self._inflight:
                self._inflight[id(t)] = (t, fut)
        return t

    def cancel(self, ticket: Ticket) -> None:
        ticket.cancelled = True
        with self._lock:
            _, fut = self._inflight.pop(id(ticket), (None, None))
        if fut is not None:
            fut.cancel()  # cancels the engine-side task, which aborts the request inside vLLM
        if self.on_step:
            self.on_step(self)
