"""vLLM's sampling fields on the vllm engine (run by `make test-vllm`): vLLM's own sampler and built-in
logits processors serve repetition_penalty, min_tokens, stop_token_ids, top_k and min_p, and with steering
in between (vLLM runs its built-in processors, then ours, then the penalties) the greedy outputs equal the
transformers engine's, which applies them in the same order."""

import pytest

from decoding.request import SamplingParams
from tests.vllm.test_vllm_engine import reference, requests  # noqa: F401  (the module's fixture and requests)


def _and(engine) -> int:
    (tid,) = engine.tokenizer("and", add_special_tokens=False).input_ids
    return tid


@pytest.mark.parametrize("method", ["none", "tita"])
@pytest.mark.parametrize("fields", ["repetition_penalty", "min_tokens", "stop_token_ids"])
def test_sampling_fields_equal_the_transformers_engine(steering_engine, reference, method, fields):  # noqa: F811
    sampling = {"repetition_penalty": dict(repetition_penalty=1.5),
                "min_tokens": dict(min_tokens=12, repetition_penalty=0.8),
                "stop_token_ids": dict(stop_token_ids=(_and(reference),), min_tokens=4)}[fields]
    got = steering_engine.generate(requests(method, **sampling))
    want = reference.generate(requests(method, **sampling))
    diff = [(g.text, w.text) for g, w in zip(got, want) if g.token_ids != w.token_ids or g.text != w.text]
    assert not diff, f"{len(diff)} of 20 differ: {diff[:3]}"
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    assert [g.steered_tokens for g in got] == [w.steered_tokens for w in want]
    plain = reference.generate(requests(method))
    assert sum(w.token_ids != p.token_ids for w, p in zip(want, plain)) >= 1  # the fields changed some answers


@pytest.mark.parametrize("cut", [dict(top_k=1), dict(min_p=1.0)])
def test_top_k_one_and_min_p_one_sample_greedily(steering_engine, reference, cut):  # noqa: F811
    greedy = reference.generate(requests("none"))
    got = steering_engine.generate(requests("none", temperature=1.5, seed=5, **cut))
    assert [g.token_ids for g in got] == [w.token_ids for w in greedy]


def test_the_fields_reach_vllms_sampling_params(steering_engine):
    p = steering_engine._params(SamplingParams(temperature=1.0, top_k=5, min_p=0.1, repetition_penalty=1.2, min_tokens=2,
                                               stop_token_ids=(3, 7), max_tokens=9), None)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.stop_token_ids) == (5, 0.1, 1.2, 2, [3, 7])
    assert steering_engine._params(SamplingParams(temperature=1.0, top_p=0.0, top_k=5), None).top_k == 1  # top_p 0
