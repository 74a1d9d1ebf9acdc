"""VCD (Leng et al. 2024), the peer baseline: contrast with the logits of a noised copy of the image."""

from __future__ import annotations

import dataclasses
import math

import torch

from decoding.methods.base import SteeringMethod, register
from decoding.steer_math import vcd

NOISE_STEP, NOISE_STEPS = 500, 1000  # forward diffusion q(x_t | x_0) at t = 500 of a linear schedule


def diffusion_noise(pixels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, NOISE_STEPS, dtype=torch.float64)
    abar = float(torch.cumprod(1 - betas, 0)[NOISE_STEP - 1])
    g = torch.Generator().manual_seed(seed)
    # drawn on the CPU (seeded alike on every device), then moved to the pixels' device
    eps = torch.randn(pixels.shape, generator=g, dtype=torch.float32).to(pixels.device)
    return (math.sqrt(abar) * pixels.float() + math.sqrt(1 - abar) * eps).to(pixels.dtype)


@register
class Vcd(SteeringMethod):
    name = "vcd"
    default_strength = 1.0
    strength_range = (0.0, 5.0)
    beta = 0.1  # plausibility cut-off on the clean distribution

    @property
    def target(self):
        return self.resources.target

    def start(self, rows):
        noised = [dataclasses.replace(r, inputs=r.inputs if r.pixel_values is None else
                                      {**r.inputs, "pixel_values": diffusion_noise(r.pixel_values)},
                                      token_ids=[], logprobs=[], steer={}) for r in rows]
        return self.target.prefill(noised, steer=False)

    def steer(self, state, rows, logits, strength):
        return vcd(logits, state.logits, strength, self.beta)

    def advance(self, state, rows, tokens):
        self.target.decode_one_token(state, tokens, steer=False)

    def select(self, state, keep):
        return self.target.select(state, keep)

    def merge(self, a, b):
        return self.target.merge(a, b)
