"""The steered-arrival benchmark (``bench.arrival``, `vlm-steer bench arrival`) on the embedded models and the
vllm engine: its reward timer sees the forked reward model's layers run over a TITA request's whole prompt,
in the steps that hold a TITA row only, and its report holds what the closing notes quote."""

import os

import numpy as np
import pytest

from bench.arrival import RewardTimer, _rpc, reward_alone, run_arrival
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from shapeworld.models import MODELS_DIR
from shapeworld.text import CAPTION_PROMPT
from shapeworld.world import make_scenes


def test_arrivals_and_the_reward_models_prefill_alone():
    from decoding.vllm.engine import VLLMEngine

    images = [s.image() for s in make_scenes("bait", 6, 4321)]
    engine = VLLMEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", verifier_path=MODELS_DIR / "verifier",
                        max_batch=4, engine_args={"worker_extension_cls": f"{RewardTimer.__module__}.RewardTimer"})
    try:
        assert _rpc(engine, "time_reward")
        # vLLM binds its CPU worker's compute thread to a strict subset of the CPUs (it reserves one for its
        # scheduler): the cores ``keep_off_worker_cores`` moves the API side off
        worker = _rpc(engine, "worker_cpus")
        assert worker and set(worker) < os.sched_getaffinity(0)
        prompt_len = len(engine.encode(GenerationRequest.single_turn(
            CAPTION_PROMPT, images[:1], sampling=SamplingParams(max_tokens=4), steering=SteeringSpec("tita"))).prompt_ids)
        alone = reward_alone(engine, CAPTION_PROMPT, images[:2])
        assert [t for t, _ in alone] == [prompt_len, prompt_len] and all(s > 0 for _, s in alone)
        rep = run_arrival(engine, ["tita", "fisao"], images, CAPTION_PROMPT, running=2, repeats=3, settle=2, max_tokens=24)
    finally:
        engine.close()
    m = rep["methods"]
    assert list(m) == ["none", "tita", "fisao", "none again"]  # the A/A control last
    for r in m.values():
        assert len(r["admit_s"]) == 3 and r["admit_median_s"] > 0 and r["steady_median_s"] > 0 and r["to_first_token_median_s"] > 0
    # the reward layers run in a round's steps only when a TITA row is in the batch (the fork's per-step skip)
    assert m["none"]["reward_in_step_median_s"] == m["fisao"]["reward_in_step_median_s"] == m["none again"]["reward_in_step_median_s"] == 0
    assert m["tita"]["reward_in_step_median_s"] > 0
    # the steering processor's methods run for steered arrivals only
    assert m["none"]["steering_median_s"] == m["none again"]["steering_median_s"] == 0
    assert m["tita"]["steering_median_s"] > 0 and m["fisao"]["steering_median_s"] > 0
    assert m["none"]["extra_median_s"] == 0
    assert rep["reward_prefill_alone_median_s"] > 0
    assert m["tita"]["extra_p90_over_reward_prefill"] == m["tita"]["extra_p90_s"] / rep["reward_prefill_alone_median_s"]
    # the p90 shift: the method's 90th-percentile admission step less the unsteered arrivals' (numpy's quantile)
    assert m["none"]["p90_shift_s"] == 0
    assert m["tita"]["p90_shift_s"] == pytest.approx(float(np.quantile(m["tita"]["admit_s"], 0.9) - np.quantile(m["none"]["admit_s"], 0.9)))
