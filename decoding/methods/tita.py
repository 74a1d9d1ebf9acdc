"""TITA: the log-prob ratio of a small DPO-trained reward VLM and the target VLM, added at every step.

The reward model is either
- a second engine with the same tokenizer: its rows (prefilled once with the same image and prompt, in
  its own KV cache) follow the target's rows and are fed the chosen tokens, one batched reward-model step
  per target step; or
- a fork of the target (``decoding.fork``): its top k layers and head, fed the target's own hidden
  states, consulted lazily.

The gate (the engine's ``tita_gate``): a row whose target top-1 probability is at least the gate keeps the
target's scores at that step (the log-ratio is taken as zero, as Nudging, arXiv 2410.09300, leaves
confident tokens to the base model). With a fork, a step where no row is consulted runs nothing of it; at
a consulted step the fork first reads every token since its last consultation in one forward, then its
head runs for the consulted rows only. A separate reward model still steps every token (its cache).

Candidates (the engine's ``tita_candidates``, K > 0): the log-ratio is taken inside the target's top K
tokens only (``decoding.steer_math.tita_candidates``); a fork's head then costs K of its V rows.
"""

from __future__ import annotations

import torch

from decoding.fork import Fork
from decoding.host import upload
from decoding.methods.base import SteeringMethod, register, same_weights, vision_tower
from decoding.model_inputs import extended
from decoding.steer_math import tita, tita_candidates


def same_inputs(a, b) -> bool:
    """Whether two engines turn a request into the same prompt ids and pixels (same processor)."""
    pa, pb = a.processor, b.processor
    return (type(pa) is type(pb) and pa.to_dict() == pb.to_dict() and pa.chat_template == pb.chat_template
            and pa.tokenizer.get_vocab() == pb.tokenizer.get_vocab()
            and getattr(a.config, "image_token_id", None) == getattr(b.config, "image_token_id", None))


def target_rows(reward_logits: torch.Tensor, n: int) -> torch.Tensor:
    """The reward model's logits [B, V_rm] over the target's ``n`` output rows [B, n]. Checkpoints of one
    family pad their output layer past the tokenizer differently (Qwen2.5-VL-3B has 151,936 rows, 7B
    152,064): rows beyond the reward model's get its lowest logit of the row (no token of the shared
    tokenizer lives there), extra rows are dropped. Engines check at load that both cover the tokenizer."""
    v = reward_logits.shape[-1]
    if v == n:
        return reward_logits
    if v > n:
        return reward_logits[..., :n]
    pad = reward_logits.amin(-1, keepdim=True).expand(*reward_logits.shape[:-1], n - v)
    return torch.cat([reward_logits, pad], -1)


def check_rows(rows: int, tokens: int, reward_path) -> None:
    """The reward model's output rows must cover the shared tokenizer (padding rows beyond it may differ:
    ``decoding.methods.tita.target_rows``)."""
    if rows < tokens:
        raise ValueError(f"the reward model at {reward_path} has {rows} output rows for a tokenizer of {tokens} "
                         "tokens; TITA needs a log-prob for every token")


def _padded_masks(per_row: list[dict], n: int) -> dict:
    """The prebuilt 4-D prompt masks of rows (Gemma 3's, where image tokens attend both ways), each
    [1, 1, t, t], left-padded into [B, 1, n, n]: padding positions attend only to themselves."""
    out = {}
    for key in per_row[0]:
        blocks = [m[key] for m in per_row]
        if blocks[0] is None:
            out[key] = None
            continue
        ref = blocks[0]
        blocked, allowed = (False, True) if ref.dtype == torch.bool else (torch.finfo(ref.dtype).min, 0.0)
        full = torch.full((len(blocks), 1, n, n), blocked, dtype=ref.dtype, device=ref.device)
        full[:, :, torch.arange(n), torch.arange(n)] = allowed
        for i, m in enumerate(blocks):
            t = m.shape[-1]
            full[i, :, n - t:, n - t:] = m[0]
        out[key] = full
    return out


@register
class Tita(SteeringMethod):
    name = "tita"
    default_strength = 0.9
    strength_range = (0.0, 1.0)
    needs = ("reward",)

    def __init__(self, resources):
        super().__init__(resources)
        self.reads_trunk = isinstance(resources.reward, Fork)
        # part of the engine's own model (``decoding.vllm.fork_model``): the engine runs its layers and
        # owns its KV cache; TITA reads its logits for the rows' batch positions (``row.batch_index``)
        self.in_model = getattr(resources.reward, "in_model", False)
        self.gate = float(getattr(resources.target, "tita_gate", 1.0))
        self.candidates = int(getattr(resources.target, "tita_candidates", 0))  # 0: the whole vocabulary
        self.consulted = self.skipped = 0  # row-steps at which the reward model was / was not consulted
        if self.reads_trunk or self.in_model:
            return
        # The reward model sees the same image and prompt: when its processor and vision tower are the
        # target's, it takes the target's prompt ids and tower features instead of recomputing them.
        self.reuse_inputs = same_inputs(resources.target, self.rm)
        self.reuse_tower = (self.reuse_inputs and getattr(resources.target, "shares_tower_outputs", False)
                            and same_weights(vision_tower(resources.target.model), vision_tower(self.rm.model)))
        self.reads_images = not self.reuse_inputs  # the reward model's own processor then encodes the request

    @property
    def rm(self):
        return self.resources.reward

    def _rm_row(self, row):
        """The reward model's row for a target row; tokens the target row has already generated (a row
        that starts steering mid-answer, e.g. resumed in vLLM's batch) follow its prompt."""
        if self.reuse_inputs:
            feats = row.image_features if self.reuse_tower else None
            rm_row = type(row)(row.request, row.prompt_ids, row.inputs, image_features=feats)
        else:
            rm_row = self.rm.encode(row.request, steer=False)
        if row.token_ids:
            n = len(rm_row.prompt_ids)
            rm_row = type(rm_row)(rm_row.request, rm_row.prompt_ids + [min(t, self.rm.vocab_size - 1) for t in row.token_ids],
                                  extended(rm_row.inputs, n, len(row.token_ids)), image_features=rm_row.image_features)
        return rm_row

    def pop_consultations(self) -> tuple[int, int]:
        """(consulted, skipped) row-steps since the last call."""
        out = (self.consulted, self.skipped)
        self.consulted = self.skipped = 0
        return out

    def start(self, rows):
        if self.in_model:
            return None  # nothing to keep: the engine's model holds the reward model's cache
        if self.reads_trunk:
            return self._start_fork(rows)
        return self.rm.prefill([self._rm_row(r) for r in rows], reuse_features=self.reuse_tower)

    def _start_fork(self, rows):
        """The fork over the rows' prompts, left-padded (the target captured their hidden states)."""
        if any(r.trunk is None for r in rows):
            raise RuntimeError("a forked reward model starts only with the target's prefill (no captured hidden states)")
        n = max(len(r.trunk[0]) for r in rows)
        h0, p0, _, m0 = rows[0].trunk
        hidden = h0.new_zeros((len(rows), n, h0.shape[-1]))
        pos = p0.new_zeros((*p0.shape[:-1], len(rows), n))  # [B, T], or [axes, B, T] for M-RoPE
        mask = torch.zeros((len(rows), n), dtype=torch.long, device=hidden.device)
        for i, r in enumerate(rows):
            h, p, _, _ = r.trunk
            hidden[i, n - len(h):] = h
            pos[..., i, n - len(h):] = p
            mask[i, n - len(h):] = 1
        masks = _padded_masks([r.trunk[3] for r in rows], n) if m0 else None
        next_pos = torch.stack([r.trunk[2] for r in rows])
        for r in rows:
            r.trunk = None  # read once: the prompt's hidden states are not kept
        return self.rm.prefill(hidden, mask, pos, next_pos, masks)

    def _consulted(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Row indices [n] whose target top-1 probability is below the gate (None: every row)."""
        if self.gate >= 1.0:
            return None
        ask = (logits.float().softmax(-1).amax(-1) < self.gate).nonzero().flatten()
        return None if len(ask) == len(logits) else ask

    def steer(self, state, rows, logits, strength):
        ask = self._consulted(logits)
        n = len(rows) if ask is None else len(ask)
        self.consulted += n
        self.skipped += len(rows) - n
        if n == 0:  # every row is confident: the reward model is not consulted (a fork runs nothing); the
            return logits.float().log_softmax(-1)  # scores are log-probs like a consulted row's (contribution 0)
        asked = logits if ask is None else logits[ask]
        cand = asked.topk(self.candidates, -1).indices if 0 < self.candidates < logits.shape[-1] else None
        if self.in_model:
            where = upload([r.batch_index for r in rows], torch.long, logits.device)
            rm = self.rm.logits(where if ask is None else where[ask], cand)
        elif self.reads_trunk:
            self.rm.catch_up(state)
            rm = self.rm.logits(state, ask, cand)  # with candidates, the fork's head runs over K rows only
        else:  # a separate reward model has stepped with the target: the gate only leaves confident rows alone
            rm = target_rows(state.logits if ask is None else state.logits[ask], logits.shape[-1])
            rm = rm if cand is None else rm.gather(-1, cand)
        s = strength if ask is None else strength[ask]
        scores = tita(asked, rm, s) if cand is None else tita_candidates(asked, cand, rm, s)
        if ask is None:
            return scores
        out = logits.float().log_softmax(-1)
        out[ask] = scores
        return out

    def advance(self, state, rows, tokens: torch.Tensor, trunk: torch.Tensor | None = None) -> None:
        if self.in_model:
            return
        if self.reads_trunk:
            self.rm.feed(state, trunk)  # read at the next consultation
            return
        # a token past the reward model's rows is past the shared tokenizer too (an output row of padding,
        # which only a random-weight target picks): the reward model reads its last row instead of failing
        self.rm.decode_one_token(state, tokens.clamp_max(self.rm.vocab_size - 1))

    def select(self, state, keep):
        return self.rm.select(state, keep)

    def merge(self, a, b):
        return self.rm.merge(a, b)
