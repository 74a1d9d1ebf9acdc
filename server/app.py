"""The FastAPI app: the server's life cycle (load the engine, scheduler, services and judge; drain on
shutdown) and its errors in the OpenAI shape. The routes are in ``server.routes``, thin:

    HTTP -> ``server.routes`` -> ``server.serving_chat`` (``server.chat_service``: strict schema, messages,
    images, sampling, the engine's encode: every check before the scheduler) -> the scheduler
    (``server.engines``) -> ``server.chat_run`` (events into a chat.completion or a stream, built by
    ``server.responses``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import routes
from server.auth import client_request_id
from server.chat_run import log_failure
from server.chat_service import ChatService
from server.engines import load_engine, make_scheduler
from server.errors import APIError
from server.experiments import DEFAULT_ARM
from server.generation_defaults import load_generation_defaults
from server.http_limits import BodyDeadline
from server.judging import BatchedJudge
from server.profiles import Profiles
from server.serving_chat import ChatServing
from server.settings import Settings
from server.state import State
from server.supervision import supervise

log = logging.getLogger("vlm_steer.server")


def load_judge(settings: Settings):
    """The grounding judge (``reward_models.grounding.Judge``) on ``grounding_device`` (default the CPU)."""
    from decoding.verifier import Verifier
    from reward_models.grounding import Judge
    return Judge(Verifier(settings.grounding_verifier, device=settings.grounding_device))


async def start(state: State, engine=None) -> None:
    """Load what the server serves with (``engine``: one already loaded, e.g. by a test) and open."""
    settings = state.settings
    # read before the engine loads: a checkpoint default the schema refuses stops the server at once
    defaults = load_generation_defaults(settings.generation_config, settings.model, settings.max_tokens_limit)
    if engine is None and settings.engine == "transformers" and settings.engine_process:
        def process_scheduler():  # in a thread: its imports (torch) would hold the event loop for a second or two
            from server.engine_process import ProcessScheduler

            return ProcessScheduler(settings, on_step=state.on_step, on_failure=state.on_failure)

        state.scheduler = await asyncio.to_thread(process_scheduler)
        state.engine = await asyncio.to_thread(state.scheduler.load)
    else:
        state.engine = engine or await asyncio.to_thread(load_engine, settings)
        state.scheduler = make_scheduler(state.engine, settings, on_step=state.on_step, on_failure=state.on_failure)
    state.profiles = Profiles(settings.model_name, state.engine, state.profile_file)
    state.service = ChatService(settings, state.engine, defaults)
    log.info(defaults.describe())
    state.chat = ChatServing(state)
    if settings.grounding_verifier is not None:
        state.judge = await asyncio.to_thread(load_judge, settings)
        state.judging = BatchedJudge(state.judge)
    log_offer(state)
    m = state.metrics
    m.queue_capacity.labels(m.model).set(settings.max_queue)
    m.alert_margin.labels(m.model).set(settings.grounding_alert_margin)
    m.control_arm.labels(m.model, state.experiment.control if state.experiment else DEFAULT_ARM).set(1)
    state.scheduler.start()
    state.ready = True


def log_offer(state: State) -> None:
    """The start-up lines: the methods offered and the model names that choose them, then each registered
    method not offered and why (a missing reward model or verifier, an engine that cannot run it)."""
    settings, profiles = state.settings, state.profiles
    log.info("serving %s on the %s engine: steering methods %s; models %s", settings.model_name,
             settings.engine, ", ".join(state.methods), ", ".join(profiles.models))
    for name, why in getattr(state.engine, "unavailable", {}).items():
        log.warning("steering method %r not offered: %s", name, why)
    for name, why in profiles.unavailable.items():
        log.warning("steering profile %r of %s not offered: %s", name, settings.profiles, why)


async def load(state: State, engine=None) -> None:
    """``start`` in the background of an open port: /health answers 503 (loading) meanwhile. A failure is
    logged and kept in ``state.load_error`` (``server.serve`` then exits 3, uvicorn's start-up failure;
    /health says failed)."""
    try:
        await start(state, engine)
    except Exception as e:
        state.load_error = e
        log.error("loading failed: %s", e, exc_info=e)


def stop(state: State, owns_engine: bool) -> None:
    """Drain: refuse new requests, stop the scheduler, release the engine this app started. While still
    loading: end the engine process at once (a load in this process's thread finishes before exit)."""
    state.draining = True
    if state.scheduler is not None:
        if not state.ready and hasattr(state.scheduler, "kill"):
            state.scheduler.kill()
        else:
            state.scheduler.stop()
    if state.service is not None:
        state.service.close()
    if state.judging is not None:
        state.judging.close()
    if owns_engine and state.engine is not None and hasattr(state.engine, "close"):
        state.engine.close()


def create_app(settings: Settings, engine=None) -> FastAPI:
    """The app; its lifespan starts loading (``load``) and returns at once, so that the server binds its
    port before the models are loaded (as Kubernetes probes and readiness scripts expect: 503, then 200)."""
    state = State(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(load(state, engine))
        period = min(0.25, settings.engine_stall_timeout / 4)  # sampling the heartbeat (server.supervision)
        supervisor = asyncio.create_task(supervise(state, period), name="vlm-steer-supervisor")
        yield
        supervisor.cancel()  # before the engine stops: a stopped engine is no dead one
        if not loading.done():
            loading.cancel()
        stop(state, owns_engine=engine is None)

    app = FastAPI(title="vlm-steer", version="0.1.0", lifespan=lifespan)
    app.state.vlm = state
    app.include_router(routes.router)
    add_error_handlers(app, state)
    # between the error handlers (inside it) and uvicorn: its 408 is answered by _api_error
    app.add_middleware(BodyDeadline, timeout=settings.body_timeout)
    if settings.allowed_origins:
        # outermost: a preflight is answered before anything else, and every answer (errors included) carries
        # the CORS headers its origin may read
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"],  # as vLLM: the OpenAI SDKs send their own x-stainless-* headers
                           expose_headers=["X-Request-Id", "X-Steering-Arm", "Retry-After"])

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(routes.COMPONENTS)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def add_error_handlers(app: FastAPI, state: State) -> None:
    """Every error in the OpenAI shape (``server.errors.APIError``), counted, with the request id; a 500
    logs its traceback with that id."""

    def request_id(request: Request) -> str:
        """The request's id: the one chat serving gave it, the client's, or one assigned here (an error
        before chat serving ran, e.g. while loading), so that every error carries one and a 500's log line too."""
        rid = getattr(request.state, "request_id", None) or client_request_id(request)
        if rid is None:
            rid = request.state.request_id = f"req-{uuid.uuid4().hex}"
        return rid

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        state.metrics.errors.labels(state.metrics.model, str(e.status)).inc()
        rid = request_id(request)
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
        log_failure(request.method, request.url.path, request_id(request), e)
        return await _api_error(request, APIError(500, "internal server error"))
