"""The contract between the server side of the vllm engine and its steering logits processor in vLLM's
worker: the ``extra_args`` key and shape, the environment the processor reads at engine start, and the
shared counter file through which the worker reports back (no vLLM import here)."""

from __future__ import annotations

import os

import torch

ARG = "vlm_steer"
REWARD_ENV = "VLM_STEER_WORKER_REWARD_MODEL"  # the reward model folder, for the worker (not a server setting)
VERIFIER_ENV = "VLM_STEER_WORKER_VERIFIER"  # JSON {"path", "vocabulary", "calibration"} of the verifier
COUNTERS_ENV = "VLM_STEER_COUNTERS"  # the shared counter file
METHODS = ("tita", "fisao")  # application order, as in the transformers engine's registry
SLOTS = 1 << 16
HEADER = 8  # [0] engine steps, [1 + k] seconds spent by METHODS[k]
FIELDS = 2  # per slot: steered tokens, failed method (index + 1, 0 = none)


class Counters:
    """float64 counters in a file mapped by the server and the worker (both read and write)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path) or os.path.getsize(path) < self.nbytes:
            with open(path, "wb") as f:
                f.truncate(self.nbytes)
        self.t = torch.from_file(path, shared=True, size=HEADER + FIELDS * SLOTS, dtype=torch.float64)

    nbytes = 8 * (HEADER + FIELDS * SLOTS)

    def slot(self, k: int) -> torch.Tensor:
        return self.t[HEADER + FIELDS * k : HEADER + FIELDS * (k + 1)]


def validate(args) -> None:
    """Refuse malformed steering arguments (vLLM turns the ValueError into HTTP 400): ``{"slot": int,
    "eos": int, "methods": {name: strength}, "messages": [...], "images": [encoded image bytes]}``."""
    if not isinstance(args, dict) or not isinstance(args.get("slot"), int) or not 0 <= args["slot"] < SLOTS:
        raise ValueError(f"extra_args[{ARG!r}] must be a dict with an integer 'slot' in [0, {SLOTS})")
    methods = args.get("methods")
    if not isinstance(methods, dict):
        raise ValueError(f"extra_args[{ARG!r}]['methods'] must map steering methods to strengths")
    for name, strength in methods.items():
        if name not in METHODS:
            raise ValueError(f"unknown steering method {name!r} for the vLLM engine; available: {list(METHODS)}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
            raise ValueError(f"steering {name!r} needs a non-negative 'strength'")
    images = args.get("images", [])
    if not isinstance(images, list) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise ValueError("'images' must be a list of encoded image bytes")
    if "tita" in methods and not images:
        raise ValueError("tita needs the request's image ('images')")
    if not isinstance(args.get("messages", []), list):
        raise ValueError("'messages' must be the request's chat messages")
