"""The FastAPI app: the routes (/v1/chat/completions, /v1/models, /health, /metrics), the server's life
cycle and its errors in the OpenAI shape. The routes stay thin:

    HTTP body -> ``server.chat_service`` (strict schema, messages, images, sampling, the engine's encode:
    every check before the scheduler) -> the scheduler (``server.engines``) -> ``server.chat_run`` (events
    into a chat.completion or a stream, built by ``server.responses``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from decoding.methods import SteeringFailed
from decoding.request import SteeringSpec
from server.chat_run import Reply, Run, complete, engine_error, log_failure, sink_for, stream
from server.chat_service import ChatService, check_media_type
from server.errors import APIError
from server.experiments import DEFAULT_ARM, EXPLICIT_ARM, Experiment
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, completion_id, now, openapi_chat_completions
from server.scheduler import QueueFull, Scheduler
from server.engines import load_engine, make_scheduler
from server.settings import Settings
from server.sse import EventStreamResponse

log = logging.getLogger("vlm_steer.server")
PLAYGROUND = Path(__file__).resolve().parent / "static" / "playground.html"


class State:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = None
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics(settings.model_name)
        self.experiment = Experiment.load(settings.experiment) if settings.experiment else None
        self.service: ChatService | None = None
        self.judge = None  # reward_models.grounding.Judge: grounding blocks and mention metrics
        self.ready = False
        self.draining = False


MAX_REQUEST_ID = 128


def _client_request_id(request: Request) -> str | None:
    """The client's ``X-Request-Id`` when it is a reasonable one (at most 128 printable ASCII characters);
    otherwise the server assigns its own (it is echoed and written to the log)."""
    rid = request.headers.get("x-request-id")
    return rid if rid and len(rid) <= MAX_REQUEST_ID and rid.isascii() and rid.isprintable() else None


def load_judge(settings: Settings):
    """The grounding judge (``reward_models.grounding.Judge``) on the serving device."""
    from reward_models.grounding import Judge
    from reward_models.verifier import Verifier

    return Judge(Verifier(settings.grounding_verifier, device=settings.device))


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
        if settings.grounding_verifier is not None:
            state.judge = await asyncio.to_thread(load_judge, settings)
        log.info("serving %s with steering methods: %s", settings.model_name, ", ".join(state.engine.available_methods))
        for name, why in getattr(state.engine, "unavailable", {}).items():
            log.warning("steering method %r not offered: %s", name, why)
        state.metrics.queue_capacity.labels(state.metrics.model).set(settings.max_queue)
        state.metrics.alert_margin.labels(state.metrics.model).set(settings.grounding_alert_margin)
        control = state.experiment.control if state.experiment else DEFAULT_ARM
        state.metrics.control_arm.labels(state.metrics.model, control).set(1)
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
        return getattr(request.state, "request_id", None) or _client_request_id(request)

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
        return await state.service.parse(bytes(raw))

    def _arm(req: ChatCompletionRequest) -> tuple[str, SteeringSpec]:
        """The request's arm and steering; ``explain`` is the request's own whatever the arm (it changes no
        arm's decoding)."""
        exp = state.experiment
        explain = bool(req.steering and req.steering.explain)
        if exp is not None and (exp.locked or req.steering is None):
            arm = exp.assign(req.user)
            return arm.name, SteeringSpec(arm.steering.method, arm.steering.strength, explain)
        if req.steering is not None:
            return (EXPLICIT_ARM if exp else DEFAULT_ARM), SteeringSpec(req.steering.method, req.steering.strength, explain)
        return DEFAULT_ARM, SteeringSpec(explain=explain)

    chat_api = openapi_chat_completions()
    components = chat_api.pop("x-components")

    @app.post("/v1/chat/completions", openapi_extra=chat_api, responses={})
    async def chat(request: Request):
        arrival = time.monotonic()
        created = now()  # one value for the whole completion, every chunk of a stream included
        cid = completion_id()
        request.state.request_id = _client_request_id(request) or cid
        _auth(request)
        if not state.ready or state.draining:
            raise APIError(503, "the server is not accepting requests (loading or draining)")
        try:
            req = await _body(request)
        except ClientDisconnect:  # the client went away while sending its body: nothing to answer, no fault
            return Response(status_code=499)
        if req.model != settings.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {settings.model_name!r}",
                           param="model")
        if req.grounding and state.judge is None:
            raise APIError(400, "grounding needs a calibrated grounding verifier, and this server has none "
                                "(--grounding-verifier)", param="grounding")
        arm, spec = _arm(req)
        try:
            strengths = state.engine.resolve(spec)
        except ValueError as e:
            raise APIError(400, str(e), param="steering") from None
        try:
            prepared = await state.service.prepare(req, spec, cid)
        except SteeringFailed as e:  # an engine that starts steering at admission (vllm: FiSAO's verifier)
            on_failure(e)
            raise engine_error(e) from None

        method = spec.method
        labels = state.metrics.labels(method, arm)
        steering_info = {"method": method, "strength": strengths or None, "arm": arm}
        headers = {"X-Steering-Arm": arm, "X-Request-Id": request.state.request_id}
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        tickets = []
        try:
            for i, row in enumerate(prepared.rows):
                tickets.append(state.scheduler.submit(row, sink_for(loop, events, i)))
        except QueueFull as e:
            for t in tickets:
                state.scheduler.cancel(t)
            raise APIError(429, f"Model is overloaded: {e}", headers={"Retry-After": "1"}) from None
        state.metrics.waiting.labels(state.metrics.model).set(state.scheduler.num_waiting)
        run = Run(state.metrics, state.scheduler, tickets, events, labels, arrival, prepared.prompt_tokens,
                  arrival + settings.request_timeout, request.state.request_id)
        images = prepared.rows[0].request.images
        show = settings.grounding_default if req.grounding is None else req.grounding
        judged = state.judge is not None and images and (show or random.random() < settings.grounding_sample)
        scores = (loop.run_in_executor(state.service.executor, state.judge.scores, images)
                  if judged else None)  # beside the generation, off the event loop
        reply = Reply(cid, created, settings.model_name, steering_info, state.engine.tokenizer, state.judge, scores,
                      show, spec.explain)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStreamResponse(stream(run, reply, include_usage, req.n), headers=headers)
        return await complete(run, request, reply, headers)

    # ------------------------------------------------------------ the playground

    @app.get("/playground", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/playground/examples", include_in_schema=False)
    async def playground_examples():
        """The example images (data URLs) and the default question of the playground."""
        folder = settings.playground_examples
        if folder is None or not Path(folder).is_dir():
            return {"prompt": None, "images": []}
        images = []
        for f in sorted(Path(folder).iterdir()):
            kind = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}.get(f.suffix.lower())
            if kind:
                images.append({"name": f.name, "url": f"data:image/{kind};base64," + base64.b64encode(f.read_bytes()).decode()})
        prompt = Path(folder) / "prompt.txt"
        return {"prompt": prompt.read_text().strip() if prompt.exists() else None, "images": images}

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
