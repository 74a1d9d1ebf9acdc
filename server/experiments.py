"""A/B experiments: named arms (each a steering spec) with traffic weights.

Assignment is sticky per ``user`` (a stable hash of experiment name and user), else random per
request. A request's explicit ``steering`` overrides its arm unless the experiment is locked.
File (YAML or JSON)::

    name: hallucination-v1
    locked: false
    arms:
      - {name: control, weight: 50, steering: {method: none}}
      - {name: tita, weight: 50, steering: {method: tita, strength: 0.6}}
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, model_validator

from server.protocol import Steering


class Arm(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    weight: float = Field(gt=0)
    steering: Steering


class Experiment(BaseModel):
    name: str
    locked: bool = False
    arms: list[Arm] = Field(min_length=1)
    control: str | None = None  # the arm others are compared with (alerts); default: the first arm

    @model_validator(mode="after")
    def _unique(self):
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ValueError("arm names must be unique")
        if self.control is None:
            self.control = self.arms[0].name
        elif self.control not in {a.name for a in self.arms}:
            raise ValueError(f"control {self.control!r} is not one of the arms")
        return self

    @classmethod
    def load(cls, path: Path) -> "Experiment":
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data)

    def assign(self, user: str | None) -> Arm:
        total = sum(a.weight for a in self.arms)
        if user:
            h = hashlib.sha256(f"{self.name}\0{user}".encode()).digest()
            x = int.from_bytes(h[:8], "big") / 2**64 * total
        else:
            x = random.random() * total
        for arm in self.arms:
            x -= arm.weight
            if x < 0:
                return arm
        return self.arms[-1]


DEFAULT_ARM = "default"
EXPLICIT_ARM = "explicit"
