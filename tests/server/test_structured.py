"""Structured outputs through the live server and the official openai client, on the engine under test
(VLM_STEER_TEST_ENGINE): OpenAI's ``response_format``, vLLM's ``structured_outputs`` and its ``guided_*``
spellings.

- The embedded model (48 words and nine JSON tokens that write ``{"objects":["red square",...]}`` only): that
  object (a schema or ``json_object``) is answered under every steering method, with the transformers
  engine's tokens, and TITA corrects inside it the hallucination it corrects in a caption; a JSON format its
  tokens cannot begin (another first key, an integer) is a 400 at once (never a hang or an empty answer) and
  the server stays healthy; a format its words can write (``▁(yes|no)``) is followed under every steering
  method, with the same tokens and processed log-probs as the transformers engine.
- A LLaVA-shaped random-weight checkpoint (a tokenizer with every byte): bounded JSON schemas give answers
  that parse and validate under every method, ``json_object`` answers parse, choices are among the choices,
  and on the vllm run they equal the transformers engine's, token for token (same masks: both engines run
  xgrammar; same steering after them).
- Bad constraints and options this server does not implement: 400s naming the field.
"""

import json

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

from decoding.grammar import Grammars, StructuredOutput
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from bench.quality import OBJECTS_SCHEMA
from server.settings import Settings
from shapeworld.text import parse_objects
from tests.conftest import ENGINE
from tests.server.conftest import LiveServer, data_url, free_port
from tests.server.test_chat import SCENES, image_message

SCENE_SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue", "yellow", "purple", "orange"]},
                                                 "shape": {"enum": ["circle", "square", "triangle", "star", "cross", "diamond"]},
                                                 "count": {"type": "integer", "minimum": 0, "maximum": 4}},
                "required": ["colour", "shape", "count"], "additionalProperties": False}
YES_NO = "▁(yes|no)"  # the embedded vocabulary's words carry SentencePiece's "▁"


@pytest.fixture(scope="module")
def reference(steering_engine):
    """The transformers engine with the embedded models: the engine under test itself on the transformers
    run, a second engine to compare with on the vllm run."""
    if ENGINE != "vllm":
        return steering_engine
    from decoding.transformers_engine import TransformersEngine
    from shapeworld.models import MODELS_DIR

    return TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", verifier_path=MODELS_DIR / "verifier")


def _error(call) -> dict:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    assert e.value.status_code == 400
    body = e.value.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    return body


def _ask(client, i=0, **kw):
    kw.setdefault("max_tokens", 40)
    return client.chat.completions.create(model="shapeworld", messages=image_message(i, "is there a red circle ?"),
                                          temperature=0, **kw)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCENE_SCHEMA, "strict": True}}},
     "response_format"),
    ({"guided_json": SCENE_SCHEMA}, "guided_json"),
    ({"structured_outputs": {"json": json.dumps(SCENE_SCHEMA)}}, "structured_outputs"),
    ({"guided_choice": ["yes", "no"]}, "guided_choice"),
    ({"structured_outputs": {"grammar": 'root ::= "[" [0-9] "]"'}}, "structured_outputs"),
])
def test_a_format_the_embedded_model_cannot_write_is_a_400(client, live, body, param):
    """No token of the model can begin the output (its only JSON opening is ``{"objects":[``): refused before
    generation, the field named."""
    err = _error(lambda: _ask(client, extra_body=body, stream=True))
    assert err["param"] == param
    assert err["message"] == f"{param}: no token of this model's vocabulary can begin an output that satisfies it"
    assert httpx.get(live.url + "/health").status_code == 200
    assert _ask(client, max_tokens=3).choices[0].message.content  # the next request is served


def test_a_format_no_sequence_of_its_words_completes_is_a_400(client):
    """``▁a▁b``: ``▁a`` can begin it, no word is ``▁b``: the check follows every path (within its budget)."""
    err = _error(lambda: _ask(client, extra_body={"guided_regex": "▁a▁b"}))
    assert err["param"] == "guided_regex"
    assert "no sequence of at most 40 tokens of this model's vocabulary satisfies it" in err["message"]
    err = _error(lambda: _ask(client, max_tokens=2, extra_body={"guided_regex": "▁a▁blue▁star"}))
    assert "at most 2 tokens" in err["message"]


def test_min_tokens_past_the_formats_end_is_a_400_naming_it(client):
    """``▁a▁blue▁star`` is 3 tokens then the end: ``min_tokens`` 4 masks that end where the format must end
    (a 400 naming min_tokens, never a 500 or a forbidden token); 3 is served."""
    fmt = {"structured_outputs": {"regex": "▁a▁blue▁star"}}
    err = _error(lambda: _ask(client, extra_body={**fmt, "min_tokens": 4}))
    assert err["param"] == "min_tokens" and "cannot run that long" in err["message"]
    err = _error(lambda: _ask(client, extra_body={"guided_choice": ["▁yes", "▁no"], "min_tokens": 2}))
    assert err["param"] == "min_tokens"
    assert _ask(client, extra_body={**fmt, "min_tokens": 3}).choices[0].message.content == "a blue star"


@pytest.mark.parametrize("body, param, match", [
    ({"response_format": {"type": "structural_tag"}}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema",
     "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}},
     "response_format.json_schema.extra", "Extra inputs"),
    ({"response_format": {"type": "json_object"}, "guided_regex": YES_NO}, "guided_regex", "only one"),
    ({"structured_outputs": {"regex": YES_NO, "choice": ["▁yes"]}}, "structured_outputs", "only one"),
    ({"structured_outputs": {}}, "structured_outputs", "give one constraint"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object", "must be true"),
    ({"structured_outputs": {"regex": YES_NO, "disable_any_whitespace": True}},
     "structured_outputs.disable_any_whitespace", "not supported"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "not supported"),
    ({"guided_regex": YES_NO, "guided_decoding_backend": "outlines"}, "guided_decoding_backend", "xgrammar"),
    ({"guided_regex": YES_NO, "guided_whitespace_pattern": " *"}, "guided_whitespace_pattern", "not supported"),
    ({"guided_choice": []}, "guided_choice", "empty"),
    ({"guided_choice": "yes"}, "guided_choice", "list"),
    ({"guided_regex": "("}, "guided_regex", "invalid regex constraint"),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "invalid grammar constraint"),
    ({"guided_json": {"type": "integer", "multipleOf": 2}}, "guided_json", "multipleOf"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": "[1]"}, "guided_json", "must be an object"),
])
def test_bad_constraints_are_400s_naming_the_field(client, body, param, match):
    err = _error(lambda: _ask(client, extra_body=body))
    assert err["param"] == param and match in err["message"], err


def test_the_text_format_and_the_xgrammar_backend_change_nothing(client):
    plain = _ask(client).choices[0].message.content
    assert _ask(client, response_format={"type": "text"}).choices[0].message.content == plain
    r = _ask(client, extra_body={"guided_regex": YES_NO, "guided_decoding_backend": "xgrammar"})
    assert r.choices[0].message.content in ("yes", "no")


def _engine_request(i, method, so, max_tokens=40, text="is there a red circle ?", **sampling):
    return GenerationRequest.single_turn(text, [SCENES[i].image()], structured=so,
                                         sampling=SamplingParams(max_tokens=max_tokens, **sampling),
                                         steering=SteeringSpec(method))


def test_a_format_the_embedded_model_can_write_under_every_method(client, steering_engine, reference):
    """``▁(yes|no)`` in its three spellings, under every method the server runs: one word, the end, and the
    transformers engine's token and processed log-probs (vLLM's are after its mask and our processor)."""
    spellings = [{"guided_regex": YES_NO}, {"structured_outputs": {"regex": YES_NO}},
                 {"structured_outputs": {"choice": ["▁yes", "▁no"]}}]
    answers = set()
    for method in steering_engine.available_methods:
        for k, body in enumerate(spellings):
            i = (k + len(answers)) % len(SCENES)
            r = _ask(client, i, logprobs=True, top_logprobs=2, extra_body={**body, "steering": {"method": method}})
            c = r.choices[0]
            assert c.message.content in ("yes", "no") and c.finish_reason == "stop", (method, body)
            so = StructuredOutput("regex", YES_NO) if k < 2 else StructuredOutput("choice", '["▁yes", "▁no"]')
            want = reference.generate([_engine_request(i, method, so, top_logprobs=2)])[0]
            assert c.message.content == want.text and r.usage.completion_tokens == len(want.token_ids) == 1
            got = c.logprobs.content[0]
            assert got.logprob == pytest.approx(want.logprobs[0].logprob, abs=1e-3)
            top = [max(v, -9999.0) for _, v in want.logprobs[0].top]  # -inf (masked, or cut by VCD) is OpenAI's -9999
            assert [t.logprob for t in got.top_logprobs] == pytest.approx(top, abs=1e-3), (method, body, i)
            answers.add(c.message.content)
    assert answers == {"yes", "no"}  # the constraint leaves the model its choice


def test_min_tokens_past_a_json_answers_end_is_a_400_naming_it(client):
    """The objects' JSON ends where the model closes the list: ``min_tokens`` beyond it masks the only way
    on, found during generation (the check cannot know where the model will close): a 400, no token forced;
    the transformers engine names the field."""
    fmt = {"type": "json_schema", "json_schema": {"name": "objects", "schema": OBJECTS_SCHEMA, "strict": True}}
    err = _error(lambda: client.chat.completions.create(model="shapeworld", messages=image_message(0), max_tokens=40,
                                                        temperature=0, response_format=fmt, extra_body={"min_tokens": 30}))
    assert "min_tokens" in err["message"] or "allows no token" in err["message"]
    assert err["param"] == "min_tokens"


def test_the_embedded_model_answers_json_under_every_method(client, steering_engine, reference):
    """Its one JSON shape, asked as a strict schema or as ``json_object``, under every method the server runs:
    the answer parses, validates, lists each object as one "colour shape" string (what the model's caption
    would say), and equals the transformers engine's, token for token."""
    fmts = [({"response_format": {"type": "json_schema", "json_schema": {"name": "objects", "schema": OBJECTS_SCHEMA,
                                                                        "strict": True}}},
             StructuredOutput("json", json.dumps(OBJECTS_SCHEMA))),
            ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object"))]
    for n, method in enumerate(steering_engine.available_methods):
        for k, (body, so) in enumerate(fmts):
            i = (2 * n + k) % len(SCENES)
            r = client.chat.completions.create(model="shapeworld", messages=image_message(i), max_tokens=40, temperature=0,
                                               extra_body={"steering": {"method": method}}, **body)
            c = r.choices[0]
            assert c.finish_reason == "stop", (method, c.message.content)
            answer = json.loads(c.message.content)
            jsonschema.validate(answer, OBJECTS_SCHEMA)
            assert answer["objects"] and all(len(parse_objects(o)) == 1 and len(o.split()) == 2 for o in answer["objects"])
            want = reference.generate([_engine_request(i, method, so, text="describe the image .")])[0]
            assert c.message.content == want.text, (method, k)


CAPTION = ("▁a▁(red|green|blue|yellow|purple|orange)▁(circle|square|triangle|star|cross|diamond)"
           "(▁and▁a▁(red|green|blue|yellow|purple|orange)▁(circle|square|triangle|star|cross|diamond))*▁\\.")


def test_steering_corrects_a_hallucination_inside_a_format(client):
    """The README's scene (bait 2, seed 1234) captioned inside a caption grammar and asked for its JSON
    objects: the plain model names a yellow star that is not there, TITA and FiSAO the yellow diamond that
    is, as they do without a format."""
    from shapeworld.world import make_scene

    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(make_scene("bait", 2, 1234).image())}},
                                         {"type": "text", "text": "describe the image ."}]}]
    json_format = {"type": "json_schema", "json_schema": {"name": "scene", "schema": OBJECTS_SCHEMA, "strict": True}}
    said, listed = {}, {}
    for method in ("none", "tita", "fisao"):
        r = client.chat.completions.create(model="shapeworld", messages=msgs, max_tokens=40, temperature=0,
                                           extra_body={"structured_outputs": {"regex": CAPTION},
                                                       "steering": {"method": method}})
        said[method] = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop" and said[method].endswith(" .")
        r = client.chat.completions.create(model="shapeworld", messages=msgs, max_tokens=40, temperature=0,
                                           response_format=json_format, extra_body={"steering": {"method": method}})
        listed[method] = json.loads(r.choices[0].message.content)["objects"]
    assert "a yellow star" in said["none"]
    assert "a yellow diamond" in said["tita"] and "a yellow diamond" in said["fisao"]
    assert "yellow star" in listed["none"] and "yellow diamond" not in listed["none"]
    assert "yellow diamond" in listed["tita"] and "yellow star" not in listed["tita"]
    assert "yellow diamond" in listed["fisao"] and "yellow star" not in listed["fisao"]


def test_a_format_streams_as_it_completes(client):
    body = {"guided_regex": "(▁a|▁the)▁(red|blue|green)▁(circle|square|triangle)▁\\.", "steering": {"method": "tita"}}
    whole = _ask(client, 3, extra_body=body).choices[0].message.content
    chunks = list(_ask(client, 3, stream=True, extra_body=body))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    words = whole.split()
    assert len(words) == 4 and words[0] in ("a", "the") and words[3] == "."


# ---------------------------------------------------------------- a checkpoint whose tokenizer writes JSON


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A LLaVA-shaped random-weight checkpoint with its reward model and calibrated verifier, served by the
    engine under test; and the transformers engine on the same files (the reference)."""
    from tests.decoding.test_families import VERIFIER, write_verifier_files
    from tests.families import build, build_verifier

    root = tmp_path_factory.mktemp("llava-structured")
    model, reward = build("llava", root / "vlm"), build("llava", root / "rm", size="tiny_rm", seed=1)
    verifier = build_verifier(VERIFIER["llava"], root / "verifier")
    write_verifier_files(verifier)
    paths = dict(reward_path=reward, verifier_path=verifier)
    from decoding.transformers_engine import TransformersEngine

    reference = TransformersEngine(model, **paths)
    if ENGINE == "vllm":
        from decoding.vllm.engine import VLLMEngine

        engine = VLLMEngine(model, max_batch=8, **paths)
    else:
        engine = reference
    settings = Settings(port=free_port(), model=model, served_model_name="llava", max_queue=64)
    with LiveServer(settings, engine=engine) as srv:
        yield srv, engine, reference
    if ENGINE == "vllm":
        engine.close()


def _llava_call(srv, method, **kw):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (40, 30), "red"))}},
                                         {"type": "text", "text": "describe the image ."}]}]
    extra = {**kw.pop("extra_body", {}), "steering": {"method": method}}
    return client.chat.completions.create(model="llava", messages=msgs, temperature=0, extra_body=extra, **kw)


def _llava_reference(reference, method, so, bias, max_tokens):
    req = GenerationRequest(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]}],
                            images=[Image.new("RGB", (40, 30), "red")], structured=so, steering=SteeringSpec(method),
                            sampling=SamplingParams(max_tokens=max_tokens, logit_bias=tuple(sorted(bias.items())), top_logprobs=1))
    return reference.generate([req])[0]


def _bias(engine, up=(), down_whitespace=True) -> dict[int, float]:
    """``logit_bias`` that keeps a random-weight model from padding forever with whitespace (which every
    JSON grammar allows between tokens): whitespace-only tokens at -100, the byte strings ``up`` at +100."""
    vocab = Grammars(engine.tokenizer, engine.vocab_size, [engine.tokenizer.eos_token_id]).info.decoded_vocab
    bias = {i: -100.0 for i, b in enumerate(vocab) if down_whitespace and b and not b.strip()}
    bias.update({i: 100.0 for i, b in enumerate(vocab) if b in up})
    return bias


@pytest.mark.parametrize("spelling", ["response_format", "guided_json"])
def test_json_schema_answers_validate_under_every_method(llava, spelling):
    srv, engine, reference = llava
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "name": {"type": "string", "maxLength": 6},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
              "required": ["colour", "count", "name", "tags"], "additionalProperties": False}
    bias = _bias(engine)
    body = ({"response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}}
            if spelling == "response_format" else {"extra_body": {"guided_json": schema}})
    steered = 0
    for method in engine.available_methods:
        r = _llava_call(srv, method, max_tokens=80, logit_bias={str(i): b for i, b in bias.items()}, logprobs=True,
                        top_logprobs=1, **body)
        c = r.choices[0]
        assert c.finish_reason == "stop", (method, c.message.content)
        jsonschema.validate(json.loads(c.message.content), schema)
        want = _llava_reference(reference, method, StructuredOutput("json", json.dumps(schema)), bias, 80)
        assert c.message.content == want.text and r.usage.completion_tokens == len(want.token_ids), method
        got = [t.logprob for t in c.logprobs.content]
        assert got == pytest.approx([t.logprob for t in want.logprobs], abs=1e-3)  # the processed scores agree
        steered += r.model_extra["steering"]["steered_tokens"]
    assert steered > 0  # steering changed tokens inside the schema


def test_json_object_answers_parse_under_every_method(llava):
    """Any JSON object: quotes and braces favoured so that a random-weight model closes what it opens."""
    srv, engine, reference = llava
    bias = _bias(engine, up=(b'"', b"}"))
    for method in engine.available_methods:
        r = _llava_call(srv, method, max_tokens=60, logit_bias={str(i): b for i, b in bias.items()},
                        response_format={"type": "json_object"})
        c = r.choices[0]
        assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict), (method, c.message.content)
        assert c.message.content == _llava_reference(reference, method, StructuredOutput("json_object"), bias, 60).text


def test_choices_stream_under_steering(llava):
    srv, engine, reference = llava
    choices = ["a red circle", "a blue square", "nothing at all"]
    for method in ("none", "tita+fisao"):
        kw = dict(max_tokens=20, extra_body={"structured_outputs": {"choice": choices}})
        whole = _llava_call(srv, method, **kw).choices[0]
        text = "".join(c.choices[0].delta.content or "" for c in _llava_call(srv, method, stream=True, **kw) if c.choices)
        assert whole.message.content in choices and text == whole.message.content and whole.finish_reason == "stop"
        want = _llava_reference(reference, method, StructuredOutput("choice", json.dumps(choices)), {}, 20)
        assert whole.message.content == want.text


def test_the_engine_process_follows_the_format():
    """The transformers engine in its child process (the server's default): rows cross the pipe with their
    constraint and get their grammar there."""
    from tests.server.test_engine_process import _client, _server

    with _server() as srv:
        client = _client(srv)
        for method in ("none", "tita+fisao"):
            r = client.chat.completions.create(model="shapeworld", messages=image_message(4, "is there a red circle ?"),
                                               max_tokens=5, temperature=0,
                                               extra_body={"guided_regex": YES_NO, "steering": {"method": method}})
            assert r.choices[0].message.content in ("yes", "no")
        err = _error(lambda: client.chat.completions.create(model="shapeworld", messages=image_message(0), max_tokens=5,
                                                            extra_body={"guided_json": SCENE_SCHEMA}))
        assert err["param"] == "guided_json"
