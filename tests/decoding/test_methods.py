"""Steering methods inside the engine: isolation between rows, validation, the FiSAO phrase trie."""

import shutil

import pytest
import torch
from transformers import AutoTokenizer

from decoding.methods.fisao import PhraseTrie
from decoding.methods.vcd import diffusion_noise
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from shapeworld.models import MODELS_DIR
from shapeworld.text import CAPTION_PROMPT, question
from shapeworld.world import make_scenes

METHODS = ["none", "tita", "fisao", "tita+fisao", "vcd"]
SCENES = make_scenes("bait", 10, 4242)


def _req(i, method, text=None, **kw):
    s = SCENES[i]
    return GenerationRequest.single_turn(text or CAPTION_PROMPT, [s.image()],
                                         sampling=SamplingParams(max_tokens=kw.pop("max_tokens", 30), **kw),
                                         steering=SteeringSpec(method))


def test_all_methods_available(steering_engine):
    assert steering_engine.available_methods == METHODS[:3] + ["vcd"]


def test_mixed_batch_equals_each_row_alone(steering_engine):
    reqs = [_req(i, METHODS[i % 5], None if i % 3 else question(SCENES[i].objects[0])) for i in range(10)]
    together = steering_engine.generate(reqs)
    alone = [steering_engine.generate([r])[0] for r in reqs]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.steered_tokens for c in together] == [c.steered_tokens for c in alone]
    assert all(c.steered_tokens == 0 for c, r in zip(together, reqs) if r.steering.method == "none")


def test_steering_changes_outputs_somewhere(steering_engine):
    for m in METHODS[1:]:
        outs = steering_engine.generate([_req(i, m) for i in range(10)])
        assert sum(c.steered_tokens for c in outs) > 0, m


@pytest.mark.parametrize("method", METHODS[1:])
def test_sampling_works_with_every_method(steering_engine, method):
    a = steering_engine.generate([_req(0, method, temperature=0.8, top_p=0.9, seed=3)])[0]
    b = steering_engine.generate([_req(0, method, temperature=0.8, top_p=0.9, seed=3)])[0]
    assert a.token_ids == b.token_ids and a.token_ids


def test_validation(steering_engine):
    with pytest.raises(ValueError, match="unknown steering method"):
        steering_engine.resolve(SteeringSpec("telepathy"))
    with pytest.raises(ValueError, match="out of range"):
        steering_engine.resolve(SteeringSpec("tita", 1.5))
    with pytest.raises(ValueError, match="twice"):
        steering_engine.resolve(SteeringSpec("tita+tita"))
    assert steering_engine.resolve(SteeringSpec("fisao+tita", 0.5)) == {"tita": 0.5, "fisao": 0.5}
    assert steering_engine.resolve(SteeringSpec("tita")) == {"tita": 0.6}


def test_methods_needing_absent_resources_are_refused(engine):
    assert engine.available_methods == ["none", "vcd"]
    with pytest.raises(ValueError, match="needs reward"):
        engine.resolve(SteeringSpec("tita"))


def test_reward_model_with_another_vocabulary_is_refused(tmp_path):
    from decoding.transformers_engine import TransformersEngine

    rm = tmp_path / "reward"
    shutil.copytree(MODELS_DIR / "reward", rm)
    tok = AutoTokenizer.from_pretrained(rm)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(rm)
    with pytest.raises(ValueError, match="vocabulary"):
        TransformersEngine(MODELS_DIR / "vlm", reward_path=rm)


def test_phrase_trie_bonus_known_values():
    tok = AutoTokenizer.from_pretrained(MODELS_DIR / "vlm")
    trie = PhraseTrie(tok, ["red circle", "red square", "blue square"])
    r = torch.tensor([1.0, -1.0, -1.0])
    ids = lambda w: tok(w, add_special_tokens=False).input_ids[0]
    start = trie.bonus(tok("a", add_special_tokens=False).input_ids, r, len(tok))
    assert start[ids("red")] == 1.0 and start[ids("blue")] == -1.0 and start[ids("circle")] == 0.0
    after_red = trie.bonus(tok("a red", add_special_tokens=False).input_ids, r, len(tok))
    assert after_red[ids("circle")] == 1.0 and after_red[ids("square")] == -1.0
    after_blue = trie.bonus(tok("a blue", add_special_tokens=False).input_ids, r, len(tok))
    assert after_blue[ids("square")] == -1.0 and after_blue[ids("circle")] == 0.0


def test_fisao_maps_yes_no_questions(steering_engine):
    f = steering_engine.methods["fisao"]
    k = f.verifier.phrases.index("red circle")
    assert f._question(GenerationRequest.single_turn("is there a red circle ?")) == k
    assert f._question(GenerationRequest.single_turn("describe the image .")) == -1


def test_diffusion_noise_is_deterministic():
    x = torch.zeros(1, 3, 4, 4)
    assert torch.equal(diffusion_noise(x), diffusion_noise(x))
    assert diffusion_noise(x).std() > 0.5



def test_verifier_rewards_follow_the_calibrated_thresholds(steering_engine):
    v = steering_engine.resources.verifier
    scenes = make_scenes("random", 4, 4242)
    z = v.scores([s.image() for s in scenes])
    r = v.rewards([s.image() for s in scenes])
    assert torch.equal(r == 1, z >= v.calibration["high"]) and torch.equal(r == -1, z <= v.calibration["low"])
    assert torch.allclose(z.mean(-1), torch.zeros(4), atol=1e-5)  # normalised per image
