"""Iteration-level batching: one worker thread owns the engine and runs the step loop.

Between two decode steps, waiting requests are prefilled and merged into the running batch, and
finished or cancelled rows leave it; every row carries its own sampling and steering parameters.
Each request gets its events (token deltas, then a final completion or an error) through a callback
that the HTTP layer turns into an asyncio queue.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from decoding.request import Delta, Failed, Finished, GenerationRequest  # noqa: F401 (events the app reads)


class QueueFull(Exception):
    pass


Sink = Callable[[object], None]


@dataclass
class Ticket:
    row: object  # the engine's encoded row (prompt ids, pixels, sampler, steering)
    sink: Sink
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # admitted into the batch (end of queue time)
    first_token: float | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    cancelled: bool = False

    @property
    def request(self) -> GenerationRequest:
        return self.row.request


class Scheduler:
    def __init__(self, engine, max_batch: int = 16, max_queue: int = 64, on_step: Callable[["Scheduler"], None] | None = None,
                 on_failure: Callable[[Exception], None] | None = None, inbox: Callable[[bool], None] | None = None,
                 prefill_delay: float = 0.0):
        self.engine = engine
        self.prefill_delay = prefill_delay  # see ``_due``
        self._last_prefill = 0.0  # seconds the last prefill took
        self.inbox = inbox  # run() in a loop that takes its requests itself: inbox(block) submits, cancels, stops
        self.on_failure = on_failure
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.on_step = on_step
        self.waiting: deque[Ticket] = deque()
        self.running: dict[str, Ticket] = {}
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="vlm-steer-scheduler", daemon=True)
        self.steps = 0

    # ------------------------------------------------------------ public

    def start(self) -> None:
        self._thread.start()

    def run(self) -> None:
        """The step loop in the calling thread (with an ``inbox``: the engine process's main thread)."""
        self._loop()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, row, sink: Sink) -> Ticket:
        """Queue an encoded row (``engine.encode(request)``); raises QueueFull beyond ``max_queue``."""
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            t = Ticket(row, sink)
            self.waiting.append(t)
            self._cv.notify_all()
            return t

    def cancel(self, ticket: Ticket) -> None:
        with self._cv:
            ticket.cancelled = True
            if ticket in self.waiting:
                self.waiting.remove(ticket)

    @property
    def alive(self) -> bool:
        """Whether the step loop's thread runs (``start`` started it, nothing killed it, ``stop`` did not end it)."""
        return self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------ the loop

    def _due(self, batch, room: int) -> bool:
        """Whether waiting rows join now. While a batch decodes, they may wait up to ``prefill_delay``
        times the last prefill's duration for others, so that more are prefilled in one forward (a
        prefill costs several decode steps and grows less than linearly with its rows; vLLM's
        scheduler delay factor). Idle, or with enough waiting to fill the batch, they join at once."""
        if batch is None or self.prefill_delay <= 0 or len(self.waiting) >= room:
            return True
        return time.monotonic() - self.waiting[0].submitted >= self.prefill_delay * self._last_prefill

    def _admit(self, batch, room: int):
        if self.inbox is not None:  # between steps: whatever came in; idle: wait for it
            self.inbox(batch is None and not self.waiting)
        with self._cv:
            while self.inbox is None and not self.waiting and batch is None and not self._stop:
                self._cv.wait(timeout=0.5)
            if not self.waiting or not self._due(batch, room):
                return batch
            take = []
            while self.waiting and len(take) < room:
                t = self.waiting.popleft()
                if not t.cancelled:
                    take.append(t)
        rows = []
        for t in take:
            rows.append(t.row)
            t.started = time.monotonic()
            self.running[t.request.request_id] = t
        if not rows:
            return batch
        t0 = time.monotonic()
        new, failed = self._prefill(rows)
        self._last_prefill = time.monotonic() - t0
        self._fail(failed)
        if new is None:
            return batch
        return new if batch is None else self.engine.merge(batch, new)

    def _prefill(self, rows: list) -> tuple[object | None, list]:
        """The new rows as a batch (None if none is left) and the rows that failed, each with its
        ``error``. One forward for all; when it raises, or a steering method fails to start for several
        rows at once, nobody knows whose input was at fault: the suspects are prefilled one by one, so
        that one request's fault (its prompt, pixels, or steering) fails that request alone."""
        try:
            batch, failed = self.engine.without_failed(self.engine.prefill(rows))
        except Exception as e:
            if len(rows) == 1:
                rows[0].error = e
                return None, rows
            batch, failed = None, rows
        if len(rows) == 1 or not failed:
            return batch, failed
        lost = []
        for r in failed:
            r.error = None
            one, bad = self._prefill([r])
            lost += bad
            if one is not None:
                batch = one if batch is None else self.engine.merge(batch, one)
        return batch, lost

    def _fail(self, rows) -> None:
        """Rows that failed leave with their error (a row whose steering failed is never served unsteered)."""
        for r in rows:
            self.running.pop(r.request.request_id).sink(Failed(r.error))
            if self.on_failure and hasattr(r.error, "method"):  # a steering method's failure
                self.on_failure(r.error)

    def _loop(self) -> None:
        batch = None
        while not self._stop:
            room = self.max_batch - (len(batch.rows) if batch else 0)
            batch = self._admit(batch, room) if room > 0 else batch
            if batch is None:
                continue
            batch, failed = self.engine.without_failed(batch)  # a steering method's advance may have failed
            self._fail(failed)
            if batch is None:
                continue
            try:
                batch = self.engine.step(batch, self._deliver)
            except Exception as e:  # the step failed: fail the rows still in it, keep serving
                for r in batch.rows:
                    t = self.running.pop(r.request.request_id, None)
                    if t is not None:
                        t.sink(Failed(e))
                batch = None

    def _deliver(self, batch) -> list[bool]:
        """After a step's sampling: stream each row's new text, finish or fail the rows that are done;
        the rows that stay (``engine.step`` feeds them their token)."""
        now = time.monotonic()
        stay = []
        for row in batch.rows:
            if row.error is not None:
                self._fail([row])
                stay.append(False)
                continue
            t = self.running[row.request.request_id]
            if t.first_token is None:
                t.first_token = now
            self._emit(t, row)
            if row.finish_reason is not None or t.cancelled:
                self.running.pop(row.request.request_id)
                if not t.cancelled:
                    t.sink(Finished(self.engine.completion(row)))
                stay.append(False)
            else:
                stay.append(True)
        self.steps += 1
        if self.on_step:
            self.on_step(self)
        return stay

    @staticmethod
    def _emit(t: Ticket, row) -> None:
        """Send the text that is new since the last delta (held back while a stop string may be forming, or
        while the last tokens end inside a multi-byte character: byte-level and byte-fallback tokenizers
        decode a partial UTF-8 sequence as U+FFFD until its last byte comes) and the tokens whose text has
        been sent (those of held text may yet be cut with the stop string)."""
        text, tokens = row.text, len(row.token_ids)
        if row.finish_reason is None:
            whole = text.rstrip("\ufffd")
            held = len(whole) < len(text)
            if row.request.sampling.stop:
                whole = whole[: max(t.sent_text, len(whole) - max(len(s) for s in row.request.sampling.stop) + 1)]
                held = True
            if held:
                text = text[: max(t.sent_text, len(whole))]
                tokens = max(t.sent_tokens, bisect.bisect_right(row.text_ends, len(text)))
        if len(text) > t.sent_text or tokens > t.sent_tokens:
            t.sink(Delta(text[t.sent_text :], row.token_ids[t.sent_tokens : tokens], row.logprobs[t.sent_tokens : tokens],
                         row.explain[t.sent_tokens : tokens]))
            t.sent_text, t.sent_tokens = len(text), tokens
