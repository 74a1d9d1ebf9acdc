"""The OpenAI chat-completions schema (the parts this server honours), plus the ``steering`` extension."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


# Every field is strictly typed, as OpenAI checks them: "2" is not an integer, 1 is not a boolean, and
# NaN or Infinity is no number (pydantic's lax mode would coerce them and serve the request).
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")
TOKEN_ID = re.compile(r"\s*-?[0-9]{1,18}\s*")  # a logit_bias key: a decimal token id (its range is the model's)
INT64 = (-(2**63), 2**63 - 1)
NEEDS = {"top_logprobs": ("logprobs", "top_logprobs requires logprobs to be true"),
         "stream_options": ("stream", "stream_options is only allowed when stream is true")}
# Values of unimplemented fields that change nothing (so clients that always send them still work)
NO_OPS = {"response_format": ({"type": "text"},), "tool_choice": ("none",), "top_k": (-1, 0), "min_p": (0, 0.0),
          "min_tokens": (0,), "repetition_penalty": (1, 1.0), "best_of": (1,), "use_beam_search": (False,),
          "echo": (False,)}  # OpenAI's seed is a signed 64-bit integer (as torch's generator seeds)


class ImageURL(BaseModel):
    model_config = STRICT
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = STRICT
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _images_from_users_only(self):
        if self.role != "user" and isinstance(self.content, list) and any(p.type == "image_url" for p in self.content):
            raise ValueError(f"image_url parts are only allowed in user messages (this one is from the {self.role})")
        return self


class Steering(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
    method: str = "none"
    strength: float | None = None
    explain: bool = False  # per generated token: the unsteered top token, both log-probs, each method's part


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage so far on every chunk (with include_usage)


class ChatCompletionRequest(BaseModel):
    model_config = STRICT
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)  # 0: the top token only
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]
    user: str | None = None
    # OpenAI fields that change nothing here, typed so that a wrong type is still a 400
    store: bool | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    # extensions
    steering: Steering | None = None
    grounding: bool | None = None  # a grounding block per choice (null: the server's grounding_default)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says
    # OpenAI fields this server does not implement: refused with a 400 naming them, never silently ignored
    response_format: dict | None = None  # {"type": "text"} (the default) is accepted
    tools: list | None = None
    tool_choice: str | dict | None = None  # "none" is accepted
    functions: list | None = None
    function_call: str | dict | None = None
    # vLLM's sampling extensions this server does not implement: refused unless at their no-op values
    top_k: Any = None
    min_p: Any = None
    min_tokens: Any = None
    repetition_penalty: Any = None
    best_of: Any = None
    use_beam_search: Any = None
    echo: Any = None

    @field_validator("n", "stream", "logprobs", "ignore_eos", mode="before")
    @classmethod
    def _null_is_the_default(cls, v, info):
        """OpenAI's schema makes these nullable: null means the default."""
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("response_format", "tools", "tool_choice", "functions", "function_call", "top_k", "min_p",
                     "min_tokens", "repetition_penalty", "best_of", "use_beam_search", "echo")
    @classmethod
    def _unsupported(cls, v, info):
        name = info.field_name
        if v is None or v in NO_OPS.get(name, ()) or (not v and name in ("tools", "tool_choice", "functions", "function_call",
                                                                        "response_format")):
            return v
        raise ValueError(f"{name} is not supported by this server")

    @field_validator("top_logprobs", "stream_options")
    @classmethod
    def _needs_its_switch(cls, v, info):
        """Fields that only mean something when a boolean before them is true (the error names the field)."""
        switch, message = NEEDS[info.field_name]
        if v is not None and not info.data.get(switch):
            raise ValueError(message)
        return v

    @field_validator("messages")
    @classmethod
    def _last_message(cls, v):
        if v and v[-1].role == "assistant":
            raise ValueError("the last message must not be from the assistant")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        """OpenAI's map of token ids to biases in [-100, 100] (the ids' range is the model's: checked later)."""
        for key, bias in (v or {}).items():
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f"keys must be token ids (decimal integers), not {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} is {bias:g}; biases lie in [-100, 100]")
        return v

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(k): float(b) for k, b in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v



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
        (400, "Invalid request"), (401, "Missing or invalid API key"), (404, "Unknown model"), (413, "Body or image too large"), (415, "Body is not application/json"),
        (429, "Queue full"), (500, "Generation or steering failed, or the engine died"), (503, "Loading, draining (its deadline passed), or the engine is down"),
        (504, "Deadline passed"))}
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
