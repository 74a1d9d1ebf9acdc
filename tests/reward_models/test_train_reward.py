"""The reward model's trainer for any target and any data set folder (`vlm-steer train reward`): the pair
rules on known inputs, the scorer's log-probs equal to transformers' own unpadded forward on every family,
and the whole command on each family's tiny checkpoint: pairs are generated, DPO steps run, and the result
loads as a reward model that steers."""

import json

import pytest
import torch

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from decoding.transformers_engine import TransformersEngine
from reward_models.data import DataSet, Vocabulary
from reward_models.train_reward import (Example, ImageCache, Scorer, answer_pair, augmented_view, build_init,
                                        caption_pairs, label_verdicts)
from server.cli import main
from tests.families import FAMILIES, build, build_set

VOCAB = Vocabulary.from_names(["red circle", "blue square", "green triangle"])


def test_caption_pairs_prefer_fewer_suspect_then_more_grounded_mentions():
    verdict = {"red circle": 1, "blue square": -1, "green triangle": 1}
    cands = ["a red circle .", "a red circle and a blue square .", "a blue square .", "a red circle .",
             "a red circle and a green triangle ."]
    pairs = caption_pairs(cands, verdict, VOCAB, max_rejected=5)
    best = "a red circle and a green triangle ."
    # the worst first: most suspect, then fewest grounded; saying less is rejected too (omission)
    assert pairs == [(best, "a blue square ."), (best, "a red circle and a blue square ."), (best, "a red circle .")]
    assert caption_pairs(cands, verdict, VOCAB, max_rejected=1) == pairs[:1]
    # an object the judge is unsure of (0) or does not know counts for nothing
    assert caption_pairs(["a red circle .", "a red circle and a green triangle ."], {"red circle": 1, "green triangle": 0},
                         VOCAB, 2) == []
    assert caption_pairs(["a red circle .", "a red circle and a blue square ."], {"red circle": 1}, VOCAB, 2) == []
    assert caption_pairs(["a blue square ."], verdict, VOCAB, 2) == []  # one distinct candidate: no pair


def test_answer_pairs_take_the_targets_own_answers_else_the_bare_word():
    assert answer_pair(["no , there is a red square .", "yes", "no"], truth=False) == ("no , there is a red square .", "yes")
    assert answer_pair(["yes .", "yes"], truth=True) == ("yes .", "no")
    assert answer_pair(["maybe"], truth=False) == ("no", "yes")


def test_label_verdicts_and_views():
    assert label_verdicts(VOCAB, [{"blue square"}]) == [{"red circle": -1, "blue square": 1, "green triangle": -1}]
    import numpy as np
    from PIL import Image

    img = Image.new("RGB", (16, 16), (200, 10, 10))
    erased = np.asarray(augmented_view(img, "erase:0.25", np.random.default_rng(0)))
    assert (erased == np.asarray(img)).all()  # one colour: its mean erases nothing
    noisy = np.asarray(augmented_view(img, "noise:0.5", np.random.default_rng(0)))
    assert noisy.shape == (16, 16, 3) and (noisy != np.asarray(img)).any()
    with pytest.raises(ValueError, match="unknown view"):
        augmented_view(img, "blur:1", np.random.default_rng(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_scorer_logps_equal_an_unpadded_forward(family, tmp_path, shapes):
    """Batched, left-padded answers of different lengths score as transformers' forward scores each alone
    (its own positions: M-RoPE for Qwen2.5-VL, bidirectional image attention for Gemma 3)."""
    path = build(family, tmp_path / family)
    engine = TransformersEngine(path)
    data = DataSet.load(shapes)
    scorer = Scorer(engine.model, engine.processor, ImageCache(data))
    files = [data.files[i] for i in data.image_ids[:3]]
    tok = engine.tokenizer
    answers = ["a red circle .", "no", "a blue square and a green triangle ."]
    examples = [Example(f, "describe the image .", tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id])
                for f, a in zip(files, answers)]
    with torch.no_grad():
        got = scorer.logps(examples)
        for ex, value in zip(examples, got):
            ids, inputs = scorer.encoded(ex.image, ex.prompt)
            from decoding.model_inputs import extended

            full = torch.tensor([ids + ex.answer_ids])
            logits = engine.model(input_ids=full, **extended(inputs, len(ids), len(ex.answer_ids))).logits[0].float()
            logp = logits[len(ids) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(ex.answer_ids)[:, None]).sum()
            assert value.item() == pytest.approx(logp.item(), abs=2e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"])
def test_layer_dropped_copy_keeps_the_first_layers(family, tmp_path):
    path = build(family, tmp_path / family)
    target = TransformersEngine(path).model
    n = target.config.get_text_config().num_hidden_layers
    same = build_init(target, None, 0)
    short = build_init(target, None, 1)
    assert short.config.get_text_config().num_hidden_layers == 1 and n > 1
    a, b = target.state_dict(), short.state_dict()
    assert set(b) < set(a) and all(torch.equal(a[k], b[k]) for k in b)
    assert all(torch.equal(a[k], v) for k, v in same.state_dict().items())
    with pytest.raises(ValueError, match="outside"):
        build_init(target, None, n + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_reward_on_each_family(family, tmp_path, shapes):
    """`vlm-steer train reward` on a tiny checkpoint of each family with its verifier calibrated on the data:
    pairs of every source, distillation and DPO steps, a resumable run's files, and a reward model that
    loads beside the target and steers with TITA."""
    paths = build_set(family, tmp_path / family, verifier="siglip" if family == "gemma3" else "clip")
    (paths["verifier"] / "calibration.json").unlink()
    main(["train", "calibrate", "--verifier", str(paths["verifier"]), "--data", str(shapes)])
    out = tmp_path / "rm"
    main(["train", "reward", "--target", str(paths["model"]), "--data", str(shapes), "--verifier", str(paths["verifier"]),
          "--out", str(out), "--pairs", "verifier+labels+views", "--init-layers", "1", "--images", "6",
          "--distill-images", "4", "--distill-steps", "2", "--steps", "3", "--samples", "2", "--questions", "2"])
    meta = json.loads((out / "training.json").read_text())
    assert meta["recipe"]["pairs"] == "verifier+labels+views" and meta["recipe"]["dpo_steps"] == 3
    assert meta["pairs"].get("labels", 0) > 0 and sum(meta["pairs"].values()) == len((out / "pairs.jsonl").read_text().splitlines())
    assert set(meta["seconds"]) == {"distill", "pairs", "dpo"} and not (out / "checkpoints").exists()
    pair = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    assert set(pair) == {"image", "prompt", "chosen", "rejected", "source"} and pair["chosen"] != pair["rejected"]
    engine = TransformersEngine(paths["model"], reward_path=out)
    assert engine.resources.reward.model.config.get_text_config().num_hidden_layers == 1
    data = DataSet.load(shapes)
    req = lambda method: GenerationRequest.single_turn("describe the image .", [data.image(data.image_ids[0])],
                                                       sampling=SamplingParams(max_tokens=6), steering=SteeringSpec(method))
    a, b = engine.generate([req("none"), req("tita")])
    assert len(b.token_ids) >= 1 and b.steered_tokens > 0  # TITA ran with the trained reward model


def test_train_reward_says_what_it_needs(tmp_path, shapes, capsys):
    with pytest.raises(SystemExit, match="needs --target"):
        main(["train", "reward", "--data", str(shapes)])
    path = build("llava", tmp_path / "llava")
    with pytest.raises(ValueError, match="calibrated verifier"):
        main(["train", "reward", "--target", str(path), "--data", str(shapes), "--out", str(tmp_path / "rm"),
              "--images", "2", "--distill-images", "0", "--steps", "1"])


def test_a_seeded_run_is_reproduced_bit_for_bit_and_resumes(tmp_path, shapes):
    """Same seed, same weights (what `make train` relies on); and a run stopped after its pairs and some DPO
    steps continues from its checkpoint to the same weights."""
    from safetensors.torch import load_file

    from reward_models.train_reward import RewardRecipe, train_reward

    paths = build_set("llava", tmp_path / "llava")
    (paths["verifier"] / "calibration.json").unlink()
    main(["train", "calibrate", "--verifier", str(paths["verifier"]), "--data", str(shapes)])
    recipe = RewardRecipe(init_layers=1, images=6, distill_images=4, distill_steps=2, distill_batch=4, samples=1, questions=2,
                          dpo_steps=4, dpo_batch=4, checkpoint_every=2)
    runs = [train_reward(paths["model"], shapes, tmp_path / f"rm{k}", recipe, verifier=paths["verifier"]) for k in (0, 1)]
    a, b = (load_file(r / "model.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (runs[0] / "pairs.jsonl").read_text() == (runs[1] / "pairs.jsonl").read_text()
    # interrupted after the second DPO step's checkpoint, then run again: it resumes to the same weights
    from reward_models import train_reward as module

    save = module._Run.save

    def crash_after(self, stage, step, *rest):
        save(self, stage, step, *rest)
        if stage == "dpo" and step == 2:
            raise RuntimeError("interrupted")

    module._Run.save = crash_after
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            train_reward(paths["model"], shapes, tmp_path / "rm2", recipe, verifier=paths["verifier"])
    finally:
        module._Run.save = save
    assert (tmp_path / "rm2" / "checkpoints" / "dpo.pt").exists()
    resumed = load_file(train_reward(paths["model"], shapes, tmp_path / "rm2", recipe, verifier=paths["verifier"])
                        / "model.safetensors")
    assert all(torch.equal(a[k], resumed[k]) for k in a)
