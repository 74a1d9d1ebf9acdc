"""Other VLM families on the transformers engine: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL and Gemma 3 (tiny random
weights from tests/families.py), each with a reward model of its family and a CLIP or SigLIP verifier.

Equality with ``model.generate`` proves the engine's batching, positions and caches per family; the
steering tests prove each method runs on each family (random weights say nothing about quality)."""

import json

import pytest
import torch
from PIL import Image

from decoding.methods.fisao import generated_splits
from decoding.prompts import render_prompt
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from decoding.transformers_engine import TransformersEngine
from tests.families import FAMILIES, build, build_verifier

VERIFIER = {"llava": "clip", "llava_next": "clip", "qwen2_5_vl": "clip", "gemma3": "siglip"}
PHRASES = ["red circle", "blue square", "green triangle", "cat", "dog", "table", "car", "café"]
# images of different sizes and aspect ratios: LLaVA-NeXT splits them into different numbers of crops,
# Qwen2.5-VL into different grids
SIZES = [(40, 30), (64, 64), (20, 70), (96, 32), (33, 33)]
COLOURS = ["red", "blue", "green", "white", "purple"]


def write_verifier_files(path, calibrated=True):
    (path / "objects.json").write_text(json.dumps({"phrases": PHRASES, "template": "a {}"}))
    if calibrated:
        cal = {"low": -0.3, "high": 0.3, "group_low": -0.3, "group_high": 0.3}
        (path / "calibration.json").write_text(json.dumps(cal))


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for fam in FAMILIES:
        out[fam] = {"model": build(fam, root / fam), "reward": build(fam, root / f"{fam}-rm", size="tiny_rm", seed=1),
                    "verifier": build_verifier(VERIFIER[fam], root / f"{fam}-verifier")}
        write_verifier_files(out[fam]["verifier"])
    return out


@pytest.fixture(scope="session")
def family_engines(family_dirs):
    return {fam: TransformersEngine(d["model"], reward_path=d["reward"], verifier_path=d["verifier"])
            for fam, d in family_dirs.items()}


def requests(method="none", strength=None, max_tokens=10, **kw):
    out = [GenerationRequest.single_turn("describe the image .", [Image.new("RGB", s, c)],
                                         sampling=SamplingParams(max_tokens=max_tokens, **kw),
                                         steering=SteeringSpec(method, strength))
           for s, c in zip(SIZES, COLOURS)]
    out.append(GenerationRequest(messages=[{"role": "user", "content": "is there a cat ?"}],
                                 sampling=SamplingParams(max_tokens=max_tokens, **kw), steering=SteeringSpec(method, strength)))
    return out


def reference(engine, request, max_tokens):
    """transformers' own greedy generate, one request at a time."""
    out = engine.processor(images=request.images or None, text=render_prompt(engine.processor, request.messages),
                           return_tensors="pt")
    g = engine.model.generate(**out, max_new_tokens=max_tokens, do_sample=False)[0, out["input_ids"].shape[1]:].tolist()
    for i, t in enumerate(g):
        if t in engine.eos_ids:
            return g[:i]
    return g


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_with_mixed_image_sizes_equals_generate(family_engines, family):
    e = family_engines[family]
    reqs = requests(max_tokens=12)
    got = e.generate(reqs)
    assert [c.token_ids for c in got] == [reference(e, r, 12) for r in reqs]


@pytest.mark.parametrize("family", FAMILIES)
def test_tita_at_strength_zero_is_none_and_steers_above(family_engines, family):
    e = family_engines[family]
    assert "tita" in e.available_methods
    none = [c.token_ids for c in e.generate(requests())]
    assert [c.token_ids for c in e.generate(requests("tita", 0.0))] == none
    steered = e.generate(requests("tita", 1.0))
    assert sum(c.steered_tokens for c in steered) > 0  # the reward model's log-ratio reached the logits


def test_tita_with_reward_and_target_output_rows_that_differ(tmp_path):
    """One tokenizer, output layers padded differently past it (Qwen2.5-VL-3B as the reward model of
    7B): TITA runs either way, is the unsteered model at strength 0 and steers above; a reward model
    whose rows do not cover the tokenizer is refused at load."""
    padded = build("qwen2_5_vl", tmp_path / "padded", size="tiny_padded")
    plain = build("qwen2_5_vl", tmp_path / "plain", size="tiny_rm", seed=1)
    for target, reward in ((padded, plain), (plain, padded)):
        e = TransformersEngine(target, reward_path=reward)
        assert e.vocab_size != e.resources.reward.vocab_size and "tita" in e.available_methods
        none = [c.token_ids for c in e.generate(requests())]
        assert [c.token_ids for c in e.generate(requests("tita", 0.0))] == none
        steered = e.generate(requests("tita", 1.0))
        assert sum(c.steered_tokens for c in steered) > 0
        assert all(t < len(e.tokenizer) for c in steered for t in c.token_ids)
    short = build("qwen2_5_vl", tmp_path / "short", size="tiny_rm_short", seed=2)
    with pytest.raises(ValueError, match="output rows for a tokenizer of"):
        TransformersEngine(padded, reward_path=short)


def test_target_rows_pads_with_the_rows_lowest_logit_and_truncates():
    from decoding.methods.tita import target_rows

    x = torch.tensor([[1.0, -2.0, 3.0]])
    assert target_rows(x, 5).tolist() == [[1.0, -2.0, 3.0, -2.0, -2.0]]
    assert target_rows(x, 2).tolist() == [[1.0, -2.0]]
    assert target_rows(x, 3) is x


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fisao", "vcd", "tita+fisao"])
def test_every_method_runs_on_every_family(family_engines, family, method):
    e = family_engines[family]
    reqs = requests(method, max_tokens=8)
    together = e.generate(reqs)
    alone = [e.generate([r])[0] for r in reqs]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert all(c.finish_reason in ("stop", "length") for c in together)


@pytest.mark.parametrize("family", FAMILIES)
def test_string_content_renders_as_one_text_part(family_engines, family):
    p = family_engines[family].processor
    text = "describe the image ."
    as_string = render_prompt(p, [{"role": "user", "content": text}])
    assert as_string == render_prompt(p, [{"role": "user", "content": [{"type": "text", "text": text}]}])
    assert text in as_string  # hub templates that iterate over parts rendered a string as nothing


def test_only_llava_shares_its_tower_outputs(family_engines):
    assert {f: e.shares_tower_outputs for f, e in family_engines.items()} == {
        "llava": True, "llava_next": False, "qwen2_5_vl": False, "gemma3": False}
    for f, e in family_engines.items():  # methods that cannot reuse the target's vision work compute their own
        assert e.methods["fisao"].reads_images and not e.methods["fisao"].shared_tower
        assert not e.methods["tita"].reuse_tower


def test_phrase_tables_follow_in_context_splits(family_engines):
    spm = family_engines["llava"].tokenizer  # Llama-style: " yes" alone splits into a bare "▁" and "▁yes"
    assert spm.tokenize(" yes")[0] == "▁"
    bare = spm.convert_tokens_to_ids("▁")
    f = family_engines["llava"].methods["fisao"]
    assert bare not in f.yes_ids + f.no_ids
    assert spm.convert_tokens_to_ids("▁yes") in f.yes_ids and spm.convert_tokens_to_ids("▁no") in f.no_ids
    assert bare not in f.trie.tokens[0].tolist()  # the root of the phrase table: first tokens of phrases
    bpe = family_engines["qwen2_5_vl"].tokenizer  # byte-level: "yes" at the start, "Ġyes" after a word
    q = family_engines["qwen2_5_vl"].methods["fisao"]
    assert {bpe.convert_tokens_to_ids(t) for t in ("yes", "Ġyes")} <= set(q.yes_ids)
    assert generated_splits(bpe, "red circle") == [tuple(bpe("red circle").input_ids), tuple(bpe(" red circle").input_ids)]


def test_uncalibrated_verifier_offers_no_fisao(family_dirs, tmp_path):
    d = family_dirs["gemma3"]
    v = build_verifier("siglip", tmp_path / "v")
    write_verifier_files(v, calibrated=False)
    e = TransformersEngine(d["model"], verifier_path=v)
    assert "fisao" not in e.available_methods and "calibrat" in e.unavailable["fisao"]
    with pytest.raises(ValueError, match="calibrated verifier"):
        e.resolve(SteeringSpec("fisao"))
    assert "tita" not in e.available_methods and "reward" in e.unavailable["tita"]


def test_siglip_verifier_scores_are_its_own_cosines(family_engines):
    v = family_engines["gemma3"].resources.verifier
    img = Image.new("RGB", (50, 40), "red")
    px = v.processor.image_processor(images=[img], return_tensors="pt")
    with torch.inference_mode():
        emb = v.model.vision_model(**px).pooler_output
        emb = torch.nn.functional.normalize(emb, dim=-1)
    s = emb @ v.text.T
    assert torch.allclose(v.scores([img]), (s - s.mean()) / s.std(), atol=1e-5)


def test_verifier_without_vocabulary_is_a_clear_error(tmp_path):
    v = build_verifier("clip", tmp_path / "v")
    from decoding.verifier import Verifier

    with pytest.raises(FileNotFoundError, match="object vocabulary"):
        Verifier(v)
