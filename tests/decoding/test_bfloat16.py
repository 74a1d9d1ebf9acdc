"""The engine as a GPU runs it, on CPU: bfloat16 weights, every method, greedy and sampled rows in one batch.
Faults that only a GPU run would show otherwise (a float32 tensor meeting bfloat16 weights, a sampler that
needs the logits' dtype or device) fail here."""

import torch

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from decoding.transformers_engine import TransformersEngine
from shapeworld.models import MODELS_DIR
from shapeworld.world import make_scene


def test_every_method_runs_in_bfloat16_greedy_and_sampled():
    engine = TransformersEngine(MODELS_DIR / "vlm", dtype="bfloat16", reward_path=MODELS_DIR / "reward",
                                verifier_path=MODELS_DIR / "verifier", tita_candidates=8)
    assert engine.model.dtype == torch.bfloat16
    images = [make_scene("bait", i, 4321).image() for i in range(2)]
    changed = 0
    for method in ("none", "tita", "fisao", "tita+fisao", "vcd"):
        reqs = [GenerationRequest.single_turn("describe the image .", [im], steering=SteeringSpec(method),
                                              sampling=SamplingParams(max_tokens=10, temperature=t, seed=3, top_logprobs=2))
                for im in images for t in (0.0, 1.0)]
        first, again = engine.generate(reqs), engine.generate(reqs)
        for a, b in zip(first, again):
            assert a.finish_reason in ("stop", "length") and a.token_ids, (method, a)
            assert a.token_ids == b.token_ids  # greedy, and sampled with a seed: the same tokens again
            assert all(torch.isfinite(torch.tensor(lp.logprob)) for lp in a.logprobs)
        changed += sum(c.steered_tokens for c in first)
    assert changed > 0  # steering changed some top token
