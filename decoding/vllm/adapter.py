"""Steering for an engine that owns the batch (vLLM): the transformers engine's steering method objects,
driven from batch updates instead of our step loop. No vLLM import here, so ``make test`` drives it with
fake batch updates; ``decoding.vllm.steering`` is the thin vLLM ``LogitsProcessor`` around it.

The engine reports, before each step, rows that left, joined (with their sampling parameters, prompt ids
and live list of generated ids) and moved. A joined row that asks for steering (``extra_args[ARG]``,
built by ``decoding.vllm.engine``) becomes a ``Row`` as the transformers engine has it: its request
(messages and decoded images, which is what methods read), prompt ids, the processor's tensors rebuilt
from the ids and images, and ``token_ids`` = the engine's live list. Per method, ``_MethodRows`` keeps
the method's batched state in step with the rows that use it: at each step, rows that generated one
token since the last step ``advance``; rows that left are ``select``-ed away; new rows (or rows that
fell out of step, e.g. preempted and resumed) ``start`` (with the tokens they have, see the method
contract) as a cohort, steered from its own state while vLLM prefills them in chunks (a partial
prefill's sample is discarded: the row's tokens do not grow), and ``merge`` into the batched state
when their tokens have grown by one. A batched start that fails is retried row by row, so only the
faulty request fails. Then each method ``steer``s its rows' logits in registry order, as in the
transformers engine. A row whose steering fails ends at once (its logits allow only the EOS) and is
reported through the counters: never served unsteered. Under a grammar (vLLM's structured outputs mask
the logits before this processor) steering must keep masked tokens at -inf and give no NaN, else the row
fails; a failed row whose grammar forbids the EOS gets its masked, unsteered logits for that one step
instead, and the server, which reads the failure before that step's token, fails and aborts the request. Steered tokens are counted (on the device)
when steering changes the top token and taken back at the next step if that sample was discarded. Rows that ask for
an explanation (``args["explain"]``, with or without steering) get one entry per step in the
``decoding.vllm.protocol.ExplainRing``.
"""

from __future__ import annotations

import io
import time

import torch

from decoding.explain import contribution
from decoding.grammar import GrammarDeadEnd, unmasked
from decoding.host import upload
from decoding.methods import usable_methods
from decoding.model_inputs import inputs_for
from decoding.request import GenerationRequest
from decoding.vllm.protocol import ARG, DEAD_END, EXPLAIN_TOP, METHODS


class WorkerTarget:
    """What steering methods read from a target whose weights live in the engine's model runner: its
    processor, tokenizer, config and vocabulary size (no weights)."""

    shares_tower_outputs = False
    model = None

    def __init__(self, model_path: str, tita_gate: float = 1.0, tita_candidates: int = 0):
        from transformers import AutoConfig, AutoProcessor

        self.tita_gate, self.tita_candidates = tita_gate, tita_candidates  # as the transformers engine's

        self.processor = AutoProcessor.from_pretrained(model_path)
        self.tokenizer = self.processor.tokenizer
        self.config = AutoConfig.from_pretrained(model_path)
        self.vocab_size = self.config.get_text_config().vocab_size

    def inputs_for(self, prompt_ids: list[int], images: list) -> dict:
        return inputs_for(self.processor, self.config, prompt_ids, images)


class _Cohort:
    """Rows started together, not yet in step with the method's main state: a request still in chunked
    prefill gets logits (and steering) at each chunk while its sample is discarded, so its generated
    tokens do not grow; it joins the main state at the step where they have grown by one."""

    def __init__(self, state, rows: list):
        self.state, self.rows, self.consumed = state, rows, [len(r.token_ids) for r in rows]


class _MethodRows:
    """One method's batched state and the rows it holds (in state order), plus cohorts of rows started
    but not yet in step with it."""

    def __init__(self, method):
        self.method = method
        self.members: list = []
        self.consumed: list[int] = []  # generated tokens each member's state has taken in
        self.state = None
        self.cohorts: list[_Cohort] = []

    def reset(self) -> None:
        self.members, self.consumed, self.state, self.cohorts = [], [], None, []

    def _join(self, state, rows: list, consumed: list[int]) -> None:
        self.state = state if not self.members else self.method.merge(self.state, state)
        self.members += rows
        self.consumed += consumed

    def sync(self, rows: list) -> list[tuple[object, Exception]]:
        """Bring the states to ``rows`` (the rows using the method this step); returns the rows whose
        steering could not start, each with its error (they alone fail)."""
        alive = {id(r) for r in rows}
        grew = lambda r, c: len(r.token_ids) - c  # noqa: E731
        step = [j for j, (m, c) in enumerate(zip(self.members, self.consumed)) if id(m) in alive and grew(m, c) == 1]
        if step:
            if len(step) < len(self.members):
                self.state = self.method.select(self.state, step)
            self.members = [self.members[j] for j in step]
            self.consumed = [self.consumed[j] for j in step]
        else:
            self.members, self.consumed, self.state = [], [], None
        cohorts = []
        for c in self.cohorts:  # a cohort whose rows have all grown by one joins the main state, to advance with it
            live = [k for k, r in enumerate(c.rows) if id(r) in alive and grew(r, c.consumed[k]) in (0, 1)]
            ready = [k for k in live if grew(c.rows[k], c.consumed[k]) == 1]
            if live and len(ready) == len(live):
                state = c.state if len(live) == len(c.rows) else self.method.select(c.state, live)
                self._join(state, [c.rows[k] for k in live], [c.consumed[k] for k in live])
            elif live and not ready:
                if len(live) < len(c.rows):
                    c.state, c.rows, c.consumed = self.method.select(c.state, live), [c.rows[k] for k in live], [c.consumed[k] for k in live]
                cohorts.append(c)
            # else: rows left, or some grew and some did not: those still here start again below
        self.cohorts = cohorts
        if self.members:
            self.method.advance(self.state, self.members, torch.tensor([m.token_ids[-1] for m in self.members]))  # host ids
            self.consumed = [c + 1 for c in self.consumed]
        held = {id(m) for m in self.members} | {id(r) for c in self.cohorts for r in c.rows}
        fresh = [r for r in rows if id(r) not in held]
        return self._start(fresh) if fresh else []

    def _start(self, rows: list) -> list[tuple[object, Exception]]:
        """A cohort for new (or resumed) rows; when starting them together fails, each starts alone and
        only the rows that fail alone are lost."""
        try:
            self.cohorts.append(_Cohort(self.method.start(rows), rows))
            return []
        except Exception as e:
            if len(rows) == 1:
                return [(rows[0], e)]
        failed = []
        for r in rows:
            failed += self._start([r])
        return failed

    def steer(self, rows: list, logits: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """Scores for ``rows`` (in the caller's order) from the main state and the cohorts."""
        groups = [(state, held) for state, held in ((self.state, self.members), *((c.state, c.rows) for c in self.cohorts))
                  if held]
        if len(groups) == 1 and [id(r) for r in groups[0][1]] == [id(r) for r in rows]:  # the steady state: one state, in order
            return self.method.steer(groups[0][0], rows, logits, strength)
        where = {id(r): i for i, r in enumerate(rows)}
        out = logits.clone()
        for state, held in groups:
            order = upload([where[id(m)] for m in held], torch.long, logits.device)
            out[order] = self.method.steer(state, held, logits[order], strength[order])
        return out


class PerRequestSteering:
    """The steering of every row of an engine-owned batch: ``update`` with each batch update, ``apply``
    to each step's logits. ``counters`` (``decoding.vllm.protocol.Counters``) receives engine steps,
    seconds per method, steered tokens and failures per request slot."""

    def __init__(self, resources, counters=None, explain=None):
        self.explain = explain  # decoding.vllm.protocol.ExplainRing, where explaining rows' steps go
        self.methods = {name: cls(resources) for name, cls in usable_methods(resources, METHODS).items()}
        self.groups = {name: _MethodRows(m) for name, m in self.methods.items()}
        self.target = resources.target
        self.counters = counters
        self.rows: dict[int, tuple] = {}  # batch index -> (Row, its arguments)
        self.masked: set[int] = set()  # id() of the rows under a grammar (vLLM's structured outputs mask them first)
        # steered tokens, counted on the logits' device (``_count``): per request slot, copied whole into the
        # counters file at each step without a host sync; last step's changes, taken back for rows whose
        # sample was discarded; slots whose count restarts (a new admission, ``Counters.admitted``)
        self._steered: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, dict[int, tuple]] | None = None
        self._admissions: dict[int, float] = {}
        self._restart: list[int] = []

    # ------------------------------------------------------------ batch bookkeeping

    def update(self, removed, added, moved, swap) -> None:
        """``removed``: indices; ``added``: (index, params, prompt ids, live output ids); ``moved``:
        (a, b, direction), ``swap(direction)`` telling a swap from a one-way move (vLLM's order: removed,
        added, moved)."""
        for i in removed:
            e = self.rows.pop(i, None)
            if e is not None:
                if self._last is not None:
                    self._last[1].pop(id(e[0]), None)
                self.masked.discard(id(e[0]))
        for i, params, prompt_ids, output_ids in added:
            args = (params.extra_args or {}).get(ARG) if params is not None else None
            if not args or not (args.get("methods") or args.get("explain") is not None):
                e = self.rows.pop(i, None)
                if e is not None:
                    self.masked.discard(id(e[0]))
                continue
            row = self._row(args, list(prompt_ids or []), output_ids)
            if self.counters is not None:  # a new admission of the slot restarts its count; a resumed row keeps it
                seen = float(self.counters.admitted[args["slot"]])
                if self._admissions.get(args["slot"]) != seen:
                    self._admissions[args["slot"]] = seen
                    self._restart.append(args["slot"])
            if getattr(params, "structured_outputs", None) is not None:
                self.masked.add(id(row))
            self.rows[i] = (row, args)
        for a, b, direction in moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and swap(direction):
                self.rows[a] = rb

    def uses(self, method: str) -> bool:
        """Whether any row of the batch steers with ``method``."""
        return any(method in r.steer for r, _ in self.rows.values())

    def _row(self, args: dict, prompt_ids: list[int], output_ids: list[int]):
        from decoding.transformers_engine import Row

        methods = args.get("methods") or {}
        steer = {name: float(methods[name]) for name in METHODS if name in methods}
        row = Row(None, prompt_ids, {}, token_ids=output_ids, steer=steer)
        if not steer:  # explained, not steered: nothing to start
            return row
        try:  # a request whose steering cannot start (an unreadable image) fails alone
            from PIL import Image

            # images come only for a reward model that reads them itself (none for a fork inside the engine's
            # model, nor for FiSAO, whose verifier scores arrive computed)
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in args.get("images", [])]
            row.request = GenerationRequest(messages=args.get("messages", []), images=images)
            row.inputs = self.target.inputs_for(prompt_ids, images) if images else {}
            if args.get("verifier_scores") is not None:
                row.verifier_scores = torch.tensor(args["verifier_scores"], dtype=torch.float32)
            missing = [m for m in steer if m not in self.methods]
            if missing:
                raise RuntimeError(f"steering method {missing[0]!r} is not available in the worker")
        except Exception as e:
            self._fail(row, args, next(iter(steer)), e)
        return row

    # ------------------------------------------------------------ each step

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The steered scores of one step's logits [rows, V]. No host sync in a step whose rows have no grammar,
        no explanation and no failure: index and strength lists go up without blocking (``decoding.host``),
        and changed tokens are counted on the device (``tests/decoding/test_host_syncs.py`` counts them)."""
        self._settle(logits.device)
        if self.counters is not None:
            self.counters.t[0] += 1
        rows = {i: e for i, e in self.rows.items() if i < logits.shape[0]}
        if not rows:
            for g in self.groups.values():
                g.reset()
            return logits
        device = logits.device
        for i, (r, args) in rows.items():  # a row whose grammar allows no token: it fails, nothing is forced
            if id(r) in self.masked and r.error is None and not torch.isfinite(logits[i]).any():
                self._fail(r, args, None, GrammarDeadEnd("the requested output format allows no token here"))
        # the top token before steering, for the rows that steer only (an argmax over every row of a large
        # vocabulary costs a millisecond a step on a CPU)
        steered = [i for i, (r, _) in rows.items() if r.steer]
        at_steered = upload(steered, torch.long, device) if steered else None
        before = logits[at_steered].argmax(-1) if steered else None
        scores = logits.clone()
        ex = [i for i, (r, a) in rows.items() if a.get("explain") is not None and r.error is None] if self.explain else []
        parts: dict[str, tuple[list[int], torch.Tensor]] = {}  # method -> (positions in ex, contributions [m, V])
        for k, (name, group) in enumerate(self.groups.items()):
            idx = [i for i, (r, _) in rows.items() if name in r.steer and r.error is None]
            if not idx:
                group.reset()
                continue
            members = [rows[i][0] for i in idx]
            for i in idx:
                rows[i][0].batch_index = i  # the row of this step's logits (a reward model inside the engine's model reads it)
            t0 = time.perf_counter()
            try:
                lost = {id(r): e for r, e in group.sync(members)}
                for i in [i for i in idx if id(rows[i][0]) in lost]:  # they alone fail
                    self._fail(*rows[i], name, lost[id(rows[i][0])])
                idx = [i for i in idx if id(rows[i][0]) not in lost]
                members = [rows[i][0] for i in idx]
                strength = upload([r.steer[name] for r in members], torch.float32, device)
                at = upload(idx, torch.long, device)
                pos = [p for p, i in enumerate(ex) if i in idx]
                kept = scores[[ex[p] for p in pos]].float() if pos else None  # a copy, before the method
                masked = [i for i in idx if id(rows[i][0]) in self.masked]
                prior = scores[masked] if masked else None  # a copy: the grammar's -inf before the method
                if idx:
                    scores[at] = group.steer(members, scores[at], strength).to(scores.dtype)
                if masked:  # a steered answer stays valid: a method that unmasks a token (or gives NaN) fails its row
                    for i, bad in zip(masked, unmasked(prior, scores[masked]).tolist()):
                        if bad:
                            self._fail(*rows[i], name, RuntimeError(
                                "its scores gave a token the requested output format forbids a chance, or held a NaN"))
                if pos:
                    parts[name] = (pos, contribution(kept, scores[[ex[p] for p in pos]]))
            except Exception as e:  # only these rows fail: they end now and the server reports the failure
                for i in idx:
                    self._fail(*rows[i], name, e)
                group.reset()
            if self.counters is not None:
                self.counters.t[1 + METHODS.index(name)] += time.perf_counter() - t0
        changed = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)  # on the device: counted there (``_count``)
        if steered:
            changed[at_steered] = scores[at_steered].argmax(-1) != before
        if ex:
            shown = changed.tolist()
            self._explain([rows[i] for i in ex], logits[ex], scores[ex], parts, [shown[i] for i in ex])
        for i, (r, args) in rows.items():
            if r.error is not None:  # never served unsteered: the row ends at once (end of sequence) ...
                eos = args.get("eos", 0)
                if torch.isneginf(logits[i, eos]):  # ... unless its grammar forbids the end here: then this one
                    scores[i] = logits[i]  # step samples a token the grammar allows, which the server, seeing the
                    continue  # failure first, never serves (it aborts the request)
                scores[i] = float("-inf")
                scores[i, eos] = 0.0
        self._count(changed, [(i, r, args) for i, (r, args) in rows.items() if r.error is None])
        return scores

    def _explain(self, rows: list, logits: torch.Tensor, scores: torch.Tensor, parts: dict, changed: list) -> None:
        """Each explaining row's step into the ring: the steered scores' top candidates with their unsteered
        log-probs and each method's contribution (NaN where the method does not steer the row), and the
        unsteered top token, at the row's position (its generated tokens so far)."""
        base, final = logits.float().log_softmax(-1), scores.float().log_softmax(-1)
        top_v, top_i = final.topk(min(EXPLAIN_TOP, final.shape[-1]), -1)
        cols = [top_i.float(), top_v, base.gather(-1, top_i)]
        for name in METHODS:
            c = torch.full_like(top_v, float("nan"))
            if name in parts:
                pos, contrib = parts[name]
                at = torch.tensor(pos, dtype=torch.long, device=c.device)
                c[at] = contrib.gather(-1, top_i[at])
            cols.append(c)
        table = torch.stack(cols, -1).cpu()  # [rows, k, COLUMNS]
        base_v, base_i = base.max(-1)
        for k, (r, args) in enumerate(rows):
            slot, nonce = args["explain"]
            self.explain.write(slot, nonce, len(r.token_ids), (int(base_i[k]), float(base_v[k])), changed[k], table[k])

    def _counts(self, device: torch.device) -> torch.Tensor:
        """Steered tokens per request slot [SLOTS] float64 on ``device``: on a CPU the counters file's own block;
        on an accelerator a device tensor copied into that block after each change, without blocking (the
        file's pages are registered as pinned memory, so the copy lands before vLLM's sampled tokens reach the
        host, and the server reads a finished request's count after its last token)."""
        if self._steered is None:
            block = self.counters.steered
            if device.type == "cpu":
                self._steered = block
            else:
                self._steered = block.to(device)
                if device.type == "cuda":
                    t = self.counters.t
                    if torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0) != 0:
                        import logging

                        logging.getLogger("vlm_steer.worker").warning(
                            "the counters file could not be pinned: steered-token counts copy with a host sync")
        if self._restart:
            self._steered.index_fill_(0, upload(self._restart, torch.long, device), 0)
            self._restart = []
        return self._steered

    def _count(self, changed: torch.Tensor, rows: list[tuple[int, object, dict]]) -> None:
        """Steered tokens: a row's count grows where steering changed its top token this step (``changed``
        [rows] bool, on the device); ``_settle`` takes a change back at the next step if the row's tokens
        did not grow (a chunked prefill's samples are discarded)."""
        if self.counters is None or not rows:
            return
        device = changed.device
        counts = self._counts(device)
        pos = upload([i for i, _, _ in rows], torch.long, device)
        counts.index_add_(0, upload([a["slot"] for _, _, a in rows], torch.long, device), changed[pos].to(counts.dtype))
        self._last = (changed, {id(r): (i, a["slot"], len(r.token_ids), r) for i, r, a in rows})
        self._publish(counts)

    def _settle(self, device: torch.device) -> None:
        last, self._last = self._last, None
        if last is None or self.counters is None:
            return
        changed, rows = last
        back = [(i, slot) for i, slot, n, r in rows.values() if len(r.token_ids) == n and r.error is None]
        if back:
            counts = self._counts(device)
            pos = upload([i for i, _ in back], torch.long, device)
            counts.index_add_(0, upload([s for _, s in back], torch.long, device), -changed[pos].to(counts.dtype))
            self._publish(counts)

    def _publish(self, counts: torch.Tensor) -> None:
        if counts is not self.counters.steered:
            self.counters.steered.copy_(counts, non_blocking=True)

    def _fail(self, row, args: dict, method: str | None, error: Exception) -> None:
        """The row fails: ``method``'s steering raised ``error``, or (``method`` None) its grammar dead-ended."""
        from decoding.methods import SteeringFailed

        row.error = row.error or (SteeringFailed(method, error) if method else error)
        if self.counters is not None:
            self.counters.failed[args["slot"]] = METHODS.index(method) + 1 if method else DEAD_END
