"""The vllm engine (run by `make test-vllm` in vLLM's own virtualenv): the same greedy outputs as the
transformers engine for every steering method it runs, and faults inside vLLM's worker that fail only
their own request."""

import concurrent.futures as cf
import dataclasses

import pytest

from decoding.methods import SteeringFailed
from decoding.request import Failed, Finished, GenerationRequest, SamplingParams, SteeringSpec
from shapeworld.models import MODELS_DIR
from shapeworld.pope import questions_for
from shapeworld.text import CAPTION_PROMPT, question
from shapeworld.world import make_scenes

# 20 fixed requests: captions of bait and random scenes, and POPE-adversarial yes/no questions (FiSAO's
# first-answer-token rule).
BAIT, RANDOM = make_scenes("bait", 8, 777), make_scenes("random", 6, 778)
QUESTIONS = [(s, q) for s in make_scenes("bait", 6, 779) for q in questions_for(s, "adversarial")[-1:]]


def requests(method: str, **sampling) -> list[GenerationRequest]:
    sp = SamplingParams(max_tokens=40, **sampling)
    caps = [GenerationRequest.single_turn(CAPTION_PROMPT, [s.image()], sampling=sp, steering=SteeringSpec(method))
            for s in BAIT + RANDOM]
    qs = [GenerationRequest.single_turn(question(q.obj), [s.image()], sampling=sp, steering=SteeringSpec(method))
          for s, q in QUESTIONS]
    return caps + qs


@pytest.fixture(scope="module")
def reference():
    from decoding.transformers_engine import TransformersEngine

    return TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", verifier_path=MODELS_DIR / "verifier")


@pytest.mark.parametrize("method", ["none", "tita", "fisao", "tita+fisao"])
def test_greedy_outputs_equal_the_transformers_engine(steering_engine, reference, method):
    assert len(requests(method)) == 20
    got = steering_engine.generate(requests(method))
    want = reference.generate(requests(method))
    diff = [(g.text, w.text) for g, w in zip(got, want) if g.token_ids != w.token_ids or g.text != w.text]
    assert not diff, f"{len(diff)} of 20 differ: {diff[:3]}"
    assert [g.steered_tokens for g in got] == [w.steered_tokens for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    if method != "none":
        assert sum(w.steered_tokens for w in want) > 0  # the steering did something to compare


@pytest.mark.parametrize("method", ["none", "tita+fisao"])
def test_explanations_equal_the_transformers_engine(steering_engine, reference, method):
    """``steering.explain`` on the vllm engine (the worker's ring, read back per token): the transformers
    engine's numbers for every token of 20 greedy requests."""
    def explained(reqs):
        return [dataclasses.replace(r, steering=SteeringSpec(method, explain=True)) for r in reqs]

    got = steering_engine.generate(explained(requests(method)))
    want = reference.generate(explained(requests(method)))
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and len(g.explain) == len(w.explain) == len(w.token_ids)
        for a, b in zip(g.explain, w.explain):
            assert (a.token_id, a.base_token_id, a.changed) == (b.token_id, b.base_token_id, b.changed)
            assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
            assert a.base_logprob == pytest.approx(b.base_logprob, abs=1e-3)
            assert a.contributions.keys() == b.contributions.keys()
            assert all(a.contributions[m] == pytest.approx(b.contributions[m], abs=1e-3) for m in b.contributions)
    assert sum(e.changed for c in want for e in c.explain) == sum(c.steered_tokens for c in want)


@pytest.mark.parametrize("method", ["none", "tita"])
def test_penalties_equal_the_transformers_engine(steering_engine, reference, method):
    """OpenAI's presence and frequency penalties: vLLM's sampler applies them after our steering processor,
    as the transformers engine does."""
    pen = dict(presence_penalty=2.0, frequency_penalty=2.0)
    got = steering_engine.generate(requests(method, **pen))
    want = reference.generate(requests(method, **pen))
    diff = [(g.text, w.text) for g, w in zip(got, want) if g.token_ids != w.token_ids]
    assert not diff, f"{len(diff)} of 20 differ: {diff[:3]}"
    plain = reference.generate(requests(method))
    assert any(p.token_ids != w.token_ids for p, w in zip(plain, want))  # the penalties changed something


def test_vcd_is_refused_plainly(steering_engine):
    with pytest.raises(ValueError, match="not available on the vllm engine"):
        steering_engine.resolve(SteeringSpec("vcd"))


def _run(engine, row) -> object:
    done = cf.Future()
    engine.run(row, lambda ev: done.set_result(ev) if isinstance(ev, (Finished, Failed)) else None)
    return done.result(timeout=120)


def test_a_fault_inside_the_worker_fails_only_its_request(steering_engine):
    """The reward model cannot read this request's image (corrupt bytes reach the worker): the request
    fails as a steering failure, is not served unsteered, and requests beside it finish normally."""
    broken = steering_engine.encode(requests("tita")[0])
    args = broken.params.extra_args["vlm_steer"]
    args["images"] = [b"\x89PNG not really"]
    plain = [steering_engine.encode(r) for r in requests("tita")[1:4]]
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda row: _run(steering_engine, row), [broken, *plain]))
    assert isinstance(results[0], Failed) and isinstance(results[0].error, SteeringFailed)
    assert results[0].error.method == "tita"
    assert all(isinstance(r, Finished) and r.completion.text for r in results[1:])
    again = _run(steering_engine, steering_engine.encode(requests("tita")[0]))  # the engine is healthy
    assert isinstance(again, Finished)


def test_bad_steering_arguments_are_refused_by_validate_params(steering_engine):
    row = steering_engine.encode(requests("fisao")[0])
    row.params.extra_args["vlm_steer"]["methods"]["fisao"] = "strong"
    row = dataclasses.replace(row, request=dataclasses.replace(row.request, request_id="bad-args"))
    ev = _run(steering_engine, row)
    assert isinstance(ev, Failed) and isinstance(ev.error, ValueError) and "strength" in str(ev.error)
