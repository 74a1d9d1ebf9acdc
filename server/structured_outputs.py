"""The request fields that constrain a completion's form, as OpenAI and vLLM spell them, into one
``decoding.grammar.StructuredOutput``:

- OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any JSON
  object), ``{"type": "json_schema", "json_schema": {"name", "description", "schema", "strict"}}``;
- vLLM 0.32's ``structured_outputs``: ``{"json" | "regex" | "choice" | "grammar" | "json_object": ...}``
  (``vllm.sampling_params.StructuredOutputsParams``);
- vLLM's earlier spellings ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar`` (vLLM 0.32
  ignores them with a warning; here they constrain, as they did), ``guided_decoding_backend`` naming
  xgrammar (or ``auto``).

One constraint per request (as vLLM: "You can only use one kind of structured outputs constraint");
options this server does not implement are a 400 naming them, never ignored.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from decoding.grammar import StructuredOutput
from server.errors import APIError

FORBID = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
BACKENDS = ("auto", "xgrammar")  # what guided_decoding_backend may name: the library both engines use


class JsonSchema(BaseModel):
    """OpenAI's ``response_format.json_schema``."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, JsonValue] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # every schema is enforced by the grammar, strict or not (as vLLM)


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``."""

    model_config = FORBID
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StructuredOutputsParams(BaseModel):
    """vLLM 0.32's ``structured_outputs`` request field (``vllm.sampling_params.StructuredOutputsParams``)."""

    model_config = FORBID
    json_: str | dict[str, JsonValue] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's options, refused unless at their no-op values (both engines' xgrammar set-up is fixed)
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


def _schema(value, param: str) -> str:
    """A JSON schema (an object, or its JSON text) as JSON text, key order kept."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise APIError(400, f"{param}: not valid JSON ({e})", param=param) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{param}: a JSON schema must be an object", param=param)
    return json.dumps(value)


def _constraint(kind: str, value, param: str) -> StructuredOutput:
    if kind == "json":
        return StructuredOutput("json", _schema(value, param))
    if kind == "json_object":
        if value is not True:
            raise APIError(400, f"{param}: must be true if set (omit it for no constraint)", param=param)
        return StructuredOutput("json_object")
    if kind == "choice":
        if not value:
            raise APIError(400, f"{param}: the choices cannot be an empty list", param=param)
        return StructuredOutput("choice", json.dumps(value))
    if kind == "grammar" and not value.strip():
        raise APIError(400, f"{param}: the grammar cannot be empty", param=param)
    if kind == "regex" and "\x00" in value:
        raise APIError(400, f"{param}: must not contain a NUL character", param=param)
    return StructuredOutput(kind, value)


def structured_output(req) -> tuple[StructuredOutput, str] | None:
    """The request's constraint and the field it came from (for errors), or None; ``APIError`` 400 for
    several constraints, an empty one, or an option this server does not implement."""
    found: list[tuple[StructuredOutput, str]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append((StructuredOutput("json_object"), "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            param = "response_format.json_schema" + (".schema" if rf.json_schema is not None else "")
            raise APIError(400, f"{param}: required when response_format.type is 'json_schema'", param=param)
        found.append((_constraint("json", rf.json_schema.schema_, "response_format.json_schema.schema"),
                      "response_format"))
    so = req.structured_outputs
    if so is not None:
        for option, noop in (("disable_any_whitespace", False), ("disable_additional_properties", False),
                             ("whitespace_pattern", None), ("structural_tag", None)):
            if getattr(so, option) != noop:
                param = f"structured_outputs.{option}"
                raise APIError(400, f"{param}: not supported by this server", param=param)
        kinds = [(k, getattr(so, "json_" if k == "json" else k)) for k in ("json", "regex", "choice", "grammar", "json_object")]
        set_ = [(k, v) for k, v in kinds if v is not None]
        if not set_:
            raise APIError(400, "structured_outputs: give one constraint (json, regex, choice, grammar or "
                                "json_object)", param="structured_outputs")
        found += [(_constraint(k, v, f"structured_outputs.{k}"), "structured_outputs") for k, v in set_]
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{kind}", None)
        if value is not None:
            found.append((_constraint(kind, value, f"guided_{kind}"), f"guided_{kind}"))
    backend = getattr(req, "guided_decoding_backend", None)
    if backend is not None and backend not in BACKENDS:
        raise APIError(400, f"guided_decoding_backend: {backend!r} is not available; this server decodes with "
                            "xgrammar", param="guided_decoding_backend")
    if getattr(req, "guided_whitespace_pattern", None) is not None:
        raise APIError(400, "guided_whitespace_pattern: not supported by this server", param="guided_whitespace_pattern")
    if len(found) > 1:
        names = ", ".join(dict.fromkeys(p for _, p in found))
        raise APIError(400, f"only one structured-output constraint per request; this one has several ({names})",
                       param=found[1][1])
    return found[0] if found else None
