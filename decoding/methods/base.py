"""What a steering method is, and the registry that names them.

A method keeps batched state for the rows that use it (in batch order) and follows the batch
through the engine's verbs: ``start`` when rows join (usually at prefill, with no generated tokens; a
row may also join mid-answer, its ``token_ids`` generated so far), ``steer`` on their logits each step,
``advance`` with the tokens chosen, ``select`` when rows leave, ``merge`` when rows join.
The same method objects serve both engines: the transformers engine calls the verbs from its step loop,
vLLM's logits processor from its batch updates (``decoding.vllm.adapter``).
A new method is one file with a subclass plus ``@register``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

REGISTRY: dict[str, type["SteeringMethod"]] = {}


def register(cls: type["SteeringMethod"]) -> type["SteeringMethod"]:
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Resources:
    """What methods may use: the target engine and, when configured, the reward engine and verifier."""

    target: Any
    reward: Any = None  # a TransformersEngine over the TITA reward model
    verifier: Any = None  # a decoding.verifier.Verifier


class SteeringMethod(ABC):
    name: ClassVar[str]
    default_strength: ClassVar[float]
    strength_range: ClassVar[tuple[float, float]]
    needs: ClassVar[tuple[str, ...]] = ()  # resources that must be present ("reward", "verifier")
    # Whether ``start`` reads the request's decoded images (``row.request.images``), rather than only the
    # row's pixels and the target's vision-tower outputs. The engine process receives a request's images
    # only for rows whose methods read them (a large image costs the API's event loop to pickle and send).
    reads_images: bool = False

    def __init__(self, resources: Resources):
        self.resources = resources

    @classmethod
    def unavailable(cls, resources: Resources) -> str | None:
        """Why this method cannot run with these resources (None: it can)."""
        missing = [n for n in cls.needs if getattr(resources, n) is None]
        return f"needs {', '.join(missing)}, not configured" if missing else None

    def start(self, rows: list) -> Any:
        return None

    @abstractmethod
    def steer(self, state: Any, rows: list, logits: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """Scores that replace these rows' logits (rows in batch order, strength per row)."""

    def advance(self, state: Any, rows: list, tokens: torch.Tensor) -> None:
        return None

    def select(self, state: Any, keep: list[int]) -> Any:
        return state

    def merge(self, a: Any, b: Any) -> Any:
        return a


class SteeringFailed(RuntimeError):
    """A steering method (its reward model, verifier, ...) raised for these rows."""

    def __init__(self, method: str, cause: Exception):
        super().__init__(f"steering method {method!r} failed ({type(cause).__name__})")
        self.method, self.cause = method, cause

    def __reduce__(self):  # crosses the engine process's pipe with its method, cause and attributes
        return SteeringFailed, (self.method, self.cause), self.__dict__


def same_weights(a: torch.nn.Module | None, b: torch.nn.Module | None) -> bool:
    """Whether two modules hold the same parameters and buffers (names, shapes, values)."""
    if a is None or b is None:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k].to(sb[k]), sb[k]) for k in sa)


def vision_tower(model) -> torch.nn.Module | None:
    """A Llava model's vision tower (its CLIP vision transformer), or None."""
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    return getattr(tower, "vision_model", tower)


def usable_methods(resources: Resources, names=None) -> dict[str, type[SteeringMethod]]:
    """The registered methods (of ``names``, default all) these resources can run, in registry order."""
    return {n: cls for n, cls in REGISTRY.items() if (names is None or n in names) and cls.unavailable(resources) is None}


class UnknownMethod(ValueError):
    """A steering method that is not registered, or that this engine cannot run (its reward model or verifier
    is not configured)."""


def method_parts(method: str, usable=None) -> list[str]:
    """The registered methods a name joins with '+' ([] for "none"); ``UnknownMethod`` for a name not
    registered or a method named twice. ``usable``: what the error lists as available (default: all)."""
    if method == "none":
        return []
    parts = method.split("+")
    if any(p not in REGISTRY for p in parts):
        raise UnknownMethod(f"unknown steering method {method!r}; available: {['none', *(usable if usable is not None else REGISTRY)]}")
    if len(set(parts)) != len(parts):
        raise UnknownMethod(f"steering method {method!r} names a method twice")
    return parts


def resolve(spec, usable: dict[str, Any], why_not=None) -> dict[str, float]:
    """method -> strength for a steering spec ("none", a registered name, or names joined by '+'), in
    application order; raises ValueError for an unknown or unusable method or an out-of-range strength.
    ``usable``: the methods this engine can run (by name); ``why_not(name)``: why a registered one is not."""
    parts = method_parts(spec.method, usable)
    for p in parts:
        if p not in usable:
            reason = why_not(p) if why_not else "is not available"
            raise UnknownMethod(f"steering method {p!r} {reason}")
    return {name: strength_of(REGISTRY[name], spec.strength) for name in usable if name in parts}


def strength_of(method: type[SteeringMethod], value: float | None) -> float:
    """The strength a request asked for, or the method's default; out of range raises ValueError."""
    if value is None:
        return method.default_strength
    lo, hi = method.strength_range
    if not lo <= value <= hi:
        raise ValueError(f"strength {value} is out of range for {method.name!r}: expected {lo} <= strength <= {hi}")
    return float(value)
