"""The JSON-token trainer (``shapeworld.train_json``): caption-to-JSON alignment, teacher targets, and a short
seeded run on a copy of the committed models that moves only the new rows and leaves a fork that loads."""

import shutil

import torch
from transformers import AutoModelForImageTextToText

from decoding.fork import materialise
from shapeworld.models import MODELS_DIR
from shapeworld.train_json import JsonTokensConfig, Vocab, as_json, teacher, train_json_tokens
from shapeworld.train_vlm import Prompts


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_a_caption_becomes_its_json_answer_aligned_position_by_position():
    tok = Prompts().tok
    v = Vocab(tok)
    cap = _ids(tok, "a red square and a blue circle .")
    out, align = as_json(cap, v)
    assert tok.decode(out, skip_special_tokens=True) == '{"objects":["red square","blue circle"]}'
    assert [k for k, _ in align] == ["open", "colour", "shape", "decision", "colour", "shape", "decision", "eos"]
    assert [tok.convert_ids_to_tokens(cap[t]) for _, t in align] == [
        "▁a", "▁red", "▁square", "▁and", "▁blue", "▁circle", "▁.", "</s>"]
    for bad in ("a red square and .", "there is a red square .", "a red red square .", "a red square"):
        assert as_json(_ids(tok, bad), v) is None
    assert as_json(_ids(tok, "a red square .")[:-1], v) is None  # cut before its end


def test_teacher_maps_the_caption_words_choice_onto_the_json_tokens():
    tok = Prompts().tok
    v = Vocab(tok)
    cap = _ids(tok, "a red square .")
    _, align = as_json(cap, v)
    probs = torch.full((len(cap), 64), 1e-3)
    probs[1, v.colours[0]], probs[1, v.colours[2]] = 0.6, 0.2  # red 0.6, blue 0.2
    probs[3, v.and_], probs[3, v.stop] = 0.25, 0.5
    q = teacher(probs, align, v, 64)
    assert torch.allclose(q[1:-1].sum(-1), torch.ones(len(align) - 2))
    assert q[0].sum() == 0  # the opening is the grammar's to force: where free text begins, "▁a" stays first
    assert q[-1].sum() == 0  # so is the end after "]}
    assert torch.isclose(q[1, v.json_colours[0]] / q[1, v.json_colours[2]], torch.tensor(3.0))
    assert q[1, v.colours].sum() == 0  # the word tokens get nothing where JSON is written
    assert torch.isclose(q[3, v.close], torch.tensor(2 / 3)) and torch.isclose(q[3, v.next], torch.tensor(1 / 3))


def test_a_short_run_moves_only_the_json_rows_and_keeps_the_fork_loadable(tmp_path):
    for d in ("vlm", "reward"):
        shutil.copytree(MODELS_DIR / d, tmp_path / d)
    report = train_json_tokens(tmp_path, JsonTokensConfig(scenes=40, steps=2, batch=8))
    assert report["json_answers"] > 20
    old = AutoModelForImageTextToText.from_pretrained(MODELS_DIR / "vlm")
    new = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm")
    rows = Vocab(Prompts().tok).new
    for name, t in new.state_dict().items():
        o = old.state_dict()[name]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            keep = torch.ones(len(t), dtype=torch.bool)
            keep[rows] = False
            assert not torch.equal(t[rows], o[rows]), name
            t, o = t[keep], o[keep]
        assert torch.equal(t, o), name
    materialise(new, tmp_path / "reward")  # the fork's trunk fingerprint follows the new rows
    assert "json_tokens" in (tmp_path / "vlm" / "training.json").read_text()
