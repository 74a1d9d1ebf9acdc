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

from decoding.methods.base import SteeringMethod, register
from decoding.steer_math import token_bonus

YES_WORDS, NO_WORDS = ("yes", "Yes", " yes", " Yes"), ("no", "No", " no", " No")


@dataclass
class FisaoState:
    rewards: torch.Tensor  # [n, K]
    question: torch.Tensor  # [n] phrase index asked about, or -1


class PhraseTrie:
    """Token-id prefixes of the object phrases: prefix -> (next token ids, [n_next, K] phrase mask)."""

    def __init__(self, tokenizer, phrases: list[str]):
        seqs: list[tuple[tuple[int, ...], int]] = []
        for k, p in enumerate(phrases):
            for variant in (p, " " + p):
                ids = tuple(tokenizer(variant, add_special_tokens=False).input_ids)
                if ids and (ids, k) not in seqs:
                    seqs.append((ids, k))
        nexts: dict[tuple[int, ...], dict[int, set[int]]] = {}
        for ids, k in seqs:
            for j in range(len(ids)):
                nexts.setdefault(ids[:j], {}).setdefault(ids[j], set()).add(k)
        self.depth = max(len(ids) for ids, _ in seqs)
        self.nodes = {}
        for prefix, children in nexts.items():
            toks = torch.tensor(sorted(children))
            mask = torch.zeros(len(toks), len(phrases), dtype=torch.bool)
            for i, t in enumerate(toks.tolist()):
                mask[i, list(children[t])] = True
            self.nodes[prefix] = (toks, mask)

    def bonus(self, generated: list[int], rewards: torch.Tensor, vocab: int) -> torch.Tensor:
        out = torch.zeros(vocab)
        prefixes = [()] + [tuple(generated[-n:]) for n in range(1, self.depth) if len(generated) >= n]
        for prefix in prefixes:  # shallow first: a deeper match (continuing a phrase) overrides
            if prefix in self.nodes:
                toks, mask = self.nodes[prefix]
                out[toks] = rewards.masked_fill(~mask, float("-inf")).max(-1).values
        return out


@register
class Fisao(SteeringMethod):
    name = "fisao"
    default_strength = 3.0
    strength_range = (0.0, 20.0)
    needs = ("verifier",)
    alpha = 0.01  # plausibility set {v : p(v) >= alpha * max p}

    def __init__(self, resources):
        super().__init__(resources)
        tok = resources.target.tokenizer
        self.verifier = resources.verifier
        self.trie = PhraseTrie(tok, self.verifier.phrases)
        first = lambda words: sorted({tok(w, add_special_tokens=False).input_ids[0] for w in words} - {tok.unk_token_id})
        self.yes_ids, self.no_ids = first(YES_WORDS), first(NO_WORDS)
        self.vocab = resources.target.vocab_size

    def _question(self, request) -> int:
        text = " ".join(p.get("text", "") for m in request.messages[-1:] if m["role"] == "user"
                        for p in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
        low = f" {text.lower().strip()} "
        if not low.strip().startswith(("is there", "are there")):
            return -1
        hits = [k for k, p in enumerate(self.verifier.phrases) if f" {p.lower()} " in low]
        return hits[0] if len(hits) == 1 else -1

    def start(self, rows):
        rewards = torch.zeros(len(rows), len(self.verifier.phrases))
        with_images = [i for i, r in enumerate(rows) if r.request.images]
        if with_images:
            rewards[with_images] = self.verifier.rewards([rows[i].request.images[0] for i in with_images]).cpu()
        return FisaoState(rewards, torch.tensor([self._question(r.request) for r in rows]))

    def steer(self, state, rows, logits, strength):
        bonus = torch.stack([self.trie.bonus(r.token_ids, state.rewards[i], self.vocab) for i, r in enumerate(rows)])
        for i, r in enumerate(rows):
            q = int(state.question[i])
            if q >= 0 and not r.token_ids:
                bonus[i, self.yes_ids] = state.rewards[i, q]
                bonus[i, self.no_ids] = -state.rewards[i, q]
        return token_bonus(logits, bonus.to(logits.device), strength, self.alpha)

    def select(self, state, keep):
        idx = torch.tensor(keep, dtype=torch.long)
        return FisaoState(state.rewards[idx], state.question[idx])

    def merge(self, a, b):
        return FisaoState(torch.cat([a.rewards, b.rewards]), torch.cat([a.question, b.question]))
