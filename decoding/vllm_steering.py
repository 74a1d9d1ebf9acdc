"""Steering inside vLLM: one V1 logits processor, registered at engine start, active per request.

A request opts in through ``SamplingParams.extra_args["vlm_steer"]`` (built by ``decoding.vllm_engine``):
``{"slot": int, "eos": int, "tita": {"strength": f, "images": [png bytes]},
"fisao": {"strength": f, "table": [[prefix ids, token ids, values], ...], "first": [token ids, values]}}``.
The processor runs in vLLM's worker process, so everything a method needs travels in those arguments:
FiSAO's per-request verifier rewards as a compact table (a token's bonus given the row's last tokens),
TITA's image (the processor owns the reward model and its KV cache, prefilled from the request's
prompt ids and image and fed the chosen token once per engine step, batched over the rows using it).
The math is ``decoding.steer_math``'s, as in the transformers engine. What the server needs back (steered
tokens, failures, steering time, engine steps) goes through a small shared counter file.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from decoding.methods.fisao import Fisao
from decoding.steer_math import tita, token_bonus
from decoding.vllm_protocol import ARG, COUNTERS_ENV, METHODS, REWARD_ENV, Counters, validate


def _rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # not initialised (a single process)
        return 0


@dataclass
class _Request:
    """One steered request in vLLM's persistent batch."""

    args: dict
    prompt_ids: list[int]
    output_ids: list[int]  # vLLM's live list of generated tokens
    fisao: dict | None = None  # level -> {suffix: (token ids, values)}
    images: list | None = None  # decoded once, at admission
    consumed: int = -1  # output tokens the reward model has been fed (-1: not prefilled)
    failed: bool = False


def _fisao_table(spec: dict) -> dict[int, dict[tuple, tuple[torch.Tensor, torch.Tensor]]]:
    levels: dict[int, dict[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}
    for prefix, tokens, values in spec["table"]:
        levels.setdefault(len(prefix), {})[tuple(prefix)] = (torch.tensor(tokens, dtype=torch.long),
                                                             torch.tensor(values, dtype=torch.float32))
    return levels


class SteeringLogitsProcessor(LogitsProcessor):
    """TITA and FiSAO for the rows whose ``extra_args`` ask for them; other rows are untouched."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = sampling_params.extra_args or {}
        if ARG in extra:
            validate(extra[ARG])

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, _Request] = {}
        # with tensor parallelism every rank runs this processor alike; one of them reports
        self.counters = Counters(os.environ[COUNTERS_ENV]) if os.environ.get(COUNTERS_ENV) and _rank() == 0 else None
        self.rm = None
        self.rm_batch = None
        self.rm_reqs: list[_Request] = []
        reward = os.environ.get(REWARD_ENV)
        if reward:
            from decoding.transformers_engine import TransformersEngine

            dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
            self.rm = TransformersEngine(reward, device=str(device), dtype=dtype)

    def is_argmax_invariant(self) -> bool:
        return False

    # ------------------------------------------------------------ batch bookkeeping

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            self.rows.pop(i, None)
        for i, params, prompt_ids, output_ids in batch_update.added:
            args = (params.extra_args or {}).get(ARG) if params is not None else None
            if args is None or not (args.keys() & set(METHODS)):
                self.rows.pop(i, None)
                continue
            req = _Request(args, list(prompt_ids or []), output_ids)
            for k, name in enumerate(METHODS):  # a request whose steering cannot start fails alone
                if name in args:
                    try:
                        getattr(self, f"_start_{name}")(req)
                    except Exception:
                        self._fail(req, k)
            self.rows[i] = req
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = rb

    # ------------------------------------------------------------ each step

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.counters is not None:
            self.counters.t[0] += 1
        rows = {i: r for i, r in self.rows.items() if i < logits.shape[0]}
        if not rows:
            return logits
        before = logits.argmax(-1)
        scores = logits.clone()
        for k, name in enumerate(METHODS):
            idx = [i for i, r in rows.items() if name in r.args and not r.failed]
            if not idx:
                continue
            t0 = time.perf_counter()
            try:
                scores[idx] = getattr(self, "_" + name)([rows[i] for i in idx], scores[idx]).to(scores.dtype)
            except Exception:  # only these rows fail: they end now and the server reports the failure
                for i in idx:
                    self._fail(rows[i], k)
            if self.counters is not None:
                self.counters.t[1 + k] += time.perf_counter() - t0
        changed = (scores.argmax(-1) != before).tolist()
        for i, r in rows.items():
            if r.failed:  # never served unsteered: the row ends at once (end of sequence)
                scores[i] = float("-inf")
                scores[i, r.args.get("eos", 0)] = 0.0
            elif changed[i] and self.counters is not None:
                self.counters.slot(r.args["slot"])[0] += 1
        return scores

    def _fail(self, req: _Request, k: int) -> None:
        req.failed = True
        if self.counters is not None:
            self.counters.slot(req.args["slot"])[1] = k + 1

    # ------------------------------------------------------------ the methods

    def _start_fisao(self, req: _Request) -> None:
        req.fisao = _fisao_table(req.args["fisao"])

    def _start_tita(self, req: _Request) -> None:
        if self.rm is None:
            raise RuntimeError(f"no reward model: the engine was started without {REWARD_ENV}")
        from PIL import Image

        req.images = [Image.open(io.BytesIO(b)).convert("RGB") for b in req.args["tita"]["images"]]

    def _fisao(self, reqs: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        bonus = torch.zeros(len(reqs), vocab + 1)
        for n, r in enumerate(reqs):  # shallow suffixes first: a deeper match overrides the tokens it names
            for level in sorted(r.fisao):
                if level > len(r.output_ids):
                    continue
                hit = r.fisao[level].get(tuple(r.output_ids[len(r.output_ids) - level :]) if level else ())
                if hit is not None:
                    bonus[n, hit[0]] = hit[1]
            first = r.args["fisao"].get("first")
            if first and not r.output_ids:  # "is there an X ?": the first answer token
                bonus[n, torch.tensor(first[0], dtype=torch.long)] = torch.tensor(first[1], dtype=torch.float32)
        strength = torch.tensor([r.args["fisao"]["strength"] for r in reqs], device=logits.device)
        return token_bonus(logits, bonus[:, :vocab].to(logits.device), strength, Fisao.alpha)

    def _tita(self, reqs: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        self._sync_reward_model(reqs)
        pos = {id(r): j for j, r in enumerate(self.rm_reqs)}
        reward = self.rm_batch.logits[[pos[id(r)] for r in reqs]]
        strength = torch.tensor([r.args["tita"]["strength"] for r in reqs], device=logits.device)
        return tita(logits, reward.to(logits.device), strength)

    def _sync_reward_model(self, reqs: list[_Request]) -> None:
        """Bring the reward model's rows to the tokens each request has generated: rows that left drop out,
        rows one token behind take one batched step, new (or resumed) rows are prefilled."""
        rm = self.rm
        alive = {id(r) for r in reqs}
        keep = [j for j, r in enumerate(self.rm_reqs) if id(r) in alive]
        need = [len(self.rm_reqs[j].output_ids) - self.rm_reqs[j].consumed for j in keep]
        if keep and all(n == 1 for n in need):
            self.rm_batch = rm.select(self.rm_batch, keep)
            self.rm_reqs = [self.rm_reqs[j] for j in keep]
            rm.decode_one_token(self.rm_batch, torch.tensor([r.output_ids[-1] for r in self.rm_reqs]), steer=False)
            for r in self.rm_reqs:
                r.consumed += 1
        else:  # rows already in step stay; any other row is prefilled again from its tokens so far
            stay = [j for j, n in zip(keep, need) if n == 0]
            self.rm_batch = rm.select(self.rm_batch, stay) if stay else None
            self.rm_reqs = [self.rm_reqs[j] for j in stay]
        fresh = [r for r in reqs if all(r is not s for s in self.rm_reqs)]
        if fresh:
            from decoding.transformers_engine import Row

            rows = [Row(None, ids, rm.inputs_for(ids, r.images)) for r in fresh
                    for ids in [r.prompt_ids + list(r.output_ids)]]
            new = rm.prefill(rows, steer=False)
            for r in fresh:
                r.consumed = len(r.output_ids)
            self.rm_batch = new if self.rm_batch is None else rm.merge(self.rm_batch, new)
            self.rm_reqs = self.rm_reqs + fresh
