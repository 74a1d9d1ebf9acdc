"""The OpenAI chat-completions schema (the parts this server honours), plus the ``steering`` extension."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None


class Steering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = "none"
    strength: float | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    steering: Steering | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says
    # OpenAI fields this server does not implement: refused with a 400 naming them, never silently ignored
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None  # {"type": "text"} (the default) is accepted
    tools: list | None = None
    tool_choice: str | dict | None = None  # "none" is accepted
    functions: list | None = None
    function_call: str | dict | None = None

    @field_validator("logit_bias", "response_format", "tools", "tool_choice", "functions", "function_call")
    @classmethod
    def _unsupported(cls, v, info):
        harmless = {"response_format": {"type": "text"}, "tool_choice": "none"}.get(info.field_name)
        if v and v != harmless:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be from the assistant")
        return self


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def openapi_chat_completions() -> dict:
    """The chat route's OpenAPI (request body and responses): the body is parsed by hand (so that
    oversized or invalid bodies get OpenAI-shaped 413/400 errors), so FastAPI cannot infer it."""
    ref = "#/components/schemas/{model}"
    request = ChatCompletionRequest.model_json_schema(ref_template=ref)
    error = ErrorResponse.model_json_schema(ref_template=ref)
    components = {**request.pop("$defs", {}), **error.pop("$defs", {}),
                  "ChatCompletionRequest": request, "ErrorResponse": error}
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    errors = {str(c): {"description": d, **err} for c, d in (
        (400, "Invalid request"), (401, "Missing or invalid API key"), (404, "Unknown model"), (413, "Body or image too large"),
        (429, "Queue full"), (500, "Generation or steering failed"), (503, "Loading or draining"), (504, "Deadline passed"))}
    ok = {"description": "A chat.completion object, or a text/event-stream of chat.completion.chunk objects",
          "content": {"application/json": {"schema": {"type": "object", "required": ["id", "object", "choices"]}},
                      "text/event-stream": {"schema": {"type": "string"}}}}
    return {"requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
            "responses": {"200": ok, **errors}, "x-components": components}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
