"""The HTTP routes, each a few lines over the server's ``State`` (``request.app.state.vlm``):
/v1/chat/completions (``server.serving_chat``), /v1/models, /health (liveness), /ready (readiness), /metrics and
the playground."""

from __future__ import annotations

import base64
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import auth, supervision
from server.protocol import openapi_chat_completions
from server.errors import APIError

PLAYGROUND = Path(__file__).resolve().parent / "static" / "playground.html"
CHAT_API = openapi_chat_completions()
COMPONENTS = CHAT_API.pop("x-components")  # schemas the chat route's OpenAPI refers to (merged by the app)
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}

router = APIRouter()


def _state(request: Request):
    return request.app.state.vlm


def authorize(request: Request) -> None:
    auth.authorize(request, _state(request).settings.api_keys)


def model_card(state, model: str | None = None) -> dict:
    """``/v1/models``' entry of the served model (``model`` None or its name) or of one of its steering
    profiles (``server.profiles``); 404 for a name this server does not serve, 503 while loading."""
    if not state.ready:
        raise APIError(503, "the server is loading its models")
    if model is None or state.profiles.get(model) is None:
        return {"id": state.settings.model_name, "object": "model", "created": 0, "owned_by": "vlm-steer",
                "steering_methods": state.methods}
    return state.profiles.card(model)


@router.post("/v1/chat/completions", openapi_extra=CHAT_API, responses={})
async def chat(request: Request):
    state = _state(request)
    if state.chat is None:  # the port opens before the models load (server.app.load): loading, or its load failed
        authorize(request)
        raise APIError(503, "the server failed to load its models" if state.load_error else state.refusal())
    return await state.chat.create(request)


@router.get("/health", responses={200: {"description": "Alive: serving (`ok`) or draining (`draining`)"},
                                  503: {"description": "The engine is dead (`engine down`) or has requests and has not "
                                                       "stepped for --engine-stall-timeout (`engine stalled`)"}})
async def health(request: Request):
    """Liveness (``server.supervision``): whether this server should be restarted."""
    status, details = supervision.liveness(_state(request))
    return JSONResponse({"status": status, **details}, status_code=200 if status in ("ok", "draining") else 503)


@router.get("/ready", responses={200: {"description": "Serving"},
                                 503: {"description": "Loading, draining, or the engine is down or stalled"}})
async def ready(request: Request):
    """Readiness (``server.supervision``): whether this server takes requests now."""
    status, details = supervision.readiness(_state(request))
    return JSONResponse({"status": status, **details}, status_code=200 if status == "ready" else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition",
                             "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    state = _state(request)
    text = generate_latest(state.metrics.registry)
    if state.engine is not None and state.engine.name == "vllm":  # vLLM's own vllm:* families beside ours
        from prometheus_client import REGISTRY

        text += generate_latest(REGISTRY)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", responses={401: {"description": "Missing or invalid API key", "content": _ERROR}})
async def models(request: Request):
    authorize(request)
    state = _state(request)
    return {"object": "list", "data": [model_card(state, m) for m in (state.profiles.models if state.ready else [None])]}


@router.get("/v1/models/{model:path}", responses={401: {"description": "Missing or invalid API key", "content": _ERROR},
                                                  404: {"description": "Unknown model", "content": _ERROR}})
async def model(model: str, request: Request):
    """One model (the openai client's ``models.retrieve``)."""
    authorize(request)
    return model_card(_state(request), model)


@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def playground():
    return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))


@router.get("/playground/examples", include_in_schema=False)
async def playground_examples(request: Request):
    """The example images (data URLs) and the default question of the playground."""
    folder = _state(request).settings.playground_examples
    if folder is None or not Path(folder).is_dir():
        return {"prompt": None, "images": []}
    images = []
    for f in sorted(Path(folder).iterdir()):
        kind = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}.get(f.suffix.lower())
        if kind:
            images.append({"name": f.name, "url": f"data:image/{kind};base64," + base64.b64encode(f.read_bytes()).decode()})
    prompt = Path(folder) / "prompt.txt"
    return {"prompt": prompt.read_text().strip() if prompt.exists() else None, "images": images}
