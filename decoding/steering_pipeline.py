"""The steering methods over the transformers engine's batches: each method's state for the rows that use
it is started at prefill, rewrites their logits at each step, follows the chosen tokens, is restricted
when rows leave and merged when batches join (the method contract of ``decoding.methods.base``). Time is
kept per method and per verb; a method that raises fails only its rows (``row.error``: they leave the
batch failed, never served unsteered)."""

from __future__ import annotations

import time

import torch

from decoding.explain import StepTrace, contribution
from decoding.grammar import min_tokens_dead_end, unmasked
from decoding.methods import SteeringFailed
from decoding.sampling import apply_logit_bias, suppress_tokens


def ends_masked(row, eos_ids) -> frozenset[int]:
    """The tokens ``min_tokens`` masks for a row at this step (vLLM's ``MinTokensLogitsProcessor``): its EOS
    (unless ``ignore_eos``) and its ``stop_token_ids`` while it has generated fewer than ``min_tokens``."""
    s = row.request.sampling
    if len(row.token_ids) >= s.min_tokens:
        return frozenset()
    return frozenset(s.stop_token_ids) | (frozenset() if s.ignore_eos else frozenset(eos_ids))


class SteeringPipeline:
    def __init__(self, methods: dict, eos_ids=()):
        self.methods = methods  # name -> SteeringMethod, in application (registry) order
        self.eos_ids = frozenset(eos_ids)  # what ``min_tokens`` masks beside a row's stop_token_ids
        self.seconds: dict[str, float] = {}  # per method, since the last pop
        self.verb_seconds: dict[str, float] = {}  # per method and verb (``tita.advance``), since the last pop

    def timed(self, name: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            verb = f"{name}.{getattr(fn, '__name__', 'call')}"  # e.g. tita.advance: where a method's time goes
            self.verb_seconds[verb] = self.verb_seconds.get(verb, 0.0) + dt

    def pop_seconds(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out

    def pop_verb_seconds(self) -> dict[str, float]:
        out, self.verb_seconds = self.verb_seconds, {}
        return out

    @staticmethod
    def fail(name: str, rows: list, e: Exception) -> None:
        for r in rows:
            r.error = r.error or SteeringFailed(name, e)

    def start(self, batch) -> None:
        """Each method's state for the rows of a new batch that use it."""
        for name, method in self.methods.items():
            idx = batch.rows_using(name)
            if idx:
                rows = [batch.rows[i] for i in idx]
                try:
                    batch.states[name] = self.timed(name, method.start, rows)
                except Exception as e:  # only the rows of this method fail
                    self.fail(name, rows, e)
                    batch.states[name] = None

    @torch.inference_mode()
    def steer(self, batch) -> torch.Tensor:
        """Scores to sample from [B, V]: vLLM's built-in logits processors first, as vLLM runs them before
        custom ones (``min_tokens`` masks the EOS and stop_token_ids to -inf, then each row's ``logit_bias``
        is added), then each method, in registry order, rewrites the rows that use it (a masked token stays
        masked); counts, per row, the steps at which steering changed the top token. The sampling filters
        (penalties, temperature, min_p, top_k, top_p) come after, in ``sample``."""
        ends = [ends_masked(r, self.eos_ids) for r in batch.rows]
        masked = suppress_tokens(batch.logits, ends)
        held = [i for i, r in enumerate(batch.rows) if r.grammar is not None and r.error is None and ends[i]]
        if held:  # a format whose only way on is its end, masked by min_tokens: the row fails (400), no token forced
            for i, none_left in zip(held, torch.isneginf(masked[held]).all(-1).tolist()):
                if none_left:
                    batch.rows[i].error = min_tokens_dead_end(len(batch.rows[i].token_ids))
        scores = base = apply_logit_bias(masked, [r.request.sampling.logit_bias for r in batch.rows])
        explain = [i for i, r in enumerate(batch.rows) if r.request.steering.explain]
        trace = batch.trace = StepTrace(explain, base[explain].float().log_softmax(-1)) if explain else None
        for name, method in self.methods.items():
            idx = batch.rows_using(name)
            if idx:
                rows = [batch.rows[i] for i in idx]
                strength = torch.tensor([r.steer[name] for r in rows], device=scores.device)
                pos = [p for p, i in enumerate(explain) if name in batch.rows[i].steer]
                before = scores[[explain[p] for p in pos]].float() if pos else None  # a copy (in-place writes follow)
                masked = [i for i in idx if batch.rows[i].grammar is not None]  # rows under a grammar's mask
                prior = scores[masked] if masked else None  # a copy
                try:
                    if len(idx) == len(batch.rows):  # every row: the method's scores are the batch's
                        scores = self.timed(name, method.steer, batch.states[name], rows, scores, strength)
                    else:
                        scores = scores.clone() if scores is base else scores
                        scores[idx] = self.timed(name, method.steer, batch.states[name], rows, scores[idx], strength)
                except Exception as e:
                    self.fail(name, rows, e)
                    continue
                if masked:  # a steered answer stays valid: a method that unmasks a token (or gives NaN) fails its row
                    for i, bad in zip(masked, unmasked(prior, scores[masked]).tolist()):
                        if bad:
                            self.fail(name, [batch.rows[i]], RuntimeError(
                                "its scores gave a token the requested output format forbids a chance, or held a NaN"))
                if pos:
                    trace.parts[name] = (pos, contribution(before, scores[[explain[p] for p in pos]]))
        if trace is not None:
            trace.final = scores[explain].float().log_softmax(-1)
        if scores is not base:
            changed = (scores.argmax(-1) != base.argmax(-1)).tolist()
            for row, c in zip(batch.rows, changed):
                row.steered_tokens += int(c)
        return scores

    def advance(self, batch, tokens: torch.Tensor) -> None:
        """Each method's state takes the tokens its rows chose."""
        for name, state in batch.states.items():
            idx = batch.rows_using(name)
            method = self.methods[name]
            # a method that reads the target's hidden states (TITA with a forked reward model) gets them too
            extra = (batch.trunk[idx],) if getattr(method, "reads_trunk", False) else ()
            try:
                self.timed(name, method.advance, state, [batch.rows[i] for i in idx], tokens[idx], *extra)
            except Exception as e:
                self.fail(name, [batch.rows[i] for i in idx], e)

    def select(self, batch, keep: list[int]) -> dict:
        """The states of the rows ``keep`` of ``batch``."""
        states = {}
        for name, state in batch.states.items():
            using = batch.rows_using(name)
            sub = [using.index(i) for i in keep if i in using]
            if sub:
                states[name] = state if sub == list(range(len(using))) else self.methods[name].select(state, sub)
        return states

    def merge(self, a, b) -> dict:
        """The states of batch ``a`` followed by batch ``b``."""
        states = {}
        for name in {*a.states, *b.states}:
            if name in a.states and name in b.states:
                states[name] = self.methods[name].merge(a.states[name], b.states[name])
            else:
                states[name] = a.states.get(name, b.states.get(name))
        return states
