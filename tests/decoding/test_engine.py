"""The transformers engine on the embedded model: batching must not change what a row generates."""

import pytest

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from shapeworld.text import CAPTION_PROMPT, question
from shapeworld.world import make_scenes

SCENES = make_scenes("random", 6, 4242)


def _req(i, text=None, **kw):
    s = SCENES[i]
    return GenerationRequest.single_turn(text or CAPTION_PROMPT, [s.image()], sampling=SamplingParams(**kw))


def test_batched_equals_one_by_one(engine):
    reqs = [_req(i, None if i % 2 else question(SCENES[i].objects[0]) + " please", max_tokens=12) for i in range(6)]
    together = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_rows_leave_and_join_without_changing_others(engine):
    reqs = [_req(i, max_tokens=10) for i in range(4)]
    ref = [c.token_ids for c in engine.generate(reqs)]
    a = engine.prefill([engine.encode(r) for r in reqs[:2]])
    t = engine.sample(a, a.logits)
    engine.decode_one_token(a, t)
    b = engine.prefill([engine.encode(r) for r in reqs[2:]])  # joins one step later, shorter cache
    batch = engine.merge(a, b)
    steps = 0
    while batch.rows and steps < 30:
        tokens = engine.sample(batch, batch.logits)
        keep = [i for i, r in enumerate(batch.rows) if r.finish_reason is None and r.request is not reqs[0]]
        if not keep:
            break
        batch = engine.select(batch, keep)  # row 0 is cancelled after its second token
        engine.decode_one_token(batch, tokens[keep])
        steps += 1
    rows = {id(r.request): r for r in batch.rows}
    got = {i: rows[id(reqs[i])].token_ids for i in range(1, 4) if id(reqs[i]) in rows}
    for i, ids in got.items():
        assert ids == ref[i][: len(ids)]


def test_finish_reasons_stop_strings_and_logprobs(engine):
    c = engine.generate([_req(0, max_tokens=2, top_logprobs=3)])[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 2
    assert len(c.logprobs) == 2 and len(c.logprobs[0].top) == 3
    assert c.logprobs[0].logprob == pytest.approx(c.logprobs[0].top[0][1])  # greedy picks the top token
    full = engine.generate([_req(0, max_tokens=40)])[0]
    assert full.finish_reason == "stop"  # the model ends its caption with </s>
    word = full.text.split()[1]
    cut = engine.generate([_req(0, max_tokens=40, stop=(word,))])[0]
    assert cut.finish_reason == "stop" and word not in cut.text


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate([_req(1, max_tokens=12, temperature=1.0, seed=7)])[0]
    b = engine.generate([_req(1, max_tokens=12, temperature=1.0, seed=7)])[0]
    assert a.token_ids == b.token_ids


def test_unknown_steering_is_refused(engine):
    r = _req(0)
    r.steering = SteeringSpec("telepathy")
    with pytest.raises(ValueError, match="telepathy"):
        engine.generate([r])


def test_ignore_eos_runs_to_max_tokens(engine):
    natural = engine.generate([_req(0, max_tokens=40)])[0]
    assert natural.finish_reason == "stop" and len(natural.token_ids) < 30
    forced = engine.generate([_req(0, max_tokens=30, ignore_eos=True)])[0]
    assert forced.finish_reason == "length" and len(forced.token_ids) == 30
    assert forced.token_ids[: len(natural.token_ids)] == natural.token_ids
    assert forced.token_ids[len(natural.token_ids)] in engine.eos_ids  # the end token is kept, and passed


def test_penalties_equal_a_plain_reference_loop(engine):
    """Greedy with presence and frequency penalties equals a loop of full forwards (no cache, no batch)
    that subtracts them by hand; a penalty-free row in the same batch generates what it does alone."""
    import torch

    pen = dict(presence_penalty=2.0, frequency_penalty=2.0)  # this model is sure of itself: the most OpenAI allows
    reqs = [_req(i, max_tokens=24, **pen) for i in range(3)] + [_req(3, max_tokens=24)]
    got = engine.generate(reqs)
    for r, c in zip(reqs[:3], got):
        row = engine.encode(r, steer=False)
        ids, out = list(row.prompt_ids), []
        with torch.inference_mode():
            for _ in range(24):
                logits = engine.model(input_ids=torch.tensor([ids]), pixel_values=row.pixel_values).logits[0, -1]
                counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[-1]).float()
                tok = int((logits - pen["presence_penalty"] * (counts > 0) - pen["frequency_penalty"] * counts).argmax())
                if tok in engine.eos_ids:
                    break
                out.append(tok)
                ids.append(tok)
        assert c.token_ids == out
    plain = engine.generate([_req(i, max_tokens=24) for i in range(3)])
    assert any(p.token_ids != c.token_ids for p, c in zip(plain, got))  # the penalty changed something
    assert got[3].token_ids == engine.generate([reqs[3]])[0].token_ids


def test_logprobs_are_one_per_completion_token(engine):
    """A completion that ends by itself has no logprob entry for its end-of-sequence token."""
    c = engine.generate([_req(0, max_tokens=64, top_logprobs=2)])[0]
    assert c.finish_reason == "stop" and len(c.logprobs) == len(c.token_ids)
    assert [x.token_id for x in c.logprobs] == c.token_ids
