"""Steering profiles: steering chosen by model name, the way vLLM lists each LoRA adapter as a model.

Clients that send only ``model``, ``messages`` and sampling fields (lmms-eval's ``openai`` model,
VLMEvalKit, LiteLLM proxies, LangChain) cannot send the ``steering`` extension; they can name a profile.
``/v1/models`` lists the served model (``vlm``) and, after it, one model per profile ``vlm:NAME``:

- ``vlm:none``: the plain model (unlike ``vlm``, it also overrides an unlocked experiment's arm);
- one per steering method the loaded models can run and every combination of them, joined by ``+`` in
  application order (``vlm:tita``, ``vlm:fisao``, ``vlm:vcd``, ``vlm:tita+fisao``, ...), each at the
  method's default strength;
- the profiles of the ``--profiles`` file, each a method (or combination) and its strength::

      profiles:
        tita-strong: {method: tita, strength: 1.0}
        gentle: {method: tita+fisao, strength: 0.5}

  A file profile whose method these models cannot run (``vcd`` on the vllm engine, ``fisao`` without a
  verifier) is left out with a log line, so one file serves every engine; an unknown method, a strength
  out of range or a name of the built-in ones is refused at start.

Which steering a request gets, first match wins: a locked experiment's arm; the body's ``steering`` when
it names a ``method``; the profile (a body ``steering`` with only ``strength`` or ``explain`` keeps the
profile's method, with that strength); an unlocked experiment's arm. The response's ``model`` echoes the
name asked for; the metrics keep the served model in their ``model`` label (per-model alerts stay valid),
the method in ``method`` and the profile's model name (``vlm:tita``) in ``arm``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, StringConstraints, model_validator

from decoding.methods import REGISTRY, strength_of
from decoding.request import SteeringSpec
from server.errors import APIError

SEP = ":"  # served model name SEP profile name (vLLM's LoRA adapters have names of their own; ours share the model's)
NAME = r"^[A-Za-z0-9_.+-]{1,40}$"


def builtin_name(name: str) -> bool:
    """Whether a profile name is one the server lists by itself (``none``, a method or a combination)."""
    return name == "none" or all(p in REGISTRY for p in name.split("+"))


class ProfileSpec(BaseModel):
    """One profile of the ``--profiles`` file: a steering method (or ``+``-joined combination) and its
    strength (default: each method's own; a combination applies it to each part)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
    method: str
    strength: float | None = None

    @model_validator(mode="after")
    def _known(self):
        parts = self.method.split("+")
        unknown = [p for p in parts if p not in REGISTRY]
        if self.method != "none" and unknown:
            raise ValueError(f"unknown steering method {unknown[0]!r} (methods: none, {', '.join(REGISTRY)})")
        if len(set(parts)) != len(parts):
            raise ValueError(f"{self.method!r} names a method twice")
        if self.method != "none":
            for p in parts:  # ValueError: out of the method's range
                strength_of(REGISTRY[p], self.strength)
        return self


class ProfilesFile(BaseModel):
    """The ``--profiles`` file (YAML or JSON): ``{"profiles": {name: {"method", "strength"}}}``."""

    model_config = ConfigDict(extra="forbid")
    profiles: dict[Annotated[str, StringConstraints(pattern=NAME)], ProfileSpec]

    @model_validator(mode="after")
    def _not_builtin(self):
        taken = [n for n in self.profiles if builtin_name(n)]
        if taken:
            raise ValueError(f"profile name {taken[0]!r} is one the server lists by itself (none, a method, or "
                             "methods joined by '+'); give it another name")
        return self

    @classmethod
    def load(cls, path: Path) -> "ProfilesFile":
        """Read and check a profiles file; pydantic's ValidationError names the profile and field at fault."""
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data)


@dataclass(frozen=True)
class Profile:
    """A model name that steers: ``model`` (``vlm:tita``), the spec it asks for, and the strengths the engine
    resolved for it (method -> strength, in application order; empty for none)."""

    model: str
    method: str
    strength: float | None
    strengths: dict

    def spec(self, strength: float | None = None, explain: bool = False) -> SteeringSpec:
        return SteeringSpec(self.method, self.strength if strength is None else strength, explain)


def combinations(methods: list[str]) -> list[str]:
    """Every non-empty combination of ``methods`` (registry order), singles first: ``["tita", "fisao",
    "tita+fisao"]`` for two."""
    return ["+".join(c) for r in range(1, len(methods) + 1) for c in itertools.combinations(methods, r)]


class Profiles:
    """The profiles one server lists, built once the engine is loaded (``engine.resolve`` settles each
    profile's strengths, so a profile listed is one that runs). ``unavailable``: file profiles left out,
    and why."""

    def __init__(self, served: str, engine, file: ProfilesFile | None = None):
        self.served = served
        runnable = [m for m in engine.available_methods if m != "none"]
        wanted = [("none", None), *((m, None) for m in combinations(runnable))]
        wanted += [(name, p) for name, p in (file.profiles.items() if file else ())]
        self.by_model: dict[str, Profile] = {}
        self.unavailable: dict[str, str] = {}
        for name, p in wanted:
            method, strength = (name, None) if p is None else (p.method, p.strength)
            try:
                strengths = engine.resolve(SteeringSpec(method, strength))
            except ValueError as e:  # a file profile whose method these models cannot run
                self.unavailable[name] = str(e)
                continue
            model = f"{served}{SEP}{name}"
            self.by_model[model] = Profile(model, method, strength, strengths)

    @property
    def models(self) -> list[str]:
        """Every model name this server answers to: the served model first, then its profiles."""
        return [self.served, *self.by_model]

    def get(self, model: str) -> Profile | None:
        """The profile a request's ``model`` names (None for the served model itself); 404 for a name this
        server does not serve."""
        if model == self.served:
            return None
        profile = self.by_model.get(model)
        if profile is None:
            shown = model if len(model) <= 200 else model[:200] + "..."  # a name of any length is echoed bounded
            raise APIError(404, f"the model {shown!r} does not exist; this server serves {self.served!r} and its "
                                f"steering profiles ({', '.join(list(self.by_model)[:8])}, ...: GET /v1/models)",
                           param="model")
        return profile

    def card(self, model: str) -> dict:
        """A profile's ``/v1/models`` entry: OpenAI's model object, ``root``/``parent`` the served model (as
        vLLM's LoRA cards), and the steering it applies (``strength``: method -> strength, null for none)."""
        p = self.by_model[model]
        return {"id": model, "object": "model", "created": 0, "owned_by": "vlm-steer", "root": self.served,
                "parent": self.served, "steering": {"method": "+".join(p.strengths) or "none", "strength": p.strengths or None}}
