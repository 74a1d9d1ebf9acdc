"""The forked reward model inside vLLM's own model (``decoding.vllm.fork_model``, run by `make test-vllm`):
its attention layers are in vLLM's allocated KV cache beside the target's, and TITA's greedy tokens equal the
transformers engine's with chunked prefill and under preemption (a KV cache too small for the batch), as
they do in the plain configuration (tests/vllm/test_vllm_engine.py)."""

import json

import pytest

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from shapeworld.models import MODELS_DIR
from shapeworld.text import CAPTION_PROMPT
from shapeworld.world import make_scenes
from tests.vllm.engine_stats import preempted_requests

SCENES = make_scenes("bait", 8, 777)


def _requests(method="tita"):
    """Eight captions of 40 tokens each (prompts of 71 tokens)."""
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    return [GenerationRequest.single_turn(CAPTION_PROMPT, [s.image()], sampling=sp, steering=SteeringSpec(method))
            for s in SCENES]


@pytest.fixture(scope="module")
def want():
    from decoding.transformers_engine import TransformersEngine

    return [c.token_ids for c in TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward").generate(_requests())]


def _engine(max_model_len=None, **engine_args):
    from decoding.vllm.engine import VLLMEngine

    return VLLMEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", max_batch=8, max_model_len=max_model_len,
                      engine_args=engine_args)


def test_the_forks_layers_are_in_vllms_kv_cache():
    engine = _engine(worker_extension_cls="tests.vllm.worker_probe.Probe")
    try:
        assert engine.reward_in_model
        names = engine._call(engine.llm.collective_rpc("kv_cache_layer_names", timeout=60))[0]
        # numbered after the target's four layers (vLLM needs one distinct integer per attention layer name)
        assert [n for n in names if n.startswith("rm_layers.")] == ["rm_layers.4.self_attn.attn", "rm_layers.5.self_attn.attn"]
        assert len([n for n in names if "language_model" in n]) == 4
    finally:
        engine.close()


def test_tita_tokens_hold_with_chunked_prefill(want):
    engine = _engine(max_num_batched_tokens=40, enable_chunked_prefill=True)  # each 71-token prompt in two chunks
    try:
        assert [c.token_ids for c in engine.generate(_requests())] == want
    finally:
        engine.close()


def test_tita_tokens_hold_under_preemption(want):
    """11 blocks of 32 tokens: two requests start (3 blocks each) and outgrow the cache: vLLM preempts and
    later recomputes them, the fork's cache with the target's."""
    engine = _engine(max_model_len=192, block_size=32, num_gpu_blocks_override=11)
    try:
        got = [c.token_ids for c in engine.generate(_requests())]
        preempted = preempted_requests(engine)
    finally:
        engine.close()
    assert preempted > 0
    assert got == want


def test_steps_without_a_tita_row_run_no_fork_layers(want):
    """The fork's layers run only in steps that hold a TITA row; blocks computed without them never reach a
    TITA request through prefix caching (TITA requests have their own cache salt): the same prompts first
    unsteered, then with TITA, give the tokens of a fresh engine."""
    engine = _engine(worker_extension_cls="tests.vllm.worker_probe.Probe", enable_prefix_caching=True, block_size=32)
    steps = lambda: engine._call(engine.llm.collective_rpc("fork_steps", timeout=60))[0]  # noqa: E731
    try:
        before = steps()
        engine.generate(_requests("none"))
        assert steps() == before  # 8 requests, 40 tokens each: not one step ran the fork
        got = [c.token_ids for c in engine.generate(_requests())]
        assert steps() > before
    finally:
        engine.close()
    assert got == want


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl", "gemma3"])
def test_a_fork_of_each_family_goes_inside_vllms_model_and_gives_the_transformers_tokens(family, tmp_path):
    """A fork of a LLaVA-NeXT target (the same Llama decoder behind any-resolution image features), of a
    Qwen2.5-VL target (Qwen2 layers at M-RoPE positions) or of a Gemma 3 target (its layer 0 sliding-window,
    layer 1, the forked one, global: a fork layer of the wrong kind would see other tokens past the 16-token
    window) is part of vLLM's model (``ForkedLlavaNext``, ``ForkedQwen2_5_VL``, ``ForkedGemma3``): its layers are
    in vLLM's KV cache, and TITA's greedy tokens, over images of several aspect ratios and with prompts
    prefilled in chunks of 32 tokens, equal the transformers engine's with the same fork."""
    from PIL import Image

    from decoding.transformers_engine import TransformersEngine
    from decoding.vllm.engine import VLLMEngine
    from tests.families import build, build_fork

    model = build(family, tmp_path / "vlm")
    if family == "gemma3":  # Gemma 3 interleaves sliding-window and global layers
        cfg = json.loads((model / "config.json").read_text())
        cfg["text_config"]["layer_types"] = ["sliding_attention", "full_attention"]
        (model / "config.json").write_text(json.dumps(cfg))
    fork = build_fork(model, tmp_path / "fork", layers=1, noise=0.2)
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    reqs = [GenerationRequest.single_turn("describe the image .", [Image.new("RGB", size, colour)], sampling=sp,
                                          steering=SteeringSpec(method))
            for size, colour in (((40, 30), "red"), ((20, 70), "blue"), ((64, 64), "green")) for method in ("tita", "none")]
    want = [c.token_ids for c in TransformersEngine(model, reward_path=fork).generate(reqs)]
    engine = VLLMEngine(model, reward_path=fork, max_batch=8, engine_args={
        "worker_extension_cls": "tests.vllm.worker_probe.Probe", "max_num_batched_tokens": 32, "enable_chunked_prefill": True})
    try:
        assert engine.reward_in_model
        names = engine._call(engine.llm.collective_rpc("kv_cache_layer_names", timeout=60))[0]
        assert [n for n in names if n.startswith("rm_layers.")] == ["rm_layers.2.self_attn.attn"], names
        got = [c.token_ids for c in engine.generate(reqs)]
    finally:
        engine.close()
    assert got == want
    assert want[0] != want[1]  # the fork (noise 0.2) steers: TITA's tokens are not the unsteered ones
