"""Steering math on hand-made logits: known outputs for known inputs, and per-row isolation."""

import math

import torch

from decoding.steer_math import plausible, tita, tita_candidates, token_bonus, vcd

L = torch.log


def test_tita_interpolates_log_probs():
    t = L(torch.tensor([[0.7, 0.2, 0.1]]))
    r = L(torch.tensor([[0.1, 0.8, 0.1]]))
    s = tita(t, r, torch.tensor([0.6]))
    expect = 0.4 * t + 0.6 * r
    assert torch.allclose(s, expect, atol=1e-6)
    assert s.argmax().item() == 1  # the reward model flips the greedy choice
    assert tita(t, r, torch.tensor([0.0])).argmax().item() == 0


def test_tita_rows_are_isolated():
    t = torch.randn(3, 10)
    r = torch.randn(3, 10)
    s = tita(t, r, torch.tensor([0.0, 0.6, 0.0]))
    assert torch.allclose(s[[0, 2]], t[[0, 2]].log_softmax(-1))
    assert not torch.allclose(s[1], t[1].log_softmax(-1))


def test_plausibility_set():
    logits = L(torch.tensor([[0.5, 0.3, 0.04, 0.16]]))
    assert plausible(logits, 0.1).tolist() == [[True, True, False, True]]


def test_token_bonus_only_inside_plausible_set():
    logits = L(torch.tensor([[0.6, 0.35, 0.05]]))
    bonus = torch.tensor([[-1.0, 1.0, 1.0]])
    s = token_bonus(logits, bonus, torch.tensor([2.0]), alpha=0.1)
    lp = logits.log_softmax(-1)
    assert torch.allclose(s, torch.stack([lp[0, 0] - 2, lp[0, 1] + 2, lp[0, 2]]).unsqueeze(0))
    assert s.argmax().item() == 1
    # zero strength: the row's log-probs unchanged
    assert torch.allclose(token_bonus(logits, bonus, torch.tensor([0.0]), 0.1), lp)


def test_vcd_contrast_and_cutoff():
    clean = L(torch.tensor([[0.5, 0.4, 0.1 - 1e-3, 1e-3]]))
    noised = L(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    s = vcd(clean, noised, torch.tensor([1.0]), beta=0.1)
    lc, ln = clean.log_softmax(-1), noised.log_softmax(-1)
    assert math.isclose(s[0, 1].item(), (2 * lc[0, 1] - ln[0, 1]).item(), rel_tol=1e-5)
    assert s[0, 3].item() == float("-inf")  # below beta * max p on the clean image
    assert s.argmax().item() == 1  # the token that the noised image does not explain wins


def test_tita_keeps_masked_tokens_masked():
    """A token masked before steering (-inf from a grammar or an allowed-token list) stays -inf, not NaN."""
    target = torch.tensor([[0.0, float("-inf"), 1.0, 2.0]])
    reward = torch.tensor([[3.0, 5.0, 0.0, 1.0]])
    for s in (0.0, 0.5, 1.0):
        out = tita(target, reward, torch.tensor([s]))
        assert not out.isnan().any() and out[0, 1] == float("-inf")
    assert int(tita(target, reward, torch.tensor([1.0])).argmax()) == 0  # the reward model's best allowed token


def test_tita_over_candidates_known_values():
    """Inside C = {0, 1}: log p_t(v) + lambda (log p_RM(v | C) - log p_t(v | C)); token 2 outside keeps log p_t."""
    t = L(torch.tensor([[0.6, 0.3, 0.1]]))
    r = torch.tensor([[L(torch.tensor(0.2)), L(torch.tensor(0.8))]])  # the reward model's logits at C only
    out = tita_candidates(t, torch.tensor([[0, 1]]), r, torch.tensor([0.5]))
    expect = [math.log(0.6) + 0.5 * (math.log(0.2) - math.log(0.6 / 0.9)),
              math.log(0.3) + 0.5 * (math.log(0.8) - math.log(0.3 / 0.9)), math.log(0.1)]
    assert torch.allclose(out, torch.tensor([expect]), atol=1e-6)
    assert out.argmax().item() == 1  # the reward model flips the greedy choice inside C


def test_tita_over_candidates_is_tita_within_them():
    """With C the whole vocabulary it is ``tita``; with C the top K it is ``tita`` up to a per-row constant on
    C (same argmax and same softmax among C), and every other token keeps the target's log-prob."""
    torch.manual_seed(0)
    t, r, s = torch.randn(4, 50) * 3, torch.randn(4, 50) * 3, torch.tensor([0.0, 0.3, 0.9, 1.0])
    every = torch.arange(50).expand(4, 50)
    assert torch.allclose(tita_candidates(t, every, r.gather(-1, every), s), tita(t, r, s), atol=1e-5)
    cand = t.topk(8, -1).indices
    out, exact = tita_candidates(t, cand, r.gather(-1, cand), s), tita(t, r, s)
    gap = out.gather(-1, cand) - exact.gather(-1, cand)
    assert torch.allclose(gap, gap[:, :1].expand_as(gap), atol=1e-5)
    outside = torch.ones_like(t, dtype=torch.bool).scatter(-1, cand, False)
    assert torch.equal(out[outside], t.log_softmax(-1)[outside])
    assert torch.allclose(out[0], t[0].log_softmax(-1))  # strength 0: the target's log-probs


def test_tita_over_candidates_keeps_masked_tokens_masked():
    """More candidates than allowed tokens: a masked candidate stays -inf, no NaN."""
    target = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]])
    cand = target.topk(3, -1).indices
    for s in (0.0, 0.5, 1.0):
        out = tita_candidates(target, cand, torch.tensor([[3.0, 5.0, 0.0]]), torch.tensor([s]))
        assert not out.isnan().any() and out[0, 1] == out[0, 3] == float("-inf")
