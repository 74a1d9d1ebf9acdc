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
