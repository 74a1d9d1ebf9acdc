"""Structured outputs on the vllm engine (run by `make test-vllm`): what ``decoding.grammar`` copies from vLLM
agrees with vLLM's own code, and a steering failure under a grammar that forbids the end of sequence fails
its request (never served, no token the grammar forbids forced) while the engine stays healthy."""

import concurrent.futures as cf

import pytest

from decoding.grammar import StructuredOutput, choice_as_grammar, is_lark, unsupported_json_features
from decoding.methods import SteeringFailed
from decoding.request import Failed, Finished, GenerationRequest, SamplingParams, SteeringSpec
from shapeworld.text import question
from shapeworld.world import make_scenes

SCENES = make_scenes("bait", 4, 5150)
YES_NO = StructuredOutput("regex", "▁(yes|no)")


@pytest.mark.parametrize("choices", [["yes", "no"], ['a"b', "c\nd", "e\\f", "\x01\x7f", "日本"]])
def test_choices_become_vllms_grammar(choices):
    from vllm.v1.structured_output.utils import choice_as_grammar as vllm_choice_as_grammar

    assert choice_as_grammar(choices) == vllm_choice_as_grammar(choices)


@pytest.mark.parametrize("grammar", ['root ::= "a"', 'start: "a"', '// a comment\nstart: "a" | "b"',
                                     '# root ::= "a"\nstart: "a"', 'root ::= x\nx ::= "a" # the rule x'])
def test_grammar_syntax_is_told_apart_as_vllm_tells_it(grammar):
    from vllm.v1.structured_output.utils import grammar_is_likely_lark

    assert is_lark(grammar) == grammar_is_likely_lark(grammar)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
    {"type": "number", "multipleOf": 2},
    {"type": ["integer", "null"], "multipleOf": 3},
    {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    {"type": "array", "contains": {"type": "string"}},
    {"type": "string", "format": "email"},
    {"type": "string", "format": "phone"},
    {"type": "string", "pattern": "a+", "maxLength": 3},
    {"type": "object", "propertyNames": {"pattern": "^a"}, "properties": {"a": {}}},
    {"type": "object", "patternProperties": {"^a": {}, "^b": {}}},
    {"allOf": [{"type": "string"}, {"enum": ["a"]}]},
    {"type": "object", "properties": {"deep": {"type": "array", "items": {"type": "number", "multipleOf": 5}}}},
])
def test_unenforced_json_features_are_vllms(schema):
    from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features

    assert (unsupported_json_features(schema) is not None) == has_xgrammar_unsupported_json_features(schema)


def _run(engine, row):
    done = cf.Future()
    engine.run(row, lambda ev: done.set_result(ev) if isinstance(ev, (Finished, Failed)) else None)
    return done.result(timeout=120)


def _request(i, method, so=YES_NO):
    s = SCENES[i]
    return GenerationRequest.single_turn(question(s.objects[0]), [s.image()], structured=so,
                                         sampling=SamplingParams(max_tokens=5), steering=SteeringSpec(method))


def _vllm_finished(engine, reason: str) -> float:
    """vLLM's own count of ``engine``'s requests finished for ``reason`` (its Prometheus counter, read from the
    engine's stat logger: an engine started later unregisters earlier engines' families from the registry)."""
    loggers = [s for s in engine.llm.logger_manager.stat_loggers if hasattr(s, "counter_request_success")]
    return sum(c._value.get() for lg in loggers for r, by_engine in lg.counter_request_success.items()
               if r.name.lower() == reason for c in by_engine.values())


def test_a_steering_failure_under_a_grammar_fails_only_its_request(steering_engine):
    """The reward model cannot read this request's image: under ``▁(yes|no)`` (no EOS allowed at the first
    step) the request fails as TITA's failure rather than end with a forced EOS that vLLM's grammar would
    refuse (vLLM would end it with an error: none is counted); constrained requests beside it finish, and
    the engine serves the same request afterwards."""
    errors = _vllm_finished(steering_engine, "error")
    broken = steering_engine.encode(_request(0, "tita"))
    broken.params.extra_args["vlm_steer"]["images"] = [b"\x89PNG not really"]
    plain = [steering_engine.encode(_request(i, m)) for i, m in ((1, "tita"), (2, "fisao"), (3, "none"))]
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda row: _run(steering_engine, row), [broken, *plain]))
    assert isinstance(results[0], Failed) and isinstance(results[0].error, SteeringFailed)
    assert results[0].error.method == "tita"
    assert all(isinstance(r, Finished) and r.completion.text in ("yes", "no") for r in results[1:])
    again = _run(steering_engine, steering_engine.encode(_request(0, "tita")))
    assert isinstance(again, Finished) and again.completion.text in ("yes", "no")
    assert _vllm_finished(steering_engine, "stop") > 0 and _vllm_finished(steering_engine, "error") == errors
