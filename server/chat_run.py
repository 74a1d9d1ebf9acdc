"""A submitted chat request's events into its HTTP response: one ``chat.completion`` or a stream of
``chat.completion.chunk`` events, with the metrics, deadline, disconnects and error mapping they need.

The scheduler delivers each choice's events (``Delta``..., then ``Finished`` or ``Failed``) into an
asyncio queue (``sink_for``); ``complete`` and ``stream`` read it and build the objects with the pure
builders of ``server.responses``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import weakref

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from decoding.methods import SteeringFailed
from decoding.request import Delta, EngineDead, Failed, Finished
from server import responses as out
from server.errors import APIError
from server.sse import Last

log = logging.getLogger("vlm_steer.server")


async def complete(run: "Run", request: Request, reply: "Reply", headers: dict) -> Response:
    """A ``chat.completion`` once every choice has finished (499 if the client went away, 504 past the deadline)."""
    done: dict[int, object] = {}
    watcher = asyncio.create_task(disconnected(request, run.events))
    try:
        while len(done) < len(run.tickets):
            i, ev = await run.events.get()
            if i is None:  # the deadline passed, the client went away, or the drain ended
                run.abort(ev)
                if ev == DISCONNECTED:
                    return Response(status_code=499)
                raise interruption(ev)
            run.observe(i, ev)
            if isinstance(ev, Failed):
                run.abort("failed")
                raise run.error(ev.error)
            if isinstance(ev, Finished):
                done[i] = ev.completion
    finally:
        watcher.cancel()
        run.close()
    choices = [out.choice(i, c.text, c.finish_reason, out.logprobs_block(reply.tokenizer, c.logprobs, c.text))
               for i, c in sorted(done.items())]
    for ch, (i, c) in zip(choices, sorted(done.items())):
        if c.explain is not None:
            ch["explain"] = out.explain_entries(reply.tokenizer, c.explain)
        block = await reply.ground(c.text, run)
        if block is not None and reply.show_grounding:
            ch["grounding"] = block
    gen_tokens = sum(len(c.token_ids) for c in done.values())
    steering = {**reply.steering, "steered_tokens": sum(c.steered_tokens for c in done.values())}
    body = out.completion_body(reply.cid, reply.created, reply.model, choices,
                               out.usage(run.prompt_tokens, gen_tokens), steering)
    return JSONResponse(body, headers=headers)

async def stream(run: "Run", reply: "Reply", include_usage: bool, n: int, continuous: bool = False):
    """Server-sent ``chat.completion.chunk`` events, what is ready in one write, then ``[DONE]``. With
    ``continuous`` (vLLM's ``stream_options.continuous_usage_stats``, only with ``include_usage``) every
    chunk carries the usage so far (completion tokens generated up to it), as vLLM sends it."""
    def chunk(choices, **extra):
        if continuous and "usage" not in extra:
            extra["usage"] = out.usage(run.prompt_tokens, gen_tokens)
        return out.chunk(reply.cid, reply.created, reply.model, choices, include_usage, **extra)

    texts = [out.TokenTexts(reply.tokenizer) for _ in range(n)]
    sent = [0] * n  # characters of content sent per choice
    finished = 0
    steered = 0
    streamed = [0] * n  # tokens generated per choice so far
    gen_tokens = 0
    pending = [chunk([out.delta(i, {"role": "assistant", "content": ""}) for i in range(n)],
                     steering={**reply.steering, "steered_tokens": 0})]
    try:
        first = True
        while True:
            if pending and not first and run.events.empty():  # what is ready goes out in one write
                yield "".join(pending)  # (the role chunk with the first event)
                pending.clear()
            i, ev = await run.events.get()
            first = False
            if i is None:  # the deadline passed or the drain ended
                run.abort(ev)
                pending.append(out.error_event(interruption(ev).body()))
                break
            run.observe(i, ev)
            if isinstance(ev, Delta):
                streamed[i] += len(ev.token_ids)
                gen_tokens = sum(streamed)
                wants = run.tickets[i].request.sampling.top_logprobs is not None
                sent[i] += len(ev.text)
                lp = {"content": texts[i].entries(ev.logprobs, sent[i])} if wants else None
                d = out.delta(i, {"content": ev.text}, lp)
                if reply.explain:
                    d["explain"] = out.explain_entries(reply.tokenizer, ev.explain)
                pending.append(chunk([d]))
            elif isinstance(ev, Finished):
                finished += 1
                steered += ev.completion.steered_tokens
                streamed[i] = len(ev.completion.token_ids)
                gen_tokens = sum(streamed)
                extra = {"steering": {**reply.steering, "steered_tokens": steered}} if finished == n else {}
                d = out.delta(i, {}, None, ev.completion.finish_reason)
                block = await reply.ground(ev.completion.text, run)
                if block is not None and reply.show_grounding:
                    d["grounding"] = block
                pending.append(chunk([d], **extra))
                if finished == n:
                    if include_usage:
                        pending.append(chunk([], usage=out.usage(run.prompt_tokens, gen_tokens)))
                    break
            elif isinstance(ev, Failed):
                run.abort("failed")
                pending.append(out.error_event(run.error(ev.error).body()))
                break
        pending.append("data: [DONE]\n\n")
        yield Last("".join(pending))
    finally:  # the client went away (the stream is cancelled) or we are done
        run.abort("disconnected")
        run.close()


def log_failure(method: str, path: str, request_id: str | None, e: BaseException) -> None:
    """A 500's traceback in the server log, with the request id (never in the response). An error raised
    in the engine process carries its traceback as text (``remote_traceback``)."""
    remote = getattr(e, "remote_traceback", None)
    detail = "".join(traceback.format_exception(e)) + (f"in the engine process:\n{remote}" if remote else "")
    log.error("500 on %s %s (request id %s): %s\n%s", method, path, request_id, e, detail.rstrip())


class Reply:
    """What every response object of one request repeats, and its grounding: ``scores``, a future of the
    judge's image scores (None without image or judge), ``show_grounding``: whether choices carry the block,
    ``weight``: what each counted object weighs in the mention metrics (1 / the sampling share for a request
    judged by sampling, so that the counters estimate every request's objects: Horvitz-Thompson)."""

    def __init__(self, cid: str, created: int, model: str, steering: dict, tokenizer, judge=None, scores=None,
                 show_grounding: bool = False, explain: bool = False, weight: float = 1.0):
        self.cid, self.created, self.model, self.steering, self.tokenizer = cid, created, model, steering, tokenizer
        self.judge, self.scores, self.show_grounding, self.explain = judge, scores, show_grounding, explain
        self.weight = weight

    async def ground(self, text: str, run: "Run") -> dict | None:
        """One choice's grounding block, its objects counted in the metrics (None: nothing to judge)."""
        if self.scores is None:
            return None
        try:
            block = self.judge.report(text, await self.scores)
        except Exception as e:  # the judge failed: the answer is still served, without its block
            log_failure("POST", "/v1/chat/completions (grounding)", run.request_id, e)
            return None
        m = run.metrics
        m.mentions.labels(**run.labels).inc(self.weight * block["counts"]["objects"])
        m.suspect.labels(**run.labels).inc(self.weight * block["counts"]["suspect_objects"])
        m.unsure.labels(**run.labels).inc(self.weight * block["counts"]["unsure_objects"])
        return block


def engine_error(e: Exception) -> APIError:
    if isinstance(e, ValueError):
        return APIError(400, str(e), getattr(e, "param", None))
    if isinstance(e, EngineDead):  # the server exits and its supervisor restarts it (server.supervision)
        return APIError(500, f"the engine died while generating ({e}); retry once the server has restarted")
    if isinstance(e, SteeringFailed):  # said plainly: the request was not served unsteered instead
        return APIError(500, f"{e}; the request was not served without its steering")
    return APIError(500, f"generation failed ({type(e).__name__})")


def sink_for(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, i: int):
    """Where a scheduler delivers choice ``i``'s events: straight into the queue when called on the event
    loop (the engine process's reader), through ``call_soon_threadsafe`` from a worker thread."""
    def sink(ev) -> None:
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            events.put_nowait((i, ev))
        else:
            loop.call_soon_threadsafe(events.put_nowait, (i, ev))
    return sink


# (None, reason) in a request's event queue: its deadline passed, its client went away, the drain ended it
DEADLINE, DISCONNECTED, SHUTDOWN = "deadline", "disconnected", "shutdown"


def interruption(reason: str) -> APIError:
    """The error that ends a request its deadline or the server's drain cut short."""
    if reason == SHUTDOWN:
        return APIError(503, "the server shut down before the request finished (its drain timeout passed)")
    return APIError(504, "the request did not finish within its deadline")


class OpenRuns:
    """The requests being answered (``Run``s from creation to ``close``): at the drain's deadline ``end``
    sends each one ``(None, reason)``, so that it answers its error (a stream: its error event, then
    ``[DONE]``) rather than be cut mid-body when the server stops; a run that opens later ends at once."""

    def __init__(self):
        self._runs: weakref.WeakSet[Run] = weakref.WeakSet()  # a stream never started (its client left) is no leak
        self.ended: str | None = None

    def add(self, run: "Run") -> None:
        self._runs.add(run)
        if self.ended is not None:
            run.events.put_nowait((None, self.ended))

    def discard(self, run: "Run") -> None:
        self._runs.discard(run)

    def end(self, reason: str = SHUTDOWN) -> None:
        self.ended = reason
        for run in list(self._runs):
            run.events.put_nowait((None, reason))

    def __len__(self) -> int:
        return len(self._runs)


async def disconnected(request: Request, events: asyncio.Queue) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            events.put_nowait((None, DISCONNECTED))
            return


class Run:
    """One HTTP request's tickets and the bookkeeping its metrics need."""

    def __init__(self, metrics, scheduler, tickets, events, labels, arrival, prompt_tokens, deadline, request_id=None,
                 registry: OpenRuns | None = None):
        self.metrics, self.scheduler, self.tickets, self.events, self.labels = metrics, scheduler, tickets, events, labels
        self.request_id = request_id
        self.arrival, self.prompt_tokens, self.deadline = arrival, prompt_tokens, deadline
        self.last_token: dict[int, float] = {}
        loop = asyncio.get_running_loop()  # one timer for the deadline, rather than a timeout per event
        self.timer = loop.call_later(max(0.0, deadline - time.monotonic()), events.put_nowait, (None, DEADLINE))
        self.open = set(range(len(tickets)))
        m = metrics
        m.prompt_tokens.labels(**labels).inc(prompt_tokens * len(tickets))
        self.itl, self.generation_tokens = m.itl.labels(**labels), m.generation_tokens.labels(**labels)  # per token
        self.registry = registry
        if registry is not None:
            registry.add(self)

    def observe(self, i: int, ev) -> None:
        m, t, now_ = self.metrics, self.tickets[i], time.monotonic()
        if isinstance(ev, Delta):
            if i not in self.last_token:
                m.ttft.labels(**self.labels).observe(now_ - self.arrival)
                if t.started is not None:
                    m.queue.labels(**self.labels).observe(t.started - t.submitted)
            else:
                self.itl.observe((now_ - self.last_token[i]) / max(1, len(ev.token_ids)))
            self.last_token[i] = now_
            self.generation_tokens.inc(len(ev.token_ids))
        elif isinstance(ev, Finished):
            self.open.discard(i)
            m.e2e.labels(**self.labels).observe(now_ - self.arrival)
            m.success.labels(**self.labels, finished_reason=ev.completion.finish_reason).inc()
            m.steered.labels(**self.labels).inc(ev.completion.steered_tokens)
        elif isinstance(ev, Failed):
            self.open.discard(i)

    def close(self) -> None:
        self.timer.cancel()
        if self.registry is not None:
            self.registry.discard(self)

    def error(self, e: Exception) -> APIError:
        """The HTTP error for a failed choice; a 500 logs its traceback with the request id."""
        err = engine_error(e)
        if err.status >= 500 and not isinstance(e, EngineDead):  # a dead engine is logged once (server.supervision)
            log_failure("POST", "/v1/chat/completions", self.request_id, e)
        return err

    def abort(self, reason: str) -> None:
        if not self.open:
            return
        for i in list(self.open):
            self.scheduler.cancel(self.tickets[i])
        self.metrics.aborted.labels(**self.labels, reason=reason).inc(len(self.open))
        self.open.clear()
