"""TITA: the log-prob ratio of a small DPO-trained reward VLM and the target VLM, added at every step.

The reward model is a second engine with the same tokenizer. Its rows (prefilled once with the same
image and prompt, in its own KV cache) follow the target's rows and are fed the chosen tokens, one
batched reward-model step per target step.
"""

from __future__ import annotations

import torch

from decoding.methods.base import SteeringMethod, register
from decoding.steer_math import tita


@register
class Tita(SteeringMethod):
    name = "tita"
    default_strength = 0.6
    strength_range = (0.0, 1.0)
    needs = ("reward",)

    @property
    def rm(self):
        return self.resources.reward

    def start(self, rows):
        return self.rm.prefill([self.rm.encode(r.request, steer=False) for r in rows])

    def steer(self, state, rows, logits, strength):
        return tita(logits, state.logits, strength)

    def advance(self, state, rows, tokens: torch.Tensor) -> None:
        self.rm.decode_one_token(state, tokens)

    def select(self, state, keep):
        return self.rm.select(state, keep)

    def merge(self, a, b):
        return self.rm.merge(a, b)
