"""TITA: the log-prob ratio of a small DPO-trained reward VLM and the target VLM, added at every step.

The reward model is a second engine with the same tokenizer. Its rows (prefilled once with the same
image and prompt, in its own KV cache) follow the target's rows and are fed the chosen tokens, one
batched reward-model step per target step.
"""

from __future__ import annotations

import torch

from decoding.methods.base import SteeringMethod, register, same_weights, vision_tower
from decoding.model_inputs import extended
from decoding.steer_math import tita


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


@register
class Tita(SteeringMethod):
    name = "tita"
    default_strength = 0.9
    strength_range = (0.0, 1.0)
    needs = ("reward",)

    def __init__(self, resources):
        super().__init__(resources)
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

    def start(self, rows):
        return self.rm.prefill([self._rm_row(r) for r in rows], reuse_features=self.reuse_tower)

    def steer(self, state, rows, logits, strength):
        return tita(logits, target_rows(state.logits, logits.shape[-1]), strength)

    def advance(self, state, rows, tokens: torch.Tensor) -> None:
        # a token past the reward model's rows is past the shared tokenizer too (an output row of padding,
        # which only a random-weight target picks): the reward model reads its last row instead of failing
        self.rm.decode_one_token(state, tokens.clamp_max(self.rm.vocab_size - 1))

    def select(self, state, keep):
        return self.rm.select(state, keep)

    def merge(self, a, b):
        return self.rm.merge(a, b)
