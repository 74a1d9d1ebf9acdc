"""What steering changed at one decoding step, per token (``"steering": {"explain": true}``): pure functions
over the step's logits, used by both engines.

A method rewrites the scores it is given: TITA returns ``log p + s (log p_RM - log p)``, FiSAO ``log p + s r``,
VCD ``log p + a (log p - log p_noised)`` (``decoding.steer_math``), ``log p`` being the log-softmax of its
input. A method's contribution to a token is therefore ``out - log_softmax(in)`` at that token: TITA's
strength-weighted log-ratio, FiSAO's strength-weighted verifier reward, VCD's weighted contrast. The
unsteered distribution is the model's logits with the request's ``logit_bias`` (which is not steering);
the steered log-prob is the log-softmax of the final scores (before penalties and temperature, as
``steered_tokens`` counts changes of the top token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenExplain:
    token_id: int  # the chosen token
    logprob: float  # its log-prob under the steered scores
    base_logprob: float  # its log-prob under the unsteered model
    base_token_id: int  # the unsteered model's top token
    base_top_logprob: float  # that token's unsteered log-prob
    contributions: dict[str, float] = field(default_factory=dict)  # method -> its change of the chosen token's score
    changed: bool = False  # steering changed the top token at this step


@dataclass
class StepTrace:
    """One step's tensors for the rows that asked for an explanation: ``rows`` their batch indices, ``base``
    and ``final`` log-probs [k, V], ``parts``: method -> (positions among ``rows``, contributions [m, V])."""

    rows: list[int]
    base: torch.Tensor
    final: torch.Tensor | None = None
    parts: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)


def contribution(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """A method's contribution [rows, V]: its output less the log-softmax of its input (-inf where it
    masked a token that was possible, e.g. VCD's plausibility cut)."""
    return after.float() - before.float().log_softmax(-1)


def explain_tokens(trace: StepTrace, tokens: torch.Tensor) -> dict[int, TokenExplain]:
    """Batch index -> the explanation of the token it chose (``tokens`` [B], the whole batch's)."""
    idx = torch.tensor(trace.rows, dtype=torch.long)
    chosen = tokens.to(trace.base.device)[idx]
    final = trace.final if trace.final is not None else trace.base
    at = lambda t: t.gather(-1, chosen[:, None]).squeeze(-1).tolist()  # noqa: E731
    top_v, top_i = trace.base.max(-1)
    out = {}
    base_at, final_at = at(trace.base), at(final)
    changed = (final.argmax(-1) != top_i).tolist()
    for k, i in enumerate(trace.rows):
        out[i] = TokenExplain(int(chosen[k]), final_at[k], base_at[k], int(top_i[k]), float(top_v[k]), {}, bool(changed[k]))
    for name, (pos, contrib) in trace.parts.items():
        vals = contrib.gather(-1, chosen[torch.tensor(pos, dtype=torch.long)][:, None]).squeeze(-1).tolist()
        for p, v in zip(pos, vals):
            out[trace.rows[p]].contributions[name] = v
    return out
