"""A separate reward model inside vLLM's own model (``decoding.vllm.paired_model``, run by `make test-vllm`): a
tiny random-weight LLaVA target and a smaller LLaVA reward model of its processor (tests/families.py). Its
attention layers are in vLLM's allocated KV cache beside the target's; TITA's greedy tokens equal the
transformers engine's, with chunked prefill and under preemption too; steps with no TITA row run none of its
layers; where its vision tower is the target's, the tower runs once. The same holds for a reward model of each
other family (LLaVA-NeXT, Qwen2.5-VL with its M-RoPE positions, Gemma 3 with its sliding-window layers), built
as vLLM's own implementation of the family (``paired_model._Paired``)."""

import pytest
from PIL import Image

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from tests.families import build
from tests.vllm.engine_stats import preempted_requests

COLOURS = ["red", "blue", "green", "white", "black", "yellow", "purple", "grey"]
SIZES = [(40, 30), (64, 64), (20, 70), (96, 32)]


def _requests(method="tita"):
    """Eight requests of 40 tokens each (prompts of 27-31 tokens: 16 image tokens and the question)."""
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    return [GenerationRequest(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                              images=[Image.new("RGB", SIZES[i % 4], COLOURS[i])], sampling=sp,
                              steering=SteeringSpec(method))
            for i, t in enumerate(["describe the image ."] * 6 + ["is there a cat ?", "what colour is it ?"])]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return build("llava", root / "vlm"), build("llava", root / "rm", size="tiny_rm", seed=1)


@pytest.fixture(scope="module")
def shared_tower_pair(pair, tmp_path_factory):
    """The reward model with the target's vision tower (a LLaVA pair that froze the same CLIP, as LLaVA-1.5's),
    and tied input and output embeddings (transformers 5 keeps the flag on the LLaVA config)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    rm = tmp_path_factory.mktemp("shared") / "rm"
    shutil.copytree(pair[1], rm)
    ours, theirs = load_file(pair[0] / "model.safetensors"), load_file(rm / "model.safetensors")
    tower = {k: v for k, v in ours.items() if k.startswith("vision_tower.")}
    assert tower and tower.keys() <= theirs.keys()
    embed = next(k for k in theirs if k.endswith("embed_tokens.weight"))
    head = next(k for k in theirs if k.endswith("lm_head.weight"))
    theirs[head] = theirs[embed].clone()
    save_file({**theirs, **tower}, rm / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((rm / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (rm / "config.json").write_text(json.dumps(cfg))
    return pair[0], rm


def _want(model, reward):
    from decoding.transformers_engine import TransformersEngine

    return [c.token_ids for c in TransformersEngine(model, reward_path=reward).generate(_requests())]


def _engine(model, reward, **engine_args):
    from decoding.vllm.engine import VLLMEngine

    return VLLMEngine(model, reward_path=reward, max_batch=8, max_model_len=engine_args.pop("max_model_len", None),
                      engine_args={"worker_extension_cls": "tests.vllm.worker_probe.Probe", **engine_args})


def _probe(engine, name):
    return engine._call(engine.llm.collective_rpc(name, timeout=60))[0]


def test_reward_layers_are_in_vllms_kv_cache_and_run_only_for_tita(pair):
    """Its one layer is numbered after the target's two; the same prompts first unsteered (no step runs the
    reward model's layers), then with TITA through prefix caching (TITA requests have their own cache salt),
    give the transformers engine's tokens."""
    want = _want(*pair)
    engine = _engine(*pair, enable_prefix_caching=True, block_size=32)
    try:
        assert engine.reward_in_model
        names = _probe(engine, "kv_cache_layer_names")
        assert [n for n in names if n.startswith("rm_layers.")] == ["rm_layers.2.self_attn.attn"]
        assert len([n for n in names if "language_model" in n]) == 2
        assert _probe(engine, "reward_shares_tower") is False
        before, images = _probe(engine, "fork_steps"), _probe(engine, "rm_image_calls")
        none = engine.generate(_requests("none"))
        assert (_probe(engine, "fork_steps"), _probe(engine, "rm_image_calls")) == (before, images)
        # the same images again, with TITA: vLLM's encoder cache holds them without the reward model's half, so
        # TITA's images are keyed apart (``engine.tita_image_key``) and encoded again, both halves
        got = [c.token_ids for c in engine.generate(_requests())]
        assert _probe(engine, "fork_steps") > before and _probe(engine, "rm_image_calls") > images
    finally:
        engine.close()
    assert got == want
    assert [c.token_ids for c in none] != want  # the reward model changes the answers


def test_tita_tokens_hold_with_chunked_prefill_and_preemption(pair):
    """Prompts in two chunks of at most 20 tokens, and 5 blocks of 32 tokens for 8 requests of up to 71
    tokens: vLLM preempts and later recomputes requests, the reward model's cache with the target's."""
    want = _want(*pair)
    engine = _engine(*pair, max_model_len=96, max_num_batched_tokens=20, enable_chunked_prefill=True, block_size=32,
                     num_gpu_blocks_override=5)
    try:
        got = [c.token_ids for c in engine.generate(_requests())]
        preempted = preempted_requests(engine)
    finally:
        engine.close()
    assert preempted > 0
    assert got == want


def test_a_shared_vision_tower_runs_once_and_a_tied_head_loads(shared_tower_pair):
    want = _want(*shared_tower_pair)
    engine = _engine(*shared_tower_pair)
    try:
        assert _probe(engine, "reward_shares_tower") is True
        got = [c.token_ids for c in engine.generate(_requests())]
    finally:
        engine.close()
    assert got == want


def test_a_target_whose_head_is_padded_past_the_reward_models(tmp_path):
    """The target's output layer has 700 rows, the reward model's the tokenizer's ~600: TITA's candidates may
    fall in the target's padding, where the reward model has no row (``decoding.methods.tita.target_rows``)."""
    pair = build("llava", tmp_path / "vlm", size="tiny_padded"), build("llava", tmp_path / "rm", size="tiny_rm", seed=1)
    want = _want(*pair)
    engine = _engine(*pair)
    try:
        assert engine.reward_in_model
        got = [c.token_ids for c in engine.generate(_requests())]
    finally:
        engine.close()
    assert got == want


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl", "gemma3"])
def test_a_reward_model_of_each_family_goes_inside_and_gives_the_transformers_tokens(family, tmp_path):
    """One engine per family, with prefix caching, prompts in chunks of at most 32 tokens and 8 blocks of 32
    tokens for 8 requests (vLLM preempts and recomputes some): the reward model's layers are in vLLM's KV cache,
    numbered after the target's two; unsteered prompts run none of them, nor its vision tower; TITA's tokens on
    the same images then equal the transformers engine's."""
    pair = build(family, tmp_path / "vlm"), build(family, tmp_path / "rm", size="tiny_rm", seed=1)
    want = _want(*pair)
    engine = _engine(*pair, enable_prefix_caching=True, max_num_batched_tokens=32, enable_chunked_prefill=True,
                     block_size=32, num_gpu_blocks_override=8, max_model_len=192)
    try:
        assert engine.reward_in_model
        assert [n for n in _probe(engine, "kv_cache_layer_names") if n.startswith("rm.")] == [
            "rm.language_model.model.layers.2.self_attn.attn"]
        before, images = _probe(engine, "fork_steps"), _probe(engine, "rm_image_calls")
        none = engine.generate(_requests("none"))
        assert (_probe(engine, "fork_steps"), _probe(engine, "rm_image_calls")) == (before, images)
        got = [c.token_ids for c in engine.generate(_requests())]
        preempted = preempted_requests(engine)
    finally:
        engine.close()
    assert got == want
    assert preempted > 0
    assert [c.token_ids for c in none] != want
