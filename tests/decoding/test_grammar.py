"""Structured outputs in the transformers engine (``decoding.grammar``): the steering math keeps a grammar's
mask (-inf stays -inf, no NaN, at every strength up to 1 and beyond), the satisfiability check on the
embedded model's 64-word vocabulary, masks step by step on known grammars, and the engine: a constrained
answer under every method, a dead end that fails the request, and a steering method that unmasks a token
failing its row rather than serving it."""

import json

import pytest
import torch

from decoding.grammar import (GrammarDeadEnd, Grammars, StructuredOutput, Unsatisfiable, allowed_tokens, apply_masks,
                              choice_as_grammar, is_lark, unmasked, unsupported_json_features)
from decoding.methods import SteeringFailed
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from decoding.steer_math import tita, tita_candidates, token_bonus, vcd
from shapeworld.models import MODELS_DIR
from shapeworld.text import question
from shapeworld.world import make_scene

INF = float("-inf")
YES_NO = StructuredOutput("regex", "▁(yes|no)")  # the embedded vocabulary's words carry SentencePiece's "▁"


def masked_rows(v=300, allowed=((3, 7, 11), (5,), tuple(range(0, 300, 37))), seed=0):
    """Random logits [3, v] with every token but a few at -inf (a grammar's mask), and the allowed sets."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(allowed), v, generator=g) * 4
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for i, ids in enumerate(allowed):
        keep[i, list(ids)] = True
    return logits.masked_fill(~keep, INF), keep


def assert_mask_kept(out, keep, cuts=False):
    """Masked tokens at -inf, no NaN, allowed tokens finite (``cuts``: a method that may cut some of
    them, VCD's plausibility set, keeps at least one)."""
    assert not out.isnan().any()
    assert torch.isneginf(out[~keep]).all()
    assert (torch.isfinite(out) & keep).any(-1).all() if cuts else torch.isfinite(out[keep]).all()
    assert keep.gather(-1, out.argmax(-1, keepdim=True)).all()  # the top token is an allowed one


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_tita_keeps_the_grammar_mask_at_every_strength(strength):
    target, keep = masked_rows()
    reward = torch.randn(target.shape, generator=torch.Generator().manual_seed(1)) * 4  # the reward model's: unmasked
    s = torch.full((len(target),), strength)
    assert_mask_kept(tita(target, reward, s), keep)
    cand = target.topk(8, -1).indices  # more candidates than allowed tokens in two rows
    assert_mask_kept(tita_candidates(target, cand, reward.gather(-1, cand), s), keep)
    if strength == 1.0:  # at strength 1 the scores are the reward model's log-probs on the allowed tokens
        out = tita(target, reward, s)
        lr = reward.log_softmax(-1)
        assert torch.allclose(out[keep], lr[keep])


@pytest.mark.parametrize("strength", [0.0, 1.0, 6.0, 20.0])
def test_fisao_bonus_keeps_the_grammar_mask(strength):
    logits, keep = masked_rows()
    bonus = -torch.rand(logits.shape, generator=torch.Generator().manual_seed(2))  # penalties only, as FiSAO's
    assert_mask_kept(token_bonus(logits, bonus, torch.full((3,), strength), alpha=0.01), keep)


@pytest.mark.parametrize("strength", [0.0, 1.0, 5.0])
@pytest.mark.parametrize("noised_masked", [False, True])
def test_vcd_keeps_the_grammar_mask(strength, noised_masked):
    """VCD's second pass may or may not see the mask: either way masked tokens stay -inf (its
    plausibility set is taken from the masked clean scores), no NaN (-inf - -inf is cut away)."""
    clean, keep = masked_rows()
    noised = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3)) * 4
    if noised_masked:
        noised = noised.masked_fill(~keep, INF)
    assert_mask_kept(vcd(clean, noised, torch.full((3,), strength), beta=0.1), keep, cuts=True)


def test_unmasked_flags_a_scored_masked_token_or_a_nan():
    before, keep = masked_rows()
    good = before.log_softmax(-1)
    leak = good.clone()
    leak[0, 0] = -50.0  # token 0 is masked in row 0
    nan = good.clone()
    nan[2, 0] = float("nan")
    assert unmasked(before, good).tolist() == [False, False, False]
    assert unmasked(before, leak).tolist() == [True, False, False]
    assert unmasked(before, nan).tolist() == [False, False, True]
    assert unmasked(before, good.masked_fill(keep & (good < good.amax(-1, keepdim=True)), INF)).tolist() == [False] * 3


# ---------------------------------------------------------------- constraints and the check


@pytest.fixture(scope="module")
def embedded_grammars(engine):
    return Grammars(engine.tokenizer, engine.vocab_size, engine.eos_ids)


@pytest.mark.parametrize("so, why", [
    (StructuredOutput("json", '{"type": "integer"}'), "no token of this model's vocabulary can begin"),
    (StructuredOutput("json", '{"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}'),
     "no token of this model's vocabulary can begin"),
    (StructuredOutput("choice", '["yes", "no"]'), "no token of this model's vocabulary can begin"),
    (StructuredOutput("grammar", 'root ::= "{"'), "no token of this model's vocabulary can begin"),
    (StructuredOutput("regex", "[0-9]+"), "no token of this model's vocabulary can begin"),
    (StructuredOutput("json", '{"enum": ["red", "blue"]}'), "no sequence of at most 40 tokens"),
])
def test_what_the_embedded_vocabulary_cannot_write_is_refused(embedded_grammars, so, why):
    """The embedded model's 64 tokens: words (``▁red``, ``▁circle``, ...) and the JSON tokens of its one JSON
    shape (``{"objects":[``, ``"red``, ``",``, ``"]}``, ...): no digit, no other opening; ``"red`` begins the
    string "red" but no token closes it alone."""
    with pytest.raises(Unsatisfiable, match=why):
        embedded_grammars.check(so, 40)


def test_the_embedded_models_json_shape_passes(embedded_grammars):
    from bench.quality import OBJECTS_SCHEMA

    embedded_grammars.check(StructuredOutput("json_object"), 40)
    embedded_grammars.check(StructuredOutput("json", json.dumps(OBJECTS_SCHEMA)), 40)
    with pytest.raises(Unsatisfiable, match="no sequence of at most 40 tokens"):  # the grammar reads "red▁square"
        embedded_grammars.check(StructuredOutput("json", json.dumps(
            {"type": "object", "properties": {"objects": {"type": "array", "items": {"enum": ["red square"]}}}})), 40)


def test_a_grammar_every_path_of_which_dead_ends_is_refused(embedded_grammars):
    """``▁a▁b``: ``▁a`` is a word, ``▁b`` is not; ``(▁a)+▁b`` needs a ``▁b`` whatever the number of ``▁a``."""
    with pytest.raises(Unsatisfiable, match="no sequence of at most 40 tokens"):
        embedded_grammars.check(StructuredOutput("regex", "▁a▁b"), 40)
    with pytest.raises(Unsatisfiable, match="no sequence of at most 8 tokens"):
        embedded_grammars.check(StructuredOutput("regex", "(▁a)+▁b"), 8)
    # past the search budget (64 matcher states) the check lets it through: a dead end in generation fails it
    embedded_grammars.check(StructuredOutput("regex", "(▁a)+▁b"), 200)


@pytest.mark.parametrize("max_tokens", [40, 4096])
def test_a_loop_that_never_closes_is_refused_whatever_the_room(embedded_grammars, max_tokens):
    """A JSON string at the root: ``"red`` opens it, every word continues it, and no token of the embedded
    vocabulary closes it alone. The search sees the loop (the same root parser state again) instead of
    spending its budget going deeper, so the request is a 400, not an answer cut by ``max_tokens``; a bounded
    loop that can close (the objects list) still passes."""
    with pytest.raises(Unsatisfiable, match="no sequence"):
        embedded_grammars.check(StructuredOutput("json", '{"type": "string"}'), max_tokens)
    from bench.quality import OBJECTS_SCHEMA

    embedded_grammars.check(StructuredOutput("json", json.dumps(OBJECTS_SCHEMA)), max_tokens)


def test_a_grammar_the_vocabulary_can_complete_passes(embedded_grammars):
    embedded_grammars.check(YES_NO, 1)
    embedded_grammars.check(StructuredOutput("regex", "(▁a▁red▁circle▁and)*▁a▁blue▁star▁\\."), 40)
    with pytest.raises(Unsatisfiable, match="at most 3 tokens"):  # it needs 4 tokens
        embedded_grammars.check(StructuredOutput("regex", "▁a▁blue▁star▁\\."), 3)


@pytest.mark.parametrize("so, message", [
    (StructuredOutput("regex", "("), "invalid regex constraint: .*parenthesis"),
    (StructuredOutput("grammar", "root ::= "), "invalid grammar constraint"),
    (StructuredOutput("json", '{"type": "integer", "multipleOf": 2}'), "multipleOf"),
    (StructuredOutput("json", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
    (StructuredOutput("json", '{"type": "string", "format": "credit-card"}'), "format 'credit-card'"),
])
def test_invalid_or_unenforced_constraints_are_value_errors(embedded_grammars, so, message):
    with pytest.raises(ValueError, match=message):
        embedded_grammars.check(so, 10)


def test_choices_and_grammar_syntaxes_as_vllm_writes_them():
    assert choice_as_grammar(['a"b', "c\n", "d\\"]) == 'root ::= "a\\"b" | "c\\n" | "d\\\\"'
    assert choice_as_grammar(["\x01"]) == 'root ::= "\\u0001"'
    assert is_lark('start: "a"') and not is_lark('root ::= "a"') and is_lark('// root ::= "a"\nstart: "a"')
    assert unsupported_json_features({"properties": {"n": {"type": "number", "multipleOf": 3}}}) == "multipleOf"
    assert unsupported_json_features({"type": "object", "properties": {"n": {"enum": [1, 2]}}}) is None


def test_masks_step_by_step(engine, embedded_grammars):
    """``▁(yes|no)▁\\.``: first ``▁yes`` or ``▁no``, then ``▁.``, then only the EOS; after the EOS nothing is masked."""
    tok, v = engine.tokenizer, engine.vocab_size
    ids = tok.convert_tokens_to_ids
    g = embedded_grammars.matcher(StructuredOutput("regex", "▁(yes|no)▁\\."))
    expected = [({ids("▁yes"), ids("▁no")}, ids("▁no")), ({ids("▁.")}, ids("▁.")), ({tok.eos_token_id}, tok.eos_token_id)]
    for allowed, chosen in expected:
        logits = torch.zeros(2, v)
        assert apply_masks(logits, [None, g], v) == []
        assert set(torch.isfinite(logits[1]).nonzero().squeeze(-1).tolist()) == allowed
        assert torch.isfinite(logits[0]).all()  # a row without a grammar is untouched
        assert g.accept(chosen)
    assert g.terminated
    logits = torch.zeros(1, v)
    apply_masks(logits, [g], v)
    assert torch.isfinite(logits).all()
    dead = embedded_grammars.matcher(StructuredOutput("regex", "▁a▁b"))
    assert dead.accept(ids("▁a"))
    assert apply_masks(torch.zeros(1, v), [dead], v) == [0]
    bits = torch.tensor([0b1011, -1], dtype=torch.int32)
    assert allowed_tokens(bits, 36).tolist() == [0, 1, 3, *range(32, 36)]


# ---------------------------------------------------------------- the engine


def _question(method, so, **sampling):
    scene = make_scene("bait", 2, 1234)
    return GenerationRequest.single_turn(question(scene.objects[0]), [scene.image()], structured=so,
                                         sampling=SamplingParams(max_tokens=5, **sampling), steering=SteeringSpec(method))


@pytest.mark.parametrize("method", ["none", "tita", "fisao", "tita+fisao", "vcd"])
def test_a_constrained_answer_under_every_method(steering_engine, method):
    """The embedded model asked a yes/no question under ``▁(yes|no)``: one of the two words, then the end
    (the grammar allows only the EOS), greedy and sampled."""
    for sampling in ({}, {"temperature": 1.0, "seed": 3}):
        c = steering_engine.generate([_question(method, YES_NO, **sampling)])[0]
        assert c.text in ("yes", "no") and c.finish_reason == "stop" and len(c.token_ids) == 1


def test_a_constrained_batch_equals_each_row_alone(steering_engine):
    """Rows with and without grammars (and different ones) in one batch: each as it is alone."""
    three = StructuredOutput("regex", "(▁a|▁the)▁(red|blue)▁(circle|square)▁\\.")
    reqs = [_question(m, so) for m in ("none", "tita") for so in (None, YES_NO, three)]
    together = steering_engine.generate(reqs)
    alone = [steering_engine.generate([r])[0] for r in reqs]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert together[2].text.split()[1:3] in (["red", "circle"], ["red", "square"], ["blue", "circle"], ["blue", "square"])


def test_a_dead_end_fails_the_request_instead_of_forcing_a_token(engine):
    """``▁a▁b`` on the embedded vocabulary: ``▁a`` is forced, then no token is allowed (the server's check
    refuses this constraint before generation; here the engine is driven directly)."""
    with pytest.raises(GrammarDeadEnd, match="after 1 generated tokens"):
        engine.generate([_question("none", StructuredOutput("regex", "▁a▁b"))])


def test_steering_that_unmasks_a_token_fails_the_row(engine, monkeypatch):
    """A method whose scores give a masked token a chance (here VCD replaced by zeros) fails its row with
    ``SteeringFailed``: the answer is not served, valid or not."""
    monkeypatch.setattr(engine.methods["vcd"], "steer", lambda state, rows, logits, strength: torch.zeros_like(logits))
    with pytest.raises(SteeringFailed, match="'vcd'") as e:
        engine.generate([_question("vcd", YES_NO)])
    assert "forbids" in str(e.value.cause)
    assert engine.generate([_question("vcd", None)])[0].token_ids  # without a grammar the same scores are served


def test_json_answers_on_a_family_tokenizer_validate(tmp_path):
    """A LLaVA-shaped random-weight checkpoint (its tokenizer has every byte): a bounded JSON schema gives a
    complete, valid answer (whitespace-only tokens biased away, as a random model would pad forever)."""
    import jsonschema
    from decoding.transformers_engine import TransformersEngine
    from PIL import Image

    from tests.families import build

    engine = TransformersEngine(build("llava", tmp_path / "llava"))
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "name": {"type": "string", "maxLength": 6}},
              "required": ["colour", "count", "name"], "additionalProperties": False}
    vocab = engine.grammars.info.decoded_vocab
    bias = tuple((i, -100.0) for i, b in enumerate(vocab) if b and not b.strip())
    req = GenerationRequest.single_turn("describe the image .", [Image.new("RGB", (40, 30), "red")],
                                        sampling=SamplingParams(max_tokens=60, logit_bias=bias),
                                        structured=StructuredOutput("json", json.dumps(schema)))
    c = engine.generate([req])[0]
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.text), schema)


# ---------------------------------------------------------------- the vllm engine's processor (fake batch updates)


@pytest.fixture(scope="module")
def fisao_adapter():
    """The steering adapter vLLM's logits processor wraps, with FiSAO (the embedded verifier)."""
    from decoding.methods import Resources
    from decoding.vllm.adapter import PerRequestSteering, WorkerTarget
    from decoding.verifier import Verifier

    return Resources(WorkerTarget(str(MODELS_DIR / "vlm")), None, Verifier(MODELS_DIR / "verifier"))


def _added(engine, index, slot, structured: bool):
    """One row as vLLM's batch update adds it: its sampling parameters (``structured_outputs`` set when a
    grammar masks it), prompt ids and live output ids."""
    import types

    from decoding.vllm.engine import _png
    from decoding.vllm.protocol import ARG

    req = _question("fisao", None)
    args = {"slot": slot, "eos": engine.tokenizer.eos_token_id, "methods": {"fisao": 6.0}, "messages": req.messages,
            "images": [_png(im) for im in req.images]}
    params = types.SimpleNamespace(extra_args={ARG: args}, structured_outputs=object() if structured else None)
    return (index, params, engine.encode(req, steer=False).prompt_ids, [])


def _masked_logits(v, allowed, rows=2):
    logits = torch.randn(rows, v, generator=torch.Generator().manual_seed(5))
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep[:, allowed] = True
    return logits.masked_fill(~keep, INF)


def test_the_vllm_processor_keeps_the_mask_and_fails_a_row_that_breaks_it(engine, fisao_adapter, tmp_path, monkeypatch):
    """vLLM masks before the processor. A grammar row steered within its mask is served; a method that
    unmasks a token fails a grammar row (counted as that method's failure; the same scores on a row without
    a grammar are its steering, served). A failed row whose grammar forbids the EOS at this step gets its
    masked, unsteered logits for that step rather than a forced EOS (the server reads the failure before
    that token and aborts the request); where the grammar allows the EOS the row ends with it, as before."""
    from decoding.vllm.adapter import PerRequestSteering
    from decoding.vllm.protocol import METHODS, Counters

    ids = engine.tokenizer.convert_tokens_to_ids(["▁yes", "▁no"])
    eos = engine.tokenizer.eos_token_id
    counters = Counters(str(tmp_path / "counters"))
    fisao = METHODS.index("fisao") + 1

    def run(slots, grammar, logits):
        steering = PerRequestSteering(fisao_adapter, counters)
        if run.steer is not None:
            monkeypatch.setattr(steering.methods["fisao"], "steer", run.steer)
        steering.update([], [_added(engine, i, s, g) for i, (s, g) in enumerate(zip(slots, grammar))], [], lambda d: False)
        return steering.apply(logits.clone())

    logits = _masked_logits(engine.vocab_size, ids)
    run.steer = None
    scores = run((0, 1), (True, True), logits)
    assert (torch.isneginf(scores).sum(-1) == engine.vocab_size - 2).all() and not scores.isnan().any()
    assert int(counters.failed[0]) == int(counters.failed[1]) == 0

    run.steer = lambda state, rows, logits, strength: torch.zeros_like(logits)  # gives every token a score
    scores = run((2, 3), (True, False), logits)
    assert int(counters.failed[2]) == fisao and torch.equal(scores[0], logits[0])  # failed, EOS not forced
    assert int(counters.failed[3]) == 0 and torch.equal(scores[1], torch.zeros_like(scores[1]))

    def broken(state, rows, logits, strength):
        raise RuntimeError("the verifier is gone")

    run.steer = broken
    logits = _masked_logits(engine.vocab_size, [*ids, eos])
    logits[0, eos] = INF  # row 0's grammar forbids ending here, row 1's allows it
    scores = run((4, 5), (True, True), logits)
    assert int(counters.failed[4]) == int(counters.failed[5]) == fisao
    assert torch.equal(scores[0], logits[0])
    assert scores[1, eos] == 0 and torch.isneginf(scores[1]).sum() == engine.vocab_size - 1


def test_the_vllm_processor_reports_a_dead_end(engine, fisao_adapter, tmp_path):
    from decoding.vllm.adapter import PerRequestSteering
    from decoding.vllm.protocol import DEAD_END, Counters

    counters = Counters(str(tmp_path / "counters"))
    steering = PerRequestSteering(fisao_adapter, counters)
    steering.update([], [_added(engine, 0, 0, True)], [], lambda d: False)
    steering.apply(torch.full((1, engine.vocab_size), INF))
    assert int(counters.failed[0]) == DEAD_END
    assert isinstance(steering.rows[0][0].error, GrammarDeadEnd)


def test_the_end_guard_finds_where_min_tokens_masks_the_formats_only_way_on(embedded_grammars, engine):
    """``▁a▁blue▁star`` must end after its 3 tokens: with ``min_tokens`` 5 masking the EOS, the guard (the vllm
    engine's, in the API process) says so at the third token, not before; with the EOS not masked
    (``ignore_eos``) or ``min_tokens`` reached, never."""
    from decoding.grammar import EndGuard

    so = StructuredOutput("regex", "▁a▁blue▁star")
    ids = engine.tokenizer.convert_tokens_to_ids(["▁a", "▁blue", "▁star"])
    eos = {engine.tokenizer.eos_token_id}
    for min_tokens, ends, want in ((5, eos, [False, False, True]), (5, set(), [False] * 3), (3, eos, [False] * 3)):
        guard = EndGuard(embedded_grammars.matcher(so), engine.vocab_size, min_tokens, ends)
        assert [guard.dead_after(t) for t in ids] == want, (min_tokens, ends)
