"""The FastAPI app: /v1/chat/completions (stream and non-stream), /v1/models, /health, /metrics.

Data flows one way: HTTP body -> validated ChatCompletionRequest -> GenerationRequest(s) (prompt,
images, sampling, steering) -> the scheduler's step loop -> events -> HTTP response.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoding.methods import SteeringFailed
from decoding.request import SteeringSpec
from server import responses as out
from server.chat_service import ChatService, check_media_type, parse_request
from server.errors import APIError
from server.experiments import DEFAULT_ARM, EXPLICIT_ARM, Experiment
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, completion_id, now, openapi_chat_completions
from server.scheduler import Delta, Failed, Finished, QueueFull, Scheduler
from server.settings import Settings
from server.sse import EventStreamResponse, Last

log = logging.getLogger("vlm_steer.server")


class State:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = None
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics(settings.model_name)
        self.experiment = Experiment.load(settings.experiment) if settings.experiment else None
        self.service: ChatService | None = None
        self.ready = False
        self.draining = False


def load_engine(s: Settings):
    if s.engine == "vllm":
        from decoding.vllm_engine import VLLMEngine

        return VLLMEngine(s.model, device=s.device, dtype=s.dtype, reward_path=s.reward_model, verifier_path=s.verifier,
                          max_batch=s.max_batch, tensor_parallel_size=s.tensor_parallel_size,
                          gpu_memory_utilization=s.gpu_memory_utilization, max_model_len=s.max_model_len)
    from decoding.transformers_engine import TransformersEngine

    return TransformersEngine(s.model, device=s.device, dtype=s.dtype, reward_path=s.reward_model, verifier_path=s.verifier)


def make_scheduler(engine, s: Settings, **callbacks):
    """Our step loop over the transformers engine; vLLM batches by itself behind the same interface."""
    if engine.name == "vllm":
        from server.vllm_scheduler import EngineScheduler

        return EngineScheduler(engine, s.max_batch, s.max_queue, **callbacks)
    return Scheduler(engine, s.max_batch, s.max_queue, prefill_delay=s.prefill_delay, **callbacks)


def create_app(settings: Settings, engine=None) -> FastAPI:
    state = State(settings)

    def on_step(sched: Scheduler) -> None:
        m = state.metrics
        m.running.labels(m.model).set(sched.num_running)
        m.waiting.labels(m.model).set(sched.num_waiting)
        for method, sec in sched.engine.pop_steering_seconds().items():
            m.steering_time.labels(m.model, method).observe(sec)

    def on_failure(e: Exception) -> None:
        m = state.metrics
        m.steering_failures.labels(m.model, getattr(e, "method", "unknown")).inc()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is None and settings.engine == "transformers" and settings.engine_process:
            from server.engine_process import ProcessScheduler

            state.scheduler = ProcessScheduler(settings, on_step=on_step, on_failure=on_failure)
            state.engine = await asyncio.to_thread(state.scheduler.load)
        else:
            state.engine = engine or await asyncio.to_thread(load_engine, settings)
            state.scheduler = make_scheduler(state.engine, settings, on_step=on_step, on_failure=on_failure)
        state.service = ChatService(settings, state.engine)
        state.metrics.queue_capacity.labels(state.metrics.model).set(settings.max_queue)
        state.scheduler.start()
        state.ready = True
        yield
        state.draining = True
        state.scheduler.stop()
        state.service.close()
        if engine is None and hasattr(state.engine, "close"):  # an engine this app started
            state.engine.close()

    app = FastAPI(title="vlm-steer", version="0.1.0", lifespan=lifespan)
    app.state.vlm = state

    # ------------------------------------------------------------ errors in the OpenAI shape

    def _request_id(request: Request) -> str | None:
        return getattr(request.state, "request_id", None) or request.headers.get("x-request-id")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        state.metrics.errors.labels(state.metrics.model, str(e.status)).inc()
        rid = _request_id(request)
        if rid and "X-Request-Id" not in e.headers:
            e.headers["X-Request-Id"] = rid
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return await _api_error(request, APIError(400, str(e.errors()[:3])))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return await _api_error(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log_failure(request.method, request.url.path, _request_id(request), e)
        return await _api_error(request, APIError(500, "internal server error"))

    # ------------------------------------------------------------ plain endpoints

    @app.get("/health", responses={200: {"description": "Serving"}, 503: {"description": "Loading or draining"}})
    async def health():
        if state.ready and not state.draining and getattr(state.scheduler, "alive", True):
            return {"status": "ok"}
        status = "draining" if state.draining else "loading" if not state.ready else "engine down"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition",
                              "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def metrics():
        text = generate_latest(state.metrics.registry)
        if state.engine is not None and state.engine.name == "vllm":  # vLLM's own vllm:* families beside ours
            from prometheus_client import REGISTRY

            text += generate_latest(REGISTRY)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses={401: {"description": "Missing or invalid API key",
                                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}})
    async def models(request: Request):
        _auth(request)
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model:path}", responses={
        401: {"description": "Missing or invalid API key", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}},
        404: {"description": "Unknown model", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}})
    async def model(model: str, request: Request):
        """One model (the openai client's ``models.retrieve``)."""
        _auth(request)
        if model != settings.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r}",
                           param="model")
        return _model_card()

    def _model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "vlm-steer",
                "steering_methods": _methods()}

    def _methods() -> list[str]:
        return state.engine.available_methods if state.engine else []

    def _auth(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in settings.api_keys:
            raise APIError(401, "invalid or missing API key", headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------ chat completions

    async def _body(request: Request) -> ChatCompletionRequest:
        check_media_type(request.headers.get("content-type"))
        if int(request.headers.get("content-length") or 0) > settings.max_body_bytes:
            raise APIError(413, f"request body exceeds {settings.max_body_bytes} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > settings.max_body_bytes:
                raise APIError(413, f"request body exceeds {settings.max_body_bytes} bytes")
        return parse_request(bytes(raw))

    def _arm(req: ChatCompletionRequest) -> tuple[str, SteeringSpec]:
        exp = state.experiment
        if exp is not None and (exp.locked or req.steering is None):
            arm = exp.assign(req.user)
            return arm.name, SteeringSpec(arm.steering.method, arm.steering.strength)
        if req.steering is not None:
            return (EXPLICIT_ARM if exp else DEFAULT_ARM), SteeringSpec(req.steering.method, req.steering.strength)
        return DEFAULT_ARM, SteeringSpec()

    chat_api = openapi_chat_completions()
    components = chat_api.pop("x-components")

    @app.post("/v1/chat/completions", openapi_extra=chat_api, responses={})
    async def chat(request: Request):
        arrival = time.monotonic()
        created = now()  # one value for the whole completion, every chunk of a stream included
        cid = completion_id()
        request.state.request_id = request.headers.get("x-request-id") or cid
        _auth(request)
        if not state.ready or state.draining:
            raise APIError(503, "the server is not accepting requests (loading or draining)")
        req = await _body(request)
        if req.model != settings.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {settings.model_name!r}",
                           param="model")
        arm, spec = _arm(req)
        try:
            strengths = state.engine.resolve(spec)
        except ValueError as e:
            raise APIError(400, str(e), param="steering") from None
        try:
            prepared = await state.service.prepare(req, spec, cid)
        except SteeringFailed as e:  # an engine that starts steering at admission (vllm: FiSAO's verifier)
            on_failure(e)
            raise _engine_error(e) from None

        method = spec.method
        labels = state.metrics.labels(method, arm)
        steering_info = {"method": method, "strength": strengths or None, "arm": arm}
        headers = {"X-Steering-Arm": arm, "X-Request-Id": request.state.request_id}
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        tickets = []
        try:
            for i, row in enumerate(prepared.rows):
                tickets.append(state.scheduler.submit(row, _sink(loop, events, i)))
        except QueueFull as e:
            for t in tickets:
                state.scheduler.cancel(t)
            raise APIError(429, f"Model is overloaded: {e}", headers={"Retry-After": "1"}) from None
        state.metrics.waiting.labels(state.metrics.model).set(state.scheduler.num_waiting)
        run = _Run(state, tickets, events, labels, arrival, prepared.prompt_tokens, arrival + settings.request_timeout,
                   request.state.request_id)
        reply = _Reply(cid, created, settings.model_name, steering_info, state.engine.tokenizer)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStreamResponse(_stream(run, reply, include_usage, req.n), headers=headers)
        return await _complete(run, request, reply, headers)

    async def _complete(run: "_Run", request: Request, reply: "_Reply", headers):
        done: dict[int, object] = {}
        watcher = asyncio.create_task(_disconnected(request, run.events))
        try:
            while len(done) < len(run.tickets):
                i, ev = await run.events.get()
                if i is None:  # the deadline passed or the client went away
                    run.abort(ev)
                    if ev == DISCONNECTED:
                        return Response(status_code=499)
                    raise APIError(504, "the request did not finish within its deadline")
                run.observe(i, ev)
                if isinstance(ev, Failed):
                    run.abort("failed")
                    raise run.error(ev.error)
                if isinstance(ev, Finished):
                    done[i] = ev.completion
        finally:
            watcher.cancel()
            run.close()
        choices = [out.choice(i, c.text, c.finish_reason, out.logprobs_block(reply.tokenizer, c.logprobs))
                   for i, c in sorted(done.items())]
        gen_tokens = sum(len(c.token_ids) for c in done.values())
        steering = {**reply.steering, "steered_tokens": sum(c.steered_tokens for c in done.values())}
        body = out.completion_body(reply.cid, reply.created, reply.model, choices,
                                   out.usage(run.prompt_tokens, gen_tokens), steering)
        return JSONResponse(body, headers=headers)

    async def _stream(run: "_Run", reply: "_Reply", include_usage: bool, n: int):
        def chunk(choices, **extra):
            return out.chunk(reply.cid, reply.created, reply.model, choices, include_usage, **extra)

        texts = [out.TokenTexts(reply.tokenizer) for _ in range(n)]
        finished = 0
        steered = 0
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
                if i is None:  # the deadline passed
                    run.abort(ev)
                    pending.append(out.error_event(APIError(504, "the request did not finish within its deadline").body()))
                    break
                run.observe(i, ev)
                if isinstance(ev, Delta):
                    wants = run.tickets[i].request.sampling.top_logprobs is not None
                    lp = {"content": texts[i].entries(ev.logprobs)} if wants else None
                    pending.append(chunk([out.delta(i, {"content": ev.text}, lp)]))
                elif isinstance(ev, Finished):
                    finished += 1
                    steered += ev.completion.steered_tokens
                    gen_tokens += len(ev.completion.token_ids)
                    extra = {"steering": {**reply.steering, "steered_tokens": steered}} if finished == n else {}
                    pending.append(chunk([out.delta(i, {}, None, ev.completion.finish_reason)], **extra))
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

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def log_failure(method: str, path: str, request_id: str | None, e: BaseException) -> None:
    """A 500's traceback in the server log, with the request id (never in the response). An error raised
    in the engine process carries its traceback as text (``remote_traceback``)."""
    remote = getattr(e, "remote_traceback", None)
    detail = "".join(traceback.format_exception(e)) + (f"in the engine process:\n{remote}" if remote else "")
    log.error("500 on %s %s (request id %s): %s\n%s", method, path, request_id, e, detail.rstrip())


class _Reply:
    """What every response object of one request repeats."""

    def __init__(self, cid: str, created: int, model: str, steering: dict, tokenizer):
        self.cid, self.created, self.model, self.steering, self.tokenizer = cid, created, model, steering, tokenizer


def _engine_error(e: Exception) -> APIError:
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if isinstance(e, SteeringFailed):  # said plainly: the request was not served unsteered instead
        return APIError(500, f"{e}; the request was not served without its steering")
    return APIError(500, f"generation failed ({type(e).__name__})")


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, i: int):
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


DEADLINE, DISCONNECTED = "deadline", "disconnected"  # (None, reason) in a request's event queue


async def _disconnected(request: Request, events: asyncio.Queue) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            events.put_nowait((None, DISCONNECTED))
            return


class _Run:
    """One HTTP request's tickets and the bookkeeping its metrics need."""

    def __init__(self, state: State, tickets, events, labels, arrival, prompt_tokens, deadline, request_id=None):
        self.state, self.tickets, self.events, self.labels = state, tickets, events, labels
        self.request_id = request_id
        self.arrival, self.prompt_tokens, self.deadline = arrival, prompt_tokens, deadline
        self.last_token: dict[int, float] = {}
        loop = asyncio.get_running_loop()  # one timer for the deadline, rather than a timeout per event
        self.timer = loop.call_later(max(0.0, deadline - time.monotonic()), events.put_nowait, (None, DEADLINE))
        self.open = set(range(len(tickets)))
        m = state.metrics
        m.prompt_tokens.labels(**labels).inc(prompt_tokens * len(tickets))
        self.itl, self.generation_tokens = m.itl.labels(**labels), m.generation_tokens.labels(**labels)  # per token

    def observe(self, i: int, ev) -> None:
        m, t, now_ = self.state.metrics, self.tickets[i], time.monotonic()
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

    def error(self, e: Exception) -> APIError:
        """The HTTP error for a failed choice; a 500 logs its traceback with the request id."""
        err = _engine_error(e)
        if err.status >= 500:
            log_failure("POST", "/v1/chat/completions", self.request_id, e)
        return err

    def abort(self, reason: str) -> None:
        if not self.open:
            return
        for i in list(self.open):
            self.state.scheduler.cancel(self.tickets[i])
        self.state.metrics.aborted.labels(**self.labels, reason=reason).inc(len(self.open))
        self.open.clear()
