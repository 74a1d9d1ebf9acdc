"""Steering for an engine that owns the batch (vLLM): the transformers engine's steering method objects,
driven from batch updates instead of our step loop. No vLLM import here, so ``make test`` drives it with
fake batch updates; ``decoding.vllm_steering`` is the thin vLLM ``LogitsProcessor`` around it.

The engine reports, before each step, rows that left, joined (with their sampling parameters, prompt ids
and live list of generated ids) and moved. A joined row that asks for steering (``extra_args[ARG]``,
built by ``decoding.vllm_engine``) becomes a ``Row`` as the transformers engine has it: its request
(messages and decoded images, which is what methods read), prompt ids, the processor's tensors rebuilt
from the ids and images, and ``token_ids`` = the engine's live list. Per method, ``_MethodRows`` keeps
the method's batched state in step with the rows that use it: at each step, rows that generated one
token since the last step ``advance``; rows that left are ``select``-ed away; new rows (or rows that
fell out of step, e.g. preempted and resumed) ``start`` (with the tokens they have, see the method
contract) and ``merge`` in. Then each method ``steer``s its rows' logits in registry order, as in the
transformers engine. A row whose steering fails ends at once (its logits allow only the EOS) and is
reported through the counters: never served unsteered.
"""

from __future__ import annotations

import io
import time

import torch

from decoding.methods import usable_methods
from decoding.model_inputs import inputs_for
from decoding.request import GenerationRequest
from decoding.vllm_protocol import ARG, METHODS


class WorkerTarget:
    """What steering methods read from a target whose weights live in the engine's model runner: its
    processor, tokenizer, config and vocabulary size (no weights)."""

    shares_tower_outputs = False
    model = None

    def __init__(self, model_path: str):
        from transformers import AutoConfig, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_path)
        self.tokenizer = self.processor.tokenizer
        self.config = AutoConfig.from_pretrained(model_path)
        self.vocab_size = self.config.get_text_config().vocab_size

    def inputs_for(self, prompt_ids: list[int], images: list) -> dict:
        return inputs_for(self.processor, self.config, prompt_ids, images)


class _MethodRows:
    """One method's batched state and the rows it holds, in state order."""

    def __init__(self, method):
        self.method = method
        self.members: list = []
        self.consumed: list[int] = []  # generated tokens each member's state has taken in
        self.state = None

    def reset(self) -> None:
        self.members, self.consumed, self.state = [], [], None

    def sync(self, rows: list) -> None:
        """Bring the state to ``rows`` (the rows using the method this step)."""
        alive = {id(r) for r in rows}
        step = [j for j, (m, c) in enumerate(zip(self.members, self.consumed)) if id(m) in alive and len(m.token_ids) - c == 1]
        if step:
            if len(step) < len(self.members):
                self.state = self.method.select(self.state, step)
            self.members = [self.members[j] for j in step]
            self.consumed = [self.consumed[j] + 1 for j in step]
            self.method.advance(self.state, self.members, torch.tensor([m.token_ids[-1] for m in self.members]))
        else:
            self.reset()
        held = {id(m) for m in self.members}
        fresh = [r for r in rows if id(r) not in held]
        if fresh:
            state = self.method.start(fresh)
            self.state = state if not self.members else self.method.merge(self.state, state)
            self.members += fresh
            self.consumed += [len(r.token_ids) for r in fresh]

    def steer(self, rows: list, logits: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """Scores for ``rows`` (in the caller's order) from the state (in member order)."""
        where = {id(r): i for i, r in enumerate(rows)}
        order = torch.tensor([where[id(m)] for m in self.members], dtype=torch.long)
        out = torch.empty_like(logits)
        out[order] = self.method.steer(self.state, self.members, logits[order], strength[order])
        return out


class PerRequestSteering:
    """The steering of every row of an engine-owned batch: ``update`` with each batch update, ``apply``
    to each step's logits. ``counters`` (``decoding.vllm_protocol.Counters``) receives engine steps,
    seconds per method, steered tokens and failures per request slot."""

    def __init__(self, resources, counters=None):
        self.methods = {name: cls(resources) for name, cls in usable_methods(resources, METHODS).items()}
        self.groups = {name: _MethodRows(m) for name, m in self.methods.items()}
        self.target = resources.target
        self.counters = counters
        self.rows: dict[int, tuple] = {}  # batch index -> (Row, its arguments)

    # ------------------------------------------------------------ batch bookkeeping

    def update(self, removed, added, moved, swap) -> None:
        """``removed``: indices; ``added``: (index, params, prompt ids, live output ids); ``moved``:
        (a, b, direction), ``swap(direction)`` telling a swap from a one-way move (vLLM's order: removed,
        added, moved)."""
        for i in removed:
            self.rows.pop(i, None)
        for i, params, prompt_ids, output_ids in added:
            args = (params.extra_args or {}).get(ARG) if params is not None else None
            if not args or not args.get("methods"):
                self.rows.pop(i, None)
                continue
            self.rows[i] = (self._row(args, list(prompt_ids or []), output_ids), args)
        for a, b, direction in moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and swap(direction):
                self.rows[a] = rb

    def _row(self, args: dict, prompt_ids: list[int], output_ids: list[int]):
        from decoding.transformers_engine import Row

        steer = {name: float(args["methods"][name]) for name in METHODS if name in args["methods"]}
        row = Row(None, prompt_ids, {}, token_ids=output_ids, steer=steer)
        try:  # a request whose steering cannot start (an unreadable image) fails alone
            from PIL import Image

            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in args.get("images", [])]
            row.request = GenerationRequest(messages=args.get("messages", []), images=images)
            row.inputs = self.target.inputs_for(prompt_ids, images)
            missing = [m for m in steer if m not in self.methods]
            if missing:
                raise RuntimeError(f"steering method {missing[0]!r} is not available in the worker")
        except Exception as e:
            self._fail(row, args, next(iter(steer)), e)
        return row

    # ------------------------------------------------------------ each step

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.counters is not None:
            self.counters.t[0] += 1
        rows = {i: e for i, e in self.rows.items() if i < logits.shape[0]}
        if not rows:
            for g in self.groups.values():
                g.reset()
            return logits
        before = logits.argmax(-1)
        scores = logits.clone()
        for k, (name, group) in enumerate(self.groups.items()):
            idx = [i for i, (r, _) in rows.items() if name in r.steer and r.error is None]
            if not idx:
                group.reset()
                continue
            members = [rows[i][0] for i in idx]
            t0 = time.perf_counter()
            try:
                group.sync(members)
                strength = torch.tensor([r.steer[name] for r in members], device=logits.device)
                scores[idx] = group.steer(members, scores[idx], strength).to(scores.dtype)
            except Exception as e:  # only these rows fail: they end now and the server reports the failure
                for i in idx:
                    self._fail(*rows[i], name, e)
                group.reset()
            if self.counters is not None:
                self.counters.t[1 + METHODS.index(name)] += time.perf_counter() - t0
        changed = (scores.argmax(-1) != before).tolist()
        for i, (r, args) in rows.items():
            if r.error is not None:  # never served unsteered: the row ends at once (end of sequence)
                scores[i] = float("-inf")
                scores[i, args.get("eos", 0)] = 0.0
            elif changed[i] and self.counters is not None:
                self.counters.slot(args["slot"])[0] += 1
        return scores

    def _fail(self, row, args: dict, method: str, error: Exception) -> None:
        from decoding.methods import SteeringFailed

        row.error = row.error or SteeringFailed(method, error)
        if self.counters is not None:
            self.counters.slot(args["slot"])[1] = METHODS.index(method) + 1
