"""The OpenAI chat-completions schema (the parts this server honours), plus the ``steering`` extension."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from server.structured_outputs import ResponseFormat, StructuredOutputsParams


# Every field is strictly typed, as OpenAI checks them: "2" is not an integer, 1 is not a boolean, and
# NaN or Infinity is no number (pydantic's lax mode would coerce them and serve the request).
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")
TOKEN_ID = re.compile(r"\s*-?[0-9]{1,18}\s*")  # a logit_bias key: a decimal token id (its range is the model's)
INT64 = (-(2**63), 2**63 - 1)
NEEDS = {"top_logprobs": ("logprobs", "top_logprobs requires logprobs to be true"),
         "stream_options": ("stream", "stream_options is only allowed when stream is true")}

# The one place that decides what happens to a top-level field ``ChatCompletionRequest`` does not declare
# (``_fields_not_declared``); declared fields are served or type-checked. Any name in none of these is a
# 400 naming it, as OpenAI answers "Unrecognized request argument supplied" (vLLM ignores such names with
# a warning; here a field that asks for something is never ignored in silence).
#   ASK_NOTHING: OpenAI's and vLLM's fields that ask for nothing this server would do differently (caching
#     and routing hints, a latency hint whose answer is the same, vLLM's render-endpoint options): accepted.
#   NOT_SERVED: field -> the values at which it asks for nothing (accepted, so that clients that always send
#     them work); any other value is a 400 naming the field.
ASK_NOTHING = frozenset({"prompt_cache_key", "prompt_cache_retention", "safety_identifier", "prediction", "session_id",
                         "mm_payload", "return_mm_kwargs", "routed_experts_prompt_start"})
NOT_SERVED: dict[str, tuple] = {
    # OpenAI's
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "modalities": (None, ["text"]), "audio": (None,), "web_search_options": (None,), "reasoning_effort": (None,),
    "verbosity": (None, "medium"),
    # vLLM's
    "best_of": (None, 1), "use_beam_search": (None, False), "length_penalty": (None, 1.0), "echo": (None, False),
    "watermarking": (None, False), "include_stop_str_in_output": (None, False), "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "truncate_prompt_tokens": (None,), "truncation_side": (None,),
    "prompt_logprobs": (None,), "logprob_token_ids": (None, []), "allowed_token_ids": (None,), "bad_words": (None, []),
    "add_generation_prompt": (None, True), "continue_final_message": (None, False), "add_special_tokens": (None, False),
    "documents": (None,), "chat_template": (None,), "chat_template_kwargs": (None, {}), "media_io_kwargs": (None, {}),
    "mm_processor_kwargs": (None, {}), "priority": (None, 0), "request_id": (None,), "cache_salt": (None,),
    "kv_transfer_params": (None,), "ec_transfer_params": (None,), "vllm_xargs": (None, {}),
    "return_tokens_as_token_ids": (None, False), "return_token_ids": (None, False), "return_token_offsets": (None, False),
    "return_prompt_text": (None, False), "thinking_token_budget": (None,), "include_reasoning": (None, True),
    "repetition_detection": (None,), "stream_interval": (None, 1), "logits_processors": (None,),
    "structural_tag": (None,),
}


def asks_nothing(value, no_ops: tuple) -> bool:
    """Whether ``value`` is one of ``no_ops`` as JSON compares them (``true`` is not ``1``, ``1`` is ``1.0``)."""
    return any(value == x and isinstance(value, bool) == isinstance(x, bool) for x in no_ops)


def undeclared_field_problem(name: str, value) -> str | None:
    """Why an undeclared top-level field is refused, or None when it is accepted (see ``NOT_SERVED``)."""
    if name in ASK_NOTHING:
        return None
    if name in NOT_SERVED:
        no_ops = NOT_SERVED[name]
        if asks_nothing(value, no_ops):
            return None
        accepted = ", ".join(json.dumps(x) for x in no_ops)
        return f"{name} is not supported by this server (it accepts only {accepted})"
    return "unrecognized request argument: this server does not implement it"


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
    # vLLM's sampling extensions (its SamplingParams' ranges; null: the checkpoint's generation_config default)
    top_k: int | None = Field(default=None, ge=-1, le=INT64[1])  # -1 or 0: no cut
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int | None = Field(default=None, ge=0, le=INT64[1])  # at most max_tokens (checked with it)
    stop_token_ids: list[int] | None = None  # token ids inside the vocabulary (checked with the model)
    # structured outputs (server.structured_outputs): OpenAI's response_format, vLLM's structured_outputs and
    # its earlier guided_* spellings; one constraint per request
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: str | dict[str, JsonValue] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _fields_not_declared(cls, data):
        """Top-level names the schema does not declare, decided in one place (``undeclared_field_problem``):
        accepted ones leave the body, the first refused one is a 400 naming it."""
        if not isinstance(data, dict) or all(k in cls.model_fields for k in data):
            return data
        for name, value in data.items():
            problem = None if name in cls.model_fields else undeclared_field_problem(name, value)
            if problem is not None:
                # a ValidationError raised here keeps its location (``param`` in the 400)
                raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                    type=PydanticCustomError("unsupported_field", problem), loc=(name,), input=value)])
        return {k: v for k, v in data.items() if k in cls.model_fields}

    @field_validator("n", "stream", "logprobs", "ignore_eos", mode="before")
    @classmethod
    def _null_is_the_default(cls, v, info):
        """OpenAI's schema makes these nullable: null means the default."""
        return cls.model_fields[info.field_name].default if v is None else v

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
