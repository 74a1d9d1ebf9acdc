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


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One token per row [rows]: argmax where temperature < SAMPLING_EPS, else a draw from
    softmax(logits / T) cut at top_p.

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
    cdf = top_p_filter(logits.float() / t, top_p).softmax(-1).double().cumsum(-1)
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
