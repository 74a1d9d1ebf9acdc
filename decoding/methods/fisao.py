"""FiSAO at decoding time: verifier rewards of object phrases added to the tokens that emit them.

Per request, once: the verifier's reward r(o) for every phrase o of its object vocabulary. Each step:
a token that would start a phrase gets the best reward among the phrases it starts; a token that would
complete or continue a phrase (given the row's last tokens) gets the best reward among those; the
bonus applies only inside the plausibility set. A yes/no question about a phrase ("is there a red
circle ?") maps the phrase's reward onto the first answer token: +r to "yes", -r to "no".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.host import upload

from decoding.methods.base import SteeringMethod, register, same_weights, vision_tower
from decoding.steer_math import token_bonus

YES_WORDS, NO_WORDS = ("yes", "Yes"), ("no", "No")
CONTEXTS = ("a", "the", ".", "is")  # words after which a phrase's in-context split is read off
JSON_STRING = '"'  # a phrase as a JSON string's value ('["red square"'): the quote may merge into its first token


def generated_splits(tokenizer, text: str) -> list[tuple[int, ...]]:
    """The token ids a model emits for ``text``: at the start of its answer and after a word. The second is
    read in context (the ids of "a " + text less those of "a"), not from " " + text alone: a SentencePiece
    tokenizer splits a lone " yes" into a bare "▁" and "▁yes", which no model generates after a word;
    byte-level tokenizers emit "Ġyes" after a word and "yes" at the start. A third split is the phrase opening
    a JSON string (structured outputs): the ids after a quote, or with the quote when the tokenizer merges it
    into the first word (the embedded tokenizer's '"red'), kept only when it decodes back to the phrase.
    Empty and duplicate splits dropped."""
    encode = lambda t: tuple(tokenizer(t, add_special_tokens=False).input_ids)
    out = [encode(text)]
    for ctx in CONTEXTS:
        head, full = encode(ctx), encode(f"{ctx} {text}")
        if head and full[: len(head)] == head and len(full) > len(head):
            out.append(full[len(head):])
            break
    quote, full = encode(JSON_STRING), encode(JSON_STRING + text)
    split = full[len(quote):] if quote and full[: len(quote)] == quote else full
    if tokenizer.unk_token_id not in split and tokenizer.decode(split).strip().lstrip(JSON_STRING).strip() == text.strip():
        out.append(split)
    return [ids for i, ids in enumerate(out) if ids and ids not in out[:i]]


@dataclass
class FisaoState:
    rewards: torch.Tensor  # [n, K]
    question: torch.Tensor  # [n] phrase index asked about, or -1
    node_rewards: torch.Tensor  # [n, trie nodes, children]


class PhraseTrie:
    """Token-id prefixes of the object phrases, as padded tensors so a step's bonus is a few batched
    scatters: node ``j`` (a prefix) has next tokens ``tokens[j]`` (padded with ``vocab``) and, for each,
    the phrases it leads to (``masks[j]``: [children, K]). Node 0 is the empty prefix."""

    def __init__(self, tokenizer, phrases: list[str], vocab: int):
        seqs: list[tuple[tuple[int, ...], int]] = []
        for k, p in enumerate(phrases):
            for ids in generated_splits(tokenizer, p):
                if (ids, k) not in seqs:
                    seqs.append((ids, k))
        nexts: dict[tuple[int, ...], dict[int, set[int]]] = {(): {}}
        for ids, k in seqs:
            for j in range(len(ids)):
                nexts.setdefault(ids[:j], {}).setdefault(ids[j], set()).add(k)
        self.depth = max(len(ids) for ids, _ in seqs)
        self.vocab = vocab
        self.index = {prefix: j for j, prefix in enumerate(sorted(nexts, key=len))}  # () first
        width = max(len(c) for c in nexts.values())
        self.tokens = torch.full((len(nexts), width), vocab, dtype=torch.long)
        self.masks = torch.zeros(len(nexts), width, len(phrases), dtype=torch.bool)
        for prefix, children in nexts.items():
            j = self.index[prefix]
            for i, t in enumerate(sorted(children)):
                self.tokens[j, i] = t
                self.masks[j, i, list(children[t])] = True

    def node_rewards(self, scores: torch.Tensor, reward) -> torch.Tensor:
        """[n, nodes, children]: for each row, the reward of the best verifier score among the phrases
        each child token leads to (computed once per request); ``reward(z, group)`` judges a token that
        leads to several phrases with the group thresholds."""
        best = scores[:, None, None, :].masked_fill(~self.masks[None], float("-inf")).amax(-1)
        r = reward(best, (self.masks.sum(-1) > 1)[None].expand_as(best))
        return torch.where(self.masks.any(-1)[None], r, 0.0)

    def nodes_at(self, generated: list[int], level: int) -> int:
        """The node matching the last ``level`` generated tokens, or -1."""
        if level == 0:
            return 0
        return self.index.get(tuple(generated[-level:]), -1) if len(generated) >= level else -1

    def bonus(self, token_ids: list[list[int]], node_rewards: torch.Tensor) -> torch.Tensor:
        """[n, vocab] bonus per row: shallow prefixes first, a deeper match (continuing a phrase)
        overrides the tokens it names."""
        n = len(token_ids)
        out = torch.zeros(n, self.vocab + 1)
        out.scatter_(1, self.tokens[0].expand(n, -1), node_rewards[:, 0])  # the root: every row
        for level in range(1, self.depth):
            hits = [(i, j) for i, t in enumerate(token_ids) if (j := self.nodes_at(t, level)) >= 0]
            if hits:
                r, j = torch.tensor(hits).T
                out[r[:, None], self.tokens[j]] = node_rewards[r, j]
        return out[:, : self.vocab]


@register
class Fisao(SteeringMethod):
    name = "fisao"
    default_strength = 6.0
    strength_range = (0.0, 20.0)
    needs = ("verifier",)

    @classmethod
    def unavailable(cls, resources) -> str | None:
        reason = super().unavailable(resources)
        if reason is None and not resources.verifier.calibrated:
            return (f"needs a calibrated verifier: {resources.verifier.calibration_path} does not exist "
                    "(run `vlm-steer train calibrate`)")
        return reason
    alpha = 0.01  # plausibility set {v : p(v) >= alpha * max p}
    bonus_weight = 0.0  # weight of positive rewards relative to penalties (docs/benchmarks.md, "Tried and dropped": penalties only)

    def __init__(self, resources):
        super().__init__(resources)
        tok = resources.target.tokenizer
        self.verifier = resources.verifier
        self.vocab = resources.target.vocab_size
        self.trie = PhraseTrie(tok, self.verifier.phrases, self.vocab)
        first = lambda words: sorted({ids[0] for w in words for ids in generated_splits(tok, w)
                                      if tok.decode(ids[:1]).strip()} - {tok.unk_token_id})
        self.yes_ids, self.no_ids = first(YES_WORDS), first(NO_WORDS)
        # FiSAO's verifier is the VLM's own vision encoder: when the weights are the same, reuse the
        # pooled output of the prefill's vision pass instead of running the tower again
        self.shared_tower = (getattr(resources.target, "shares_tower_outputs", False) and self.verifier.pools_like_clip
                             and same_weights(self.verifier.model.vision_model, vision_tower(resources.target.model)))
        self.reads_images = not self.shared_tower  # the verifier's own processor then takes the image

    def _question(self, request) -> int:
        text = " ".join(p.get("text", "") for m in request.messages[-1:] if m["role"] == "user"
                        for p in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
        low = f" {text.lower().strip()} "
        if not low.strip().startswith(("is there", "are there")):
            return -1
        hits = [k for k, p in enumerate(self.verifier.phrases) if f" {p.lower()} " in low]
        return hits[0] if len(hits) == 1 else -1

    def start(self, rows):
        z = torch.zeros(len(rows), len(self.verifier.phrases))
        scored = [i for i, r in enumerate(rows) if r.verifier_scores is not None]  # scored at admission (vllm engine)
        if scored:
            z[scored] = torch.stack([rows[i].verifier_scores for i in scored])
        with_images = [i for i, r in enumerate(rows) if r.request.images and r.verifier_scores is None]
        if with_images and self.shared_tower and all(rows[i].image_pooled is not None for i in with_images):
            z[with_images] = self.verifier.scores_from_pooled(torch.stack([rows[i].image_pooled for i in with_images])).cpu()
        elif with_images:
            z[with_images] = self.verifier.scores([rows[i].request.images[0] for i in with_images]).cpu()
        rewards = self.verifier.reward(z)
        node = self.trie.node_rewards(z, self.verifier.reward)
        node = torch.where(node > 0, node * self.bonus_weight, node)
        if len(with_images) + len(scored) < len(rows):  # no image, nothing to verify against
            blind = torch.tensor([not r.request.images and r.verifier_scores is None for r in rows])
            rewards[blind], node[blind] = 0.0, 0.0
        question = torch.tensor([self._question(r.request) for r in rows], dtype=torch.long)
        return FisaoState(rewards, question, node)

    def steer(self, state, rows, logits, strength):
        bonus = self.trie.bonus([r.token_ids for r in rows], state.node_rewards)
        first = [j for j, r in enumerate(rows) if not r.token_ids and state.question[j] >= 0]
        if first:  # the first answer token of "is there an X ?": +r(X) on yes, -r(X) on no
            i = torch.tensor(first)
            r = state.rewards[i, state.question[i]][:, None]
            bonus[i[:, None], torch.tensor(self.yes_ids)] = r
            bonus[i[:, None], torch.tensor(self.no_ids)] = -r
        return token_bonus(logits, upload(bonus, bonus.dtype, logits.device), strength, self.alpha)

    def select(self, state, keep):
        idx = torch.tensor(keep, dtype=torch.long)
        return FisaoState(state.rewards[idx], state.question[idx], state.node_rewards[idx])

    def merge(self, a, b):
        return FisaoState(*(torch.cat([x, y]) for x, y in ((a.rewards, b.rewards), (a.question, b.question),
                                                          (a.node_rewards, b.node_rewards))))
