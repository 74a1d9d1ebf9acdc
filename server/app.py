"""The FastAPI app: /v1/chat/completions (stream and non-stream), /v1/models, /health, /metrics.

Data flows one way: HTTP body -> validated ChatCompletionRequest -> GenerationRequest(s) (prompt,
images, sampling, steering) -> the scheduler's step loop -> events -> HTTP response.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from decoding.methods import SteeringFailed
from server.errors import APIError
from server.experiments import DEFAULT_ARM, EXPLICIT_ARM, Experiment
from server.images import decode_data_url, fetch_url
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, completion_id, now, openapi_chat_completions
from server.scheduler import Delta, Failed, Finished, QueueFull, Scheduler
from server.settings import Settings
from server.sse import EventStreamResponse, Last


class State:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = None
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics(settings.model_name)
        self.experiment = Experiment.load(settings.experiment) if settings.experiment else None
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
        state.metrics.queue_capacity.labels(state.metrics.model).set(settings.max_queue)
        state.scheduler.start()
        state.ready = True
        yield
        state.draining = True
        state.scheduler.stop()
        if engine is None and hasattr(state.engine, "close"):  # an engine this app started
            state.engine.close()

    app = FastAPI(title="vlm-steer", version="0.1.0", lifespan=lifespan)
    app.state.vlm = state

    # ------------------------------------------------------------ errors in the OpenAI shape

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        state.metrics.errors.labels(state.metrics.model, str(e.status)).inc()
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return await _api_error(request, APIError(400, str(e.errors()[:3])))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return await _api_error(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
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
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "vlm-steer", "steering_methods": _methods()}]}

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
        if int(request.headers.get("content-length") or 0) > settings.max_body_bytes:
            raise APIError(413, f"request body exceeds {settings.max_body_bytes} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > settings.max_body_bytes:
                raise APIError(413, f"request body exceeds {settings.max_body_bytes} bytes")
        try:
            data = json.loads(raw)
        except ValueError:
            raise APIError(400, "request body is not valid JSON") from None
        try:
            return ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None

    async def _messages(req: ChatCompletionRequest) -> tuple[list[dict], list]:
        messages, images = [], []
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            if isinstance(m.content, list):
                parts = []
                for p in m.content:
                    if p.type == "text":
                        parts.append({"type": "text", "text": p.text})
                        continue
                    if len(images) >= settings.max_images:
                        raise APIError(400, f"at most {settings.max_images} images per request", param="messages")
                    url = p.image_url.url
                    if url.startswith("data:"):
                        img = decode_data_url(url, settings.max_image_bytes, settings.max_image_pixels)
                    else:
                        img = await fetch_url(url, settings.image_url_hosts, settings.image_url_timeout,
                                              settings.max_image_bytes, settings.max_image_pixels)
                    images.append(img)
                    parts.append({"type": "image"})
                messages.append({"role": role, "content": parts})
            else:
                messages.append({"role": role, "content": m.content or ""})
        return messages, images

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
        max_tokens = req.max_completion_tokens or req.max_tokens or settings.max_tokens_default
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds the limit {settings.max_tokens_limit}", param="max_tokens")
        messages, images = await _messages(req)
        temperature = 1.0 if req.temperature is None else req.temperature
        cid = completion_id()
        gens = []
        for i in range(req.n):
            sampling = SamplingParams(
                max_tokens=max_tokens, temperature=temperature, top_p=req.top_p or 1.0,
                seed=None if req.seed is None else req.seed + i, stop=tuple(req.stop or ()),
                top_logprobs=(req.top_logprobs or 0) if req.logprobs else None, ignore_eos=req.ignore_eos,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0)
            gens.append(GenerationRequest(messages, images, sampling, spec, request_id=f"{cid}-{i}"))
        try:
            rows = [state.engine.encode(g) for g in gens]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        except SteeringFailed as e:  # an engine that starts steering at admission (vllm: FiSAO's verifier)
            on_failure(e)
            raise _engine_error(e) from None
        prompt_tokens = len(rows[0].prompt_ids)
        if prompt_tokens + max_tokens > state.engine.max_context:
            raise APIError(400, f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                                f"limit of {state.engine.max_context}", param="messages")

        method = spec.method
        labels = state.metrics.labels(method, arm)
        steering_info = {"method": method, "strength": strengths or None, "arm": arm}
        headers = {"X-Steering-Arm": arm, "X-Request-Id": request.headers.get("x-request-id") or cid}
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        tickets = []
        try:
            for i, row in enumerate(rows):
                tickets.append(state.scheduler.submit(row, _sink(loop, events, i)))
        except QueueFull as e:
            for t in tickets:
                state.scheduler.cancel(t)
            raise APIError(429, f"Model is overloaded: {e}", headers={"Retry-After": "1"}) from None
        state.metrics.waiting.labels(state.metrics.model).set(state.scheduler.num_waiting)
        run = _Run(state, tickets, events, labels, arrival, prompt_tokens, arrival + settings.request_timeout)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStreamResponse(_stream(run, cid, settings.model_name, steering_info, include_usage, req.n),
                                       headers=headers)
        return await _complete(run, request, cid, settings.model_name, steering_info, headers)

    def _logprobs(tok, items) -> dict | None:
        if items is None:
            return None
        def entry(tid, lp):
            s = tok.decode([tid])
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]} for x in items]}

    async def _complete(run: "_Run", request: Request, cid, model, steering_info, headers):
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
                    raise _engine_error(ev.error)
                if isinstance(ev, Finished):
                    done[i] = ev.completion
        finally:
            watcher.cancel()
            run.close()
        tok = state.engine.tokenizer
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _logprobs(tok, c.logprobs), "finish_reason": c.finish_reason}
                   for i, c in sorted(done.items())]
        gen_tokens = sum(len(c.token_ids) for c in done.values())
        steering = {**steering_info, "steered_tokens": sum(c.steered_tokens for c in done.values())}
        body = {"id": cid, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
                "usage": {"prompt_tokens": run.prompt_tokens, "completion_tokens": gen_tokens,
                          "total_tokens": run.prompt_tokens + gen_tokens}, "steering": steering}
        return JSONResponse(body, headers=headers)

    async def _stream(run: "_Run", cid, model, steering_info, include_usage: bool, n: int):
        def chunk(choices, **extra):
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": now(), "model": model,
                                          "choices": choices, **extra}) + "\n\n"

        tok = state.engine.tokenizer
        finished = 0
        steered = 0
        gen_tokens = 0
        out = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                      for i in range(n)], steering={**steering_info, "steered_tokens": 0})]
        try:
            first = True
            while True:
                if out and not first and run.events.empty():  # what is ready goes out in one write
                    yield "".join(out)  # (the role chunk with the first event)
                    out.clear()
                i, ev = await run.events.get()
                first = False
                if i is None:  # the deadline passed
                    run.abort(ev)
                    out.append("data: " + json.dumps(APIError(504, "the request did not finish within its deadline").body()) + "\n\n")
                    break
                run.observe(i, ev)
                if isinstance(ev, Delta):
                    lp = _logprobs(tok, ev.logprobs) if run.tickets[i].request.sampling.top_logprobs is not None else None
                    out.append(chunk([{"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}]))
                elif isinstance(ev, Finished):
                    finished += 1
                    steered += ev.completion.steered_tokens
                    gen_tokens += len(ev.completion.token_ids)
                    extra = {"steering": {**steering_info, "steered_tokens": steered}} if finished == n else {}
                    out.append(chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.completion.finish_reason}], **extra))
                    if finished == n:
                        if include_usage:
                            out.append(chunk([], usage={"prompt_tokens": run.prompt_tokens, "completion_tokens": gen_tokens,
                                                        "total_tokens": run.prompt_tokens + gen_tokens}))
                        break
                elif isinstance(ev, Failed):
                    run.abort("failed")
                    out.append("data: " + json.dumps(_engine_error(ev.error).body()) + "\n\n")
                    break
            out.append("data: [DONE]\n\n")
            yield Last("".join(out))
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

    def __init__(self, state: State, tickets, events, labels, arrival, prompt_tokens, deadline):
        self.state, self.tickets, self.events, self.labels = state, tickets, events, labels
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

    def abort(self, reason: str) -> None:
        if not self.open:
            return
        for i in list(self.open):
            self.state.scheduler.cancel(self.tickets[i])
        self.state.metrics.aborted.labels(**self.labels, reason=reason).inc(len(self.open))
        self.open.clear()
