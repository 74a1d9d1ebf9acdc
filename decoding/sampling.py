"""Sampling as pure functions over a logits tensor [rows, vocab], each row with its own parameters."""

from __future__ import annotations

import torch

from decoding.request import SAMPLING_EPS


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's presence and frequency penalties (as vLLM applies them, after logits processors): each
    token's logit less ``presence`` if it has been generated and ``frequency`` times how often.
    ``counts`` [rows, vocab]: generated tokens so far; ``presence``, ``frequency`` [rows]."""
    return logits - presence.unsqueeze(-1) * (counts > 0) - frequency.unsqueeze(-1) * counts


def apply_logit_bias(logits: torch.Tensor, biases: list[tuple[tuple[int, float], ...]]) -> torch.Tensor:
    """OpenAI's ``logit_bias``: each row's (token id, bias) pairs added to its logits [rows, vocab].
    Returns ``logits`` itself when no row has a bias (no copy)."""
    if not any(biases):
        return logits
    out = logits.clone()
    for i, pairs in enumerate(biases):
        if pairs:
            ids, values = zip(*pairs)
            out[i].index_add_(0, torch.tensor(ids, device=out.device), torch.tensor(values, dtype=out.dtype, device=out.device))
    return out


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, arXiv 1909.05858) as vLLM (``apply_repetition_penalties``)
    and transformers (``RepetitionPenaltyLogitsProcessor``) apply it: the logit of every token the row has
    seen (``seen`` [rows, vocab] bool: in its prompt or its output so far) divided by the row's ``penalty``
    [rows] (> 0) where it is positive, multiplied by it elsewhere; 1 leaves the row as it is. A masked
    token (-inf) stays masked."""
    p = torch.where(seen, penalty.to(logits.dtype).unsqueeze(-1), torch.ones((), dtype=logits.dtype, device=logits.device))
    return torch.where(logits > 0, logits / p, logits * p)


def seen_tokens(token_ids: list[list[int]], vocab: int, device=None) -> torch.Tensor:
    """[rows, vocab] bool: which tokens occur in each row's ``token_ids`` (ids outside the vocabulary are
    left out, as vLLM pads with the vocabulary size)."""
    seen = torch.zeros(len(token_ids), vocab, dtype=torch.bool, device=device)
    for i, ids in enumerate(token_ids):
        ids = [t for t in ids if 0 <= t < vocab]
        if ids:
            seen[i, torch.tensor(ids, device=device)] = True
    return seen


def suppress_tokens(logits: torch.Tensor, token_ids: list) -> torch.Tensor:
    """Each row's ``token_ids`` (a collection per row) set to -inf; ``logits`` itself when no row has any
    (no copy). vLLM's ``MinTokensLogitsProcessor`` masks a row's EOS and stop_token_ids this way."""
    if not any(token_ids):
        return logits
    out = logits.clone()
    for i, ids in enumerate(token_ids):
        if ids:
            out[i, torch.tensor(sorted(ids), device=out.device)] = float("-inf")
    return out


def output_counts(token_ids: list[list[int]], vocab: int, device=None) -> torch.Tensor:
    """[rows, vocab] how often each token occurs in each row's generated tokens."""
    counts = torch.zeros(len(token_ids), vocab, device=device)
    for i, ids in enumerate(token_ids):
        if ids:
            counts[i].index_add_(0, torch.tensor(ids, device=device), torch.ones(len(ids), device=device))
    return counts


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) every token outside the smallest set whose probability reaches ``top_p`` (per row)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each token
    drop_sorted = before >= top_p.unsqueeze(-1)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """vLLM's min-p (its ``MinPLogitsProcessor``; Nguyen et al. 2024, arXiv 2407.01082): mask (to -inf) every
    token whose probability is below ``min_p`` [rows, in [0, 1]] times the row's top probability; 0 keeps
    every token, 1 only the top ones."""
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p.to(probs.dtype).unsqueeze(-1), float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) every token below the row's ``top_k``-th largest logit (``top_k`` [rows] integers; 0,
    negative or beyond the vocabulary: no cut). Ties with the k-th logit stay, as in vLLM's
    ``apply_top_k_top_p``."""
    vocab = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k).to(torch.long)
    kmax = int(k.max())
    if kmax >= vocab and bool((k == vocab).all()):
        return logits
    kth = logits.topk(kmax, dim=-1).values.gather(-1, (k - 1).unsqueeze(-1))
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
    top_k: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row [rows]: argmax where temperature < SAMPLING_EPS, else a draw from
    softmax(logits / T) cut, in vLLM's sampler's order, at ``min_p``, ``top_k`` and ``top_p`` (each [rows];
    None: no cut). Greedy rows ignore the three cuts, as vLLM does.

    Each hot row draws one uniform number from its own generator (a CPU ``torch.Generator``, or torch's
    global one when None) and takes the token where it falls on the row's cumulative distribution
    (inverse-CDF sampling). The generators stay on the CPU whatever the logits' device (a CPU generator
    cannot drive ``torch.multinomial`` on a CUDA tensor), only the uniforms travel, in one copy, and a
    seeded request draws the same numbers on every device."""
    greedy = logits.argmax(-1)
    is_hot = temperature >= SAMPLING_EPS
    hot = is_hot.tolist()
    if not any(hot):
        return greedy
    t = torch.where(is_hot, temperature, torch.ones_like(temperature)).unsqueeze(-1)
    scaled = logits.float() / t
    if min_p is not None and bool((min_p > 0).any()):
        scaled = min_p_filter(scaled, min_p)
    if top_k is not None and bool((top_k > 0).any()):
        scaled = top_k_filter(scaled, top_k)
    cdf = top_p_filter(scaled, top_p).softmax(-1).double().cumsum(-1)
    u = torch.zeros(len(hot), 1, dtype=torch.float64)
    for i, h in enumerate(hot):
        if h:
            u[i] = torch.rand(1, generator=generators[i], dtype=torch.float64)
    u = u.to(cdf.device, non_blocking=True)
    drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
    return torch.where(is_hot.to(greedy.device), drawn, greedy)


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and the top-k (values, ids) per row."""
    logp = logits.float().log_softmax(-1)
    top = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], chosen[:, None][:, :0])
    return logp.gather(-1, chosen[:, None]).squeeze(-1), top[0], top[1]
