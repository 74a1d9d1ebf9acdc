"""The chat-completions handler behind ``POST /v1/chat/completions`` (as vLLM's ``OpenAIServingChat``):
body -> checks and engine rows (``server.chat_service``) -> the request's arm and steering -> the
scheduler -> one ``chat.completion`` or a stream (``server.chat_run``), with the grounding judge beside
the generation."""

from __future__ import annotations

import asyncio
import random
import time

from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from decoding.methods import SteeringFailed
from decoding.request import SteeringSpec
from server.auth import authorize, client_request_id
from server.chat_run import Reply, Run, complete, engine_error, sink_for, stream
from server.chat_service import check_media_type
from server.errors import APIError
from server.experiments import DEFAULT_ARM, EXPLICIT_ARM
from server.profiles import Profile
from server.protocol import ChatCompletionRequest, completion_id, now
from server.scheduler import QueueFull
from server.sse import EventStreamResponse


class ChatServing:
    """``await serving.create(request)``: the response to one chat-completions request, or an ``APIError``
    (the app's handlers turn it into the OpenAI error shape). ``state``: the server's ``State``."""

    def __init__(self, state):
        self.state = state
        self.settings = state.settings

    async def create(self, request: Request) -> Response:
        state, settings = self.state, self.settings
        arrival = time.monotonic()
        created = now()  # one value for the whole completion, every chunk of a stream included
        cid = completion_id()
        request.state.request_id = client_request_id(request) or cid
        authorize(request, settings.api_keys)
        if not state.accepting:
            raise APIError(503, state.refusal())
        try:
            req = await self._body(request)
        except ClientDisconnect:  # the client went away while sending its body: nothing to answer, no fault
            return Response(status_code=499)
        profile = state.profiles.get(req.model)  # 404 for a name not served; None: the served model itself
        if req.grounding and state.judge is None:
            raise APIError(400, "grounding needs a calibrated grounding verifier, and this server has none "
                                "(--grounding-verifier)", param="grounding")
        arm, spec = self._arm(req, profile)
        try:
            strengths = state.engine.resolve(spec)
        except ValueError as e:
            raise APIError(400, str(e), param="steering") from None
        try:
            prepared = await state.service.prepare(req, spec, cid)
        except SteeringFailed as e:  # an engine that starts steering at admission (vllm: FiSAO's verifier)
            state.on_failure(e)
            raise engine_error(e) from None

        method = "+".join(strengths) or "none"  # in application order: "fisao+tita" is "tita+fisao"
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
                  arrival + settings.request_timeout, request.state.request_id, registry=state.runs)
        images = prepared.rows[0].request.images
        show = settings.grounding_default if req.grounding is None else req.grounding
        p = settings.grounding_sample
        judged = state.judge is not None and images and (show or random.random() < p)
        scores = state.judging.scores(images) if judged else None  # beside the generation, off the event loop
        reply = Reply(cid, created, req.model, steering_info, state.engine.tokenizer, state.judge, scores,
                      show, spec.explain, weight=1.0 if show else 1.0 / p if p > 0 else 0.0)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            continuous = include_usage and req.stream_options.continuous_usage_stats
            return EventStreamResponse(stream(run, reply, include_usage, req.n, continuous), headers=headers)
        return await complete(run, request, reply, headers)

    async def _body(self, request: Request) -> ChatCompletionRequest:
        """The validated body: 415 for a media type other than JSON, 413 past ``--max-body-bytes`` (counted
        while reading, whatever Content-Length says), 400 for the schema."""
        limit = self.settings.max_body_bytes
        check_media_type(request.headers.get("content-type"))
        if int(request.headers.get("content-length") or 0) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"request body exceeds {limit} bytes")
        return await self.state.service.parse(bytes(raw))

    def _arm(self, req: ChatCompletionRequest, profile: Profile | None = None) -> tuple[str, SteeringSpec]:
        """The request's arm and steering, first match wins (``server.profiles``): a locked experiment's
        arm; the body's ``steering`` (with a profile: when it names a ``method``); the profile (arm: its
        model name, ``vlm:tita``); an unlocked experiment's arm. ``explain`` is the request's own whatever
        the arm (it changes no arm's decoding)."""
        exp = self.state.experiment
        body = req.steering
        explain = bool(body and body.explain)
        if exp is not None and exp.locked:
            arm = exp.assign(req.user)
            return arm.name, SteeringSpec(arm.steering.method, arm.steering.strength, explain)
        if body is not None and body.strength is not None and (
                body.method == "none" if (profile is None or "method" in body.model_fields_set) else profile.spec().method == "none"):
            # a strength for no method would be dropped in silence
            raise APIError(400, "steering.strength needs a steering method (steering.method, or a model name such as "
                                f"{self.state.settings.model_name}:tita)", param="steering.strength")
        if body is not None and (profile is None or "method" in body.model_fields_set):
            return (EXPLICIT_ARM if exp else DEFAULT_ARM), SteeringSpec(body.method, body.strength, explain)
        if profile is not None:  # a body steering without a method keeps the profile's, at the body's strength
            return profile.model, profile.spec(body.strength if body else None, explain)
        if exp is not None:
            arm = exp.assign(req.user)
            return arm.name, SteeringSpec(arm.steering.method, arm.steering.strength, explain)
        return DEFAULT_ARM, SteeringSpec(explain=explain)
