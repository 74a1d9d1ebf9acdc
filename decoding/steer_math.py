"""Steering math as pure functions over logits [rows, vocab]; each row has its own strength.

Every function returns *scores* that replace the row's logits before sampling (greedy argmax or
softmax(scores / T)). A row with strength 0 gets its logits back unchanged up to a per-row constant.
"""

from __future__ import annotations

import torch


def plausible(logits: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """The plausibility set {v : p(v) >= alpha * max p} (VCD's adaptive cut-off), as a bool mask."""
    return _plausible_logp(logits.float().log_softmax(-1), alpha)


def _plausible_logp(logp: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``plausible`` for log-probabilities already computed."""
    alpha = torch.as_tensor(alpha, dtype=logp.dtype, device=logp.device).reshape(-1, 1)
    cut = logp.max(-1, keepdim=True).values + torch.log(alpha.clamp_min(1e-30))
    return logp >= cut


def tita(target_logits: torch.Tensor, reward_logits: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """TITA: s = log p_target + lambda * (log p_RM - log p_target) = (1 - lambda) log p_target + lambda log p_RM."""
    lt = target_logits.float().log_softmax(-1)
    lr = reward_logits.float().log_softmax(-1)
    # a token masked before steering (-inf: a grammar, an allowed-token list) stays masked, not NaN
    return torch.where(torch.isneginf(lt), lt, lt + strength.reshape(-1, 1) * (lr - lt))


def tita_candidates(target_logits: torch.Tensor, candidates: torch.Tensor, reward_logits: torch.Tensor,
                    strength: torch.Tensor) -> torch.Tensor:
    """TITA inside a candidate set C (the target's top K tokens), for a reward model that scores only C
    (reward-guided decoding over the top-k candidates, as ARGS, Khanov et al. 2024, arXiv 2402.01694):
    s(v) = log p_target(v) + lambda * (log p_RM(v | C) - log p_target(v | C)) for v in C, log p_target(v)
    elsewhere. Within C this is ``tita`` up to a per-row constant (so greedy and sampling among C agree with
    it); no token outside C gains.

    ``target_logits`` [B, V]; ``candidates`` [B, K] token ids; ``reward_logits`` [B, K] the reward model's
    logits at those ids; ``strength`` [B]. Returns scores [B, V]. With K = V it equals ``tita``."""
    lt = target_logits.float().log_softmax(-1)
    lt_c = lt.gather(-1, candidates)
    lr_c = reward_logits.float().log_softmax(-1)
    step = lt_c + strength.reshape(-1, 1) * (lr_c - lt_c.log_softmax(-1))
    # a candidate masked before steering (fewer allowed tokens than K) stays masked, not NaN
    return lt.scatter(-1, candidates, torch.where(torch.isneginf(lt_c), lt_c, step))


def token_bonus(logits: torch.Tensor, bonus: torch.Tensor, strength: torch.Tensor, alpha: float) -> torch.Tensor:
    """FiSAO at decoding time: log p + lambda * r(v) for tokens v inside the plausibility set, where r is
    the verifier reward of the object phrase that v would emit or complete (0 for other tokens).
    Tokens outside the set are left as they are, so a bonus cannot inject an implausible object."""
    logp = logits.float().log_softmax(-1)
    inside = _plausible_logp(logp, alpha)
    return logp + torch.where(inside, strength.reshape(-1, 1) * bonus, 0.0)


def vcd(clean_logits: torch.Tensor, noised_logits: torch.Tensor, strength: torch.Tensor, beta: float) -> torch.Tensor:
    """VCD: (1 + a) * logits(image) - a * logits(noised image), cut to the clean plausibility set."""
    lc = clean_logits.float().log_softmax(-1)
    ln = noised_logits.float().log_softmax(-1)
    a = strength.reshape(-1, 1)
    out = (1 + a) * lc - a * ln
    return out.masked_fill(~_plausible_logp(lc, beta), float("-inf"))
