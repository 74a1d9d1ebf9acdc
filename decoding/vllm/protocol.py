"""The contract between the server side of the vllm engine and its steering logits processor in vLLM's
worker: the ``extra_args`` key and shape, the environment the processor reads at engine start, and the
shared files through which the worker reports back: counters, and the per-token explanations of the
requests that ask for them (no vLLM import here)."""

from __future__ import annotations

import math
import os

import torch

ARG = "vlm_steer"
REWARD_ENV = "VLM_STEER_WORKER_REWARD_MODEL"  # the reward model folder, for the worker (not a server setting)
VERIFIER_ENV = "VLM_STEER_WORKER_VERIFIER"  # JSON {"path", "vocabulary", "calibration"} of the verifier
TITA_ENV = "VLM_STEER_WORKER_TITA"  # JSON {"gate", "candidates"}: the server's TITA settings, for the worker
COUNTERS_ENV = "VLM_STEER_COUNTERS"  # the shared counter file
EXPLAIN_ENV = "VLM_STEER_EXPLAIN"  # the shared explanation ring file
METHODS = ("tita", "fisao")  # application order, as in the transformers engine's registry
SLOTS = 1 << 16
HEADER = 8  # [0] engine steps, [1 + k] seconds spent by METHODS[k]
FIELDS = 3  # per slot, each in a block of SLOTS values: steered tokens, failed method, admissions
DEAD_END = 255  # a row's grammar allowed no token of the vocabulary (decoding.grammar.GrammarDeadEnd)


class Counters:
    """float64 counters in a file mapped by the server and the worker (both read and write): a header, then
    per request slot the tokens steering changed (``steered``, one contiguous block: the worker counts them
    on the device and copies the block here without a host sync) and the method that failed
    (``failed``: index + 1, 0 = none, ``DEAD_END``: its grammar allowed no token), and how many requests the
    slot has been handed to (``admitted``: the worker zeroes its device count when a row's slot has a new
    admission, and keeps it for a row vLLM preempted and resumed)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path) or os.path.getsize(path) < self.nbytes:
            with open(path, "wb") as f:
                f.truncate(self.nbytes)
        self.t = torch.from_file(path, shared=True, size=HEADER + FIELDS * SLOTS, dtype=torch.float64)
        self.steered = self.t[HEADER : HEADER + SLOTS]
        self.failed = self.t[HEADER + SLOTS : HEADER + 2 * SLOTS]
        self.admitted = self.t[HEADER + 2 * SLOTS : HEADER + 3 * SLOTS]

    nbytes = 8 * (HEADER + FIELDS * SLOTS)

    def reset(self, k: int) -> None:
        """A slot handed to a new request."""
        self.steered[k] = 0
        self.failed[k] = 0
        self.admitted[k] += 1


EXPLAIN_SLOTS = 64  # explaining choices at once (more reuse slots: the nonce tells stale entries apart)
EXPLAIN_DEPTH = 256  # positions kept per slot: how far the server may lag behind the worker
EXPLAIN_TOP = 32  # candidates kept per step: the steered scores' top tokens
COLUMNS = 3 + len(METHODS)  # per candidate: token id, steered logprob, unsteered logprob, contribution per method
ENTRY = 5 + EXPLAIN_TOP * COLUMNS  # [nonce, position + 1, unsteered top id, its logprob, changed] + candidates
NONCES = 1 << 24  # nonces stay exact in float32


class ExplainRing:
    """One step's explanation per explaining choice, in a float32 file mapped by the server and the worker.

    The worker does not know which token vLLM will sample from the scores it returns, so at each step it
    writes the ``EXPLAIN_TOP`` best candidates of the steered scores with their unsteered log-probs and
    each method's contribution (``decoding.explain``), plus the unsteered top token. The server reads the
    entry of the token it received: exact for any token among the candidates (greedy decoding always),
    ``None`` otherwise. The entry is written before vLLM samples, hence before the server sees the token;
    an entry overwritten by a later position or another request (nonce) also reads ``None``."""

    nbytes = 4 * EXPLAIN_SLOTS * EXPLAIN_DEPTH * ENTRY

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path) or os.path.getsize(path) < self.nbytes:
            with open(path, "wb") as f:
                f.truncate(self.nbytes)
        self.t = torch.from_file(path, shared=True, size=EXPLAIN_SLOTS * EXPLAIN_DEPTH * ENTRY,
                                 dtype=torch.float32).view(EXPLAIN_SLOTS, EXPLAIN_DEPTH, ENTRY)

    def write(self, slot: int, nonce: int, position: int, base_top: tuple[int, float], changed: bool,
              candidates: torch.Tensor) -> None:
        """``candidates`` [EXPLAIN_TOP or fewer, COLUMNS] (NaN: a method the row does not use)."""
        e = self.t[slot, position % EXPLAIN_DEPTH]
        e[:2] = 0  # invalid while the payload changes
        k = candidates.shape[0]
        e[5 : 5 + k * COLUMNS] = candidates.reshape(-1).float().cpu()
        e[5 + k * COLUMNS :] = -1  # no candidate (token id -1)
        e[2], e[3], e[4] = float(base_top[0]), float(base_top[1]), float(changed)
        e[0], e[1] = float(nonce), float(position + 1)

    def read(self, slot: int, nonce: int, position: int, token: int):
        """``decoding.explain.TokenExplain`` of ``token`` at ``position``, or None (see the class)."""
        from decoding.explain import TokenExplain

        e = self.t[slot, position % EXPLAIN_DEPTH].clone()
        if int(e[0]) != nonce or int(e[1]) != position + 1:
            return None
        cand = e[5:].view(EXPLAIN_TOP, COLUMNS)
        hit = (cand[:, 0] == token).nonzero()
        if not len(hit):
            return None
        row = cand[int(hit[0])].tolist()
        parts = {m: v for m, v in zip(METHODS, row[3:]) if v == v}  # NaN: the method did not steer this row
        return TokenExplain(token, row[1], row[2], int(e[2]), float(e[3]), parts, bool(e[4]))


def validate(args) -> None:
    """Refuse malformed steering arguments (vLLM turns the ValueError into HTTP 400): ``{"slot": int,
    "eos": int, "methods": {name: strength}, "messages": [...], "images": [encoded image bytes] (for a reward
    model that reads the image itself), "verifier_scores": [one float per object phrase] (FiSAO, scored at
    admission)}``."""
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
    scores = args.get("verifier_scores")
    if scores is not None and not (isinstance(scores, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores)):
        raise ValueError("'verifier_scores' must be a list of finite numbers (one per object phrase)")
    if not isinstance(args.get("messages", []), list):
        raise ValueError("'messages' must be the request's chat messages")
    ex = args.get("explain")
    if ex is not None and not (isinstance(ex, list) and len(ex) == 2 and all(isinstance(v, int) for v in ex)
                               and 0 <= ex[0] < EXPLAIN_SLOTS and 0 <= ex[1] < NONCES):
        raise ValueError(f"'explain' must be [slot in [0, {EXPLAIN_SLOTS}), nonce in [0, {NONCES})]")
