"""Sampling as pure functions over logits: greedy, temperature, top-p, logprobs."""

import torch

from decoding.sampling import sample_tokens, token_logprobs, top_p_filter


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    out = top_p_filter(logits, torch.tensor([0.7, 1.0]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[1]).all()
    out = top_p_filter(logits, torch.tensor([0.01, 0.01]))  # the top token always survives
    assert torch.isfinite(out).sum(1).tolist() == [1, 1]


def test_greedy_rows_take_argmax_and_hot_rows_are_seeded():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 0.1, 0.2]])
    temp, top_p = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    draws = set()
    for seed in range(30):
        g = [None, torch.Generator().manual_seed(seed)]
        t = sample_tokens(logits, temp, top_p, g)
        assert t[0].item() == 1
        g2 = [None, torch.Generator().manual_seed(seed)]
        assert sample_tokens(logits, temp, top_p, g2)[1] == t[1]
        draws.add(t[1].item())
    assert draws == {0, 1, 2}


def test_token_logprobs_known_values():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    chosen, top_v, top_i = token_logprobs(logits, torch.tensor([1]), 2)
    assert torch.allclose(chosen, torch.log(torch.tensor([0.25])))
    assert top_i[0, 0].item() == 0 and torch.allclose(top_v[0, 0], torch.log(torch.tensor(0.5)))


def test_penalties_known_values():
    from decoding.sampling import apply_penalties, output_counts

    counts = output_counts([[2, 2, 0], [], [1]], 4)
    assert counts.tolist() == [[1, 0, 2, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    logits = torch.zeros(3, 4)
    out = apply_penalties(logits, counts, torch.tensor([0.5, 0.5, -1.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert out.tolist() == [[-1.5, 0.0, -2.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_logit_bias_known_values():
    from decoding.sampling import apply_logit_bias

    logits = torch.zeros(3, 5)
    out = apply_logit_bias(logits, [((1, 2.0), (4, -100.0)), (), ((0, 0.5), (0, 0.25))])
    assert out.tolist() == [[0, 2, 0, 0, -100], [0] * 5, [0.75, 0, 0, 0, 0]]
    assert logits.abs().sum() == 0  # a copy: the model's logits are left as they are
    assert apply_logit_bias(logits, [(), (), ()]) is logits


def test_top_p_zero_keeps_the_top_token_only():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    out = top_p_filter(logits, torch.tensor([0.0]))
    assert torch.isfinite(out).tolist() == [[False, True, False, False]]
    g = torch.Generator().manual_seed(0)
    assert {int(sample_tokens(logits, torch.tensor([1.5]), torch.tensor([0.0]), [g])) for _ in range(20)} == {1}


# ------------------------------------------------------------------ vLLM's sampling extensions


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability():
    """Probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.5 keeps p >= 0.25 (two tokens), 0.2 keeps p >= 0.1 (three),
    1 the top token, 0 every token."""
    from decoding.sampling import min_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    out = min_p_filter(logits, torch.tensor([0.5, 0.2, 1.0, 0.0]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True, True, True, False], [True, False, False, False], [True] * 4]
    assert torch.equal(out[0, :2], logits[0, :2])  # kept logits are untouched
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_tokens(logits[:1], torch.tensor([1.0]), torch.tensor([1.0]), [g], min_p=torch.tensor([0.5])))
             for _ in range(200)}
    assert drawn == {0, 1}


def test_min_p_applies_to_the_tempered_distribution():
    """vLLM's sampler applies min_p after the temperature: at T=2 the probabilities flatten and token 2
    (prob 0.15 at T=1) passes a min_p of 0.5 that cuts it at T=1."""
    from decoding.sampling import min_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(min_p_filter(logits, torch.tensor([0.5]))).sum() == 2
    assert torch.isfinite(min_p_filter(logits / 2.0, torch.tensor([0.5]))).sum() == 3
    g = torch.Generator().manual_seed(1)
    drawn = {int(sample_tokens(logits, torch.tensor([2.0]), torch.tensor([1.0]), [g], min_p=torch.tensor([0.5])))
             for _ in range(300)}
    assert drawn == {0, 1, 2}


def test_top_k_keeps_the_k_largest_logits_per_row():
    from decoding.sampling import top_k_filter

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 3.0, 2.0], [1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    out = top_k_filter(logits, torch.tensor([2, 0, 1, 9]))  # 0 and beyond the vocabulary: no cut
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True] * 4, [True, True, True, False], [True] * 4]
    assert top_k_filter(logits, torch.tensor([0, -1, 0, 4])) is logits


def test_top_k_one_samples_the_greedy_token_whatever_the_seed():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [2.0, 0.0, 1.9, 0.0]])
    greedy = logits.argmax(-1).tolist()
    for seed in range(30):
        g = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 100)]
        got = sample_tokens(logits, torch.tensor([1.5, 1.0]), torch.tensor([1.0, 1.0]), g, top_k=torch.tensor([1, 1]))
        assert got.tolist() == greedy


def test_top_k_then_top_p_as_vllm_orders_them():
    """top_p is taken over the distribution top_k left (renormalised): top_k 2 of (0.4, 0.3, 0.2, 0.1)
    leaves 4/7 and 3/7, and top_p 0.5 then keeps the first alone."""
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_tokens(logits, torch.tensor([1.0]), torch.tensor([0.5]), [g], top_k=torch.tensor([2])))
             for _ in range(50)}
    assert drawn == {0}


def test_greedy_rows_ignore_top_k_and_min_p():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    got = sample_tokens(logits, torch.tensor([0.0]), torch.tensor([1.0]), [None], top_k=torch.tensor([1]), min_p=torch.tensor([1.0]))
    assert got.tolist() == [1]


def test_repetition_penalty_known_values():
    """vLLM's and transformers' rule: a seen token's logit divided by the penalty where positive, multiplied
    where negative or zero; unseen tokens and penalty 1 untouched; a masked token stays masked."""
    from decoding.sampling import apply_repetition_penalty, seen_tokens

    seen = seen_tokens([[0, 1, 4], [0, 1], [99, -1]], 5)  # ids outside the vocabulary are left out
    assert seen.tolist() == [[True, True, False, False, True], [True, True, False, False, False], [False] * 5]
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, float("-inf")], [2.0, -2.0, 2.0, -2.0, 0.0], [2.0, -2.0, 2.0, -2.0, 0.0]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 1.0, 0.5]))
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, float("-inf")], [2.0, -2.0, 2.0, -2.0, 0.0], [2.0, -2.0, 2.0, -2.0, 0.0]]
    below_one = apply_repetition_penalty(torch.tensor([[2.0, -2.0]]), torch.tensor([[True, True]]), torch.tensor([0.5]))
    assert below_one.tolist() == [[4.0, -1.0]]  # a penalty below 1 favours repeats


def test_suppress_tokens_masks_each_rows_ids_only():
    from decoding.sampling import suppress_tokens

    logits = torch.zeros(3, 4)
    out = suppress_tokens(logits, [{1, 3}, frozenset(), (0,)])
    assert torch.isneginf(out).tolist() == [[False, True, False, True], [False] * 4, [True, False, False, False]]
    assert logits.abs().sum() == 0 and suppress_tokens(logits, [(), (), ()]) is logits
