"""vLLM's sampling fields on the transformers engine (embedded model): repetition_penalty, min_tokens and
stop_token_ids give transformers' own ``generate`` output with the same settings, each row with its own
values in one batch; top_k and min_p cut only sampled rows (top_k 1 is greedy); stop strings wait for
min_tokens as vLLM's detokenizer does."""

import pytest

from decoding.prompts import render_prompt
from decoding.request import GenerationRequest, SamplingParams
from shapeworld.text import CAPTION_PROMPT
from shapeworld.world import make_scenes

SCENES = make_scenes("bait", 6, 4242)  # the scenes of tests/server/test_chat.py
MAX = 30


def _req(i, **sampling):
    return GenerationRequest.single_turn(CAPTION_PROMPT, [SCENES[i].image()], sampling=SamplingParams(max_tokens=MAX, **sampling))


def generate_reference(engine, request, **generate_kw) -> list[int]:
    """transformers' greedy ``generate`` for one request, cut at the first end token (the engine's EOS, or
    any ``eos_token_id`` given)."""
    out = engine.processor(images=request.images or None, text=render_prompt(engine.processor, request.messages),
                           return_tensors="pt")
    g = engine.model.generate(**out, max_new_tokens=MAX, do_sample=False, **generate_kw)[0, out["input_ids"].shape[1]:]
    ends = set(engine.eos_ids) | set(generate_kw.get("eos_token_id", ()))
    ids = g.tolist()
    return next((ids[:i] for i, t in enumerate(ids) if t in ends), ids)


# (our fields, transformers' generate arguments)
CASES = [({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}), ({"repetition_penalty": 0.7}, {"repetition_penalty": 0.7}),
         ({"min_tokens": 20}, {"min_new_tokens": 20}),
         ({"repetition_penalty": 1.3, "min_tokens": 12}, {"repetition_penalty": 1.3, "min_new_tokens": 12})]


@pytest.fixture(scope="module")
def greedy(engine) -> list[list[int]]:
    return [c.token_ids for c in engine.generate([_req(i) for i in range(6)])]


@pytest.mark.parametrize("fields,generate_kw", CASES)
def test_greedy_equals_generate_with_the_same_settings(engine, greedy, fields, generate_kw):
    got = engine.generate([_req(i, **fields) for i in range(6)])
    want = [generate_reference(engine, _req(i), **generate_kw) for i in range(6)]
    assert [c.token_ids for c in got] == want
    assert sum(g.token_ids != p for g, p in zip(got, greedy)) >= 1  # the setting changed some caption


def test_every_row_keeps_its_own_settings_in_one_batch(engine):
    """One batch of rows with different repetition penalties, min_tokens and stop tokens (TGI-style per-row
    parameters): each row equals its own ``generate``."""
    (stop,) = engine.tokenizer("and", add_special_tokens=False).input_ids
    rows = [({}, {}), ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}), ({"min_tokens": 20}, {"min_new_tokens": 20}),
            ({"stop_token_ids": (stop,)}, {"eos_token_id": [*engine.eos_ids, stop]}),
            ({"repetition_penalty": 0.7, "min_tokens": 5}, {"repetition_penalty": 0.7, "min_new_tokens": 5}),
            ({"min_tokens": 6, "stop_token_ids": (stop,)}, {"min_new_tokens": 6, "eos_token_id": [*engine.eos_ids, stop]})]
    got = engine.generate([_req(i, **f) for i, (f, _) in enumerate(rows)])
    assert [c.token_ids for c in got] == [generate_reference(engine, _req(i), **kw) for i, (_, kw) in enumerate(rows)]


def test_a_stop_token_ends_the_completion_and_is_not_part_of_it(engine):
    full = engine.generate([_req(0)])[0]  # "a red circle and a green diamond ."
    stop = full.token_ids[3]  # "and"
    c = engine.generate([_req(0, stop_token_ids=(stop,))])[0]
    assert (c.token_ids, c.text, c.finish_reason) == (full.token_ids[:3], "a red circle", "stop")
    late = engine.generate([_req(0, stop_token_ids=(stop,), min_tokens=4)])[0]  # masked at position 3
    assert late.token_ids[:3] == full.token_ids[:3] and len(late.token_ids) >= 4 and stop not in late.token_ids[:4]
    assert late.token_ids == generate_reference(engine, _req(0), min_new_tokens=4, eos_token_id=[*engine.eos_ids, stop])


def test_min_tokens_masks_the_eos_until_reached(engine):
    full = engine.generate([_req(0)])[0]
    assert full.finish_reason == "stop" and len(full.token_ids) < 20
    longer = engine.generate([_req(0, min_tokens=20)])[0]
    assert len(longer.token_ids) >= 20 and longer.token_ids[: len(full.token_ids)] == full.token_ids
    ignored = engine.generate([_req(0, min_tokens=20, ignore_eos=True)])[0]  # ignore_eos: the EOS is no end to mask
    assert len(ignored.token_ids) == MAX and ignored.token_ids[len(full.token_ids)] in engine.eos_ids


def test_stop_strings_wait_for_min_tokens(engine):
    """As vLLM's detokenizer: a stop string counts only if it ends after the text of the first min_tokens
    tokens. "circle" ends the third token of "a red circle and ...": min_tokens 2 cuts there, 3 does not."""
    full = engine.generate([_req(0)])[0]
    assert full.text.startswith("a red circle and") and full.text.count("circle") == 1
    cut = engine.generate([_req(0, stop=("circle",), min_tokens=2)])[0]
    assert (cut.text, cut.finish_reason, len(cut.token_ids)) == ("a red ", "stop", 3)  # the token the cut splits stays
    kept = engine.generate([_req(0, stop=("circle",), min_tokens=3)])[0]
    assert kept.text == full.text and kept.token_ids == full.token_ids


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_one_and_min_p_one_sample_the_greedy_caption(engine, greedy, cut):
    hot = [c.token_ids for c in engine.generate([_req(i, temperature=1.5, seed=s, **cut) for i, s in zip(range(6), (3, 5, 7, 11, 13, 17))])]
    free = [c.token_ids for c in engine.generate([_req(i, temperature=1.5, seed=s) for i, s in zip(range(6), (3, 5, 7, 11, 13, 17))])]
    assert hot == greedy
    assert free != greedy  # without the cut the same seeds sample other captions


def test_top_k_and_min_p_leave_greedy_rows_alone(engine, greedy):
    assert [c.token_ids for c in engine.generate([_req(i, top_k=2, min_p=0.3) for i in range(6)])] == greedy
