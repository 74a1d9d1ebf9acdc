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
    assert steering_engine.resolve(SteeringSpec("tita")) == {"tita": 0.9}


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
    trie = PhraseTrie(tok, ["red circle", "red square", "blue square"], len(tok))
    ids = lambda w: tok(w, add_special_tokens=False).input_ids[0]
    rows = [tok(t, add_special_tokens=False).input_ids for t in ("a", "a red", "a blue", "a red")]
    r = torch.tensor([[1.0, -1.0, -1.0]] * 3 + [[-1.0, 1.0, 0.0]])
    as_is = lambda z, group: z  # scores already rewards: the best one wins
    start, after_red, after_blue, other_row = trie.bonus(rows, trie.node_rewards(r, as_is))
    assert start[ids("red")] == 1.0 and start[ids("blue")] == -1.0 and start[ids("circle")] == 0.0
    assert after_red[ids("circle")] == 1.0 and after_red[ids("square")] == -1.0
    assert after_red[ids("blue")] == -1.0  # a new phrase may still start: the shallow bonus stays
    assert after_blue[ids("square")] == -1.0 and after_blue[ids("circle")] == 0.0
    assert other_row[ids("circle")] == -1.0 and other_row[ids("square")] == 1.0  # rows keep their own rewards
    json_red, json_blue = tok.convert_tokens_to_ids(['"red', '"blue'])  # phrases opening a JSON string
    assert start[json_red] == 1.0 and start[json_blue] == -1.0
    assert start.shape == (len(tok),) and int((start != 0).sum()) == 4


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


def test_fisao_colour_tokens_use_group_thresholds(steering_engine):
    """A colour word is judged by the best score among its phrases, against the group thresholds."""
    f = steering_engine.methods["fisao"]
    v, tok = f.verifier, steering_engine.tokenizer
    c = v.calibration
    assert {"group_low", "group_high"} <= set(c)
    z = v.scores([s.image() for s in make_scenes("random", 3, 4243)])
    node = f.trie.node_rewards(z, v.reward)
    root = f.trie.tokens[0].tolist()
    for colour in ("red", "blue"):
        t = tok(colour, add_special_tokens=False).input_ids[0]
        best = z[:, [k for k, p in enumerate(v.phrases) if p.split()[0] == colour]].max(-1).values
        expected = (best >= c["group_high"]).float() - (best <= c["group_low"]).float()
        assert torch.equal(node[:, 0, root.index(t)], expected)
    red = tok("red", add_special_tokens=False).input_ids[0]
    circle = tok("circle", add_special_tokens=False).input_ids[0]
    j = f.trie.index[(red,)]
    k = v.phrases.index("red circle")
    assert torch.equal(node[:, j, f.trie.tokens[j].tolist().index(circle)], v.reward(z[:, k]))


def test_fisao_reuses_the_vlms_own_vision_pass(steering_engine):
    """The verifier is the VLM's own tower: scores from the prefill's pooled output equal a separate pass."""
    f = steering_engine.methods["fisao"]
    assert f.shared_tower
    images = [s.image() for s in make_scenes("bait", 3, 4244)]
    rows = [steering_engine.encode(GenerationRequest.single_turn("describe the image .", [im])) for im in images]
    steering_engine.prefill(rows, steer=False)
    shared = f.verifier.scores_from_pooled(torch.stack([r.image_pooled for r in rows]))
    assert torch.allclose(shared, f.verifier.scores(images), atol=1e-4)
