"""Other VLM families through the live server and the official openai client: every method streams and
reports its steering block, concurrent requests with mixed image sizes all succeed, byte-level output
streams as whole characters, and `serve --model DIR` alone serves a user's checkpoint (tiny random
weights from tests/families.py). On the vllm run the same matrix goes through the vLLM engine for the
families vLLM serves."""

import concurrent.futures
import json

import httpx
import pytest
from PIL import Image

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from server.settings import Settings
from tests.conftest import ENGINE
from tests.decoding.test_families import VERIFIER, write_verifier_files
from tests.families import FAMILIES, build, build_verifier
from tests.server.conftest import LiveServer, data_url, free_port

SIZES = [(40, 30), (64, 64), (20, 70), (96, 32)]


@pytest.fixture(scope="module", params=FAMILIES)
def family_server(request, tmp_path_factory):
    fam = request.param
    root = tmp_path_factory.mktemp(fam)
    model, reward = build(fam, root / "vlm"), build(fam, root / "rm", size="tiny_rm", seed=1)
    verifier = build_verifier(VERIFIER[fam], root / "verifier")
    write_verifier_files(verifier)
    paths = dict(reward_path=reward, verifier_path=verifier)
    if ENGINE == "vllm":
        from decoding.vllm.engine import VLLMEngine

        engine = VLLMEngine(model, max_batch=8, **paths)
    else:
        from decoding.transformers_engine import TransformersEngine

        engine = TransformersEngine(model, **paths)
    settings = Settings(port=free_port(), model=model, served_model_name=fam, max_queue=64)
    with LiveServer(settings, engine=engine) as srv:
        yield fam, srv, engine
    if ENGINE == "vllm":
        engine.close()


def _client(srv):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _messages(i):
    img = Image.new("RGB", SIZES[i % len(SIZES)], ["red", "blue", "green", "white"][i % 4])
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                         {"type": "text", "text": "describe the image ."}]}]


def test_every_method_streams_with_its_steering_block(family_server):
    fam, srv, engine = family_server
    client = _client(srv)
    for method in engine.available_methods:
        kw = dict(model=fam, messages=_messages(0), max_tokens=8, temperature=0, extra_body={"steering": {"method": method}})
        whole = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
        assert chunks[0].model_extra["steering"]["method"] == method == whole.model_extra["steering"]["method"]
        assert isinstance(whole.model_extra["steering"]["steered_tokens"], int)
        ref = engine.generate([GenerationRequest(messages=[{"role": "user", "content": [{"type": "image"}, {
            "type": "text", "text": "describe the image ."}]}], images=[Image.new("RGB", SIZES[0], "red")],
            sampling=SamplingParams(max_tokens=8), steering=SteeringSpec(method))])[0]
        assert whole.choices[0].message.content == ref.text, method


def _engine_requests(method, n=4, max_tokens=10):
    return [GenerationRequest(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                              images=[Image.new("RGB", SIZES[i % len(SIZES)], ["red", "blue", "green", "white"][i % 4])],
                              sampling=SamplingParams(max_tokens=max_tokens), steering=SteeringSpec(method))
            for i, t in enumerate(["describe the image ."] * (n - 1) + ["is there a cat ?"])]


@pytest.fixture(scope="module")
def family_reference(family_server):
    """The transformers engine on the same checkpoints (on the transformers run: transformers' generate)."""
    fam, srv, engine = family_server
    if ENGINE != "vllm":
        return None
    from decoding.transformers_engine import TransformersEngine

    res = engine.resources
    return TransformersEngine(engine.model_path, reward_path=res.reward, verifier_path=res.verifier.path)


@pytest.mark.parametrize("method", ["none", "tita", "fisao", "tita+fisao"])
def test_greedy_outputs_equal_the_reference(family_server, family_reference, method):
    """vllm run: the vLLM engine's greedy outputs equal the transformers engine's for each method, with the
    reward model inside vLLM's model; transformers run: `none` equals transformers' own generate (steered
    methods: test_families in decoding)."""
    fam, srv, engine = family_server
    reqs = _engine_requests(method)
    got = engine.generate(reqs)
    if family_reference is not None:
        assert engine.reward_in_model, fam
        want = family_reference.generate(reqs)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        # the same texts (a first token's leading space kept or dropped alike), where the completion holds no
        # partial UTF-8 character: vLLM's detokenizer drops those bytes, transformers' decode writes U+FFFD
        whole = [(g.text, w.text) for g, w in zip(got, want) if "\ufffd" not in w.text]
        assert all(a == b for a, b in whole), whole
        assert [g.steered_tokens for g in got] == [w.steered_tokens for w in want]
    elif method == "none":
        from tests.decoding.test_families import reference

        assert [g.token_ids for g in got] == [reference(engine, r, 10) for r in reqs]
    else:
        assert [g.token_ids for g in got] == [engine.generate([r])[0].token_ids for r in reqs]


def test_concurrent_requests_with_mixed_image_sizes_all_succeed(family_server):
    fam, srv, engine = family_server
    client = _client(srv)
    methods = engine.available_methods

    def one(i):
        return client.chat.completions.create(model=fam, messages=_messages(i), max_tokens=6, temperature=0,
                                              extra_body={"steering": {"method": methods[i % len(methods)]}})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(16)))
    alone = [one(i) for i in range(16)]
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]


def test_models_lists_the_methods_its_resources_allow(family_server):
    fam, srv, engine = family_server
    card = httpx.get(srv.url + "/v1/models").json()["data"][0]
    assert card["id"] == fam and card["steering_methods"] == engine.available_methods
    assert {"none", "tita", "fisao"} <= set(engine.available_methods)


def test_serve_model_alone_uses_no_shapeworld_models(tmp_path):
    """`vlm-steer serve --model DIR`: the embedded reward model and verifier go with the embedded VLM only."""
    model = build("qwen2_5_vl", tmp_path / "qwen")
    s = Settings(model=model)
    assert s.reward_model is None and s.verifier is None
    embedded = Settings()
    assert embedded.reward_model.name == "reward" and embedded.verifier.name == "verifier"
    assert Settings(reward_model="", verifier="").reward_model is None  # empty disables, on the embedded VLM too
    with LiveServer(Settings(port=free_port(), model=model, engine_process=True)) as srv:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert card["id"] == "qwen" and card["steering_methods"] == ["none", "vcd"]
        r = httpx.post(srv.url + "/v1/chat/completions", json={
            "model": "qwen", "messages": [{"role": "user", "content": "describe the image ."}], "max_tokens": 4,
            "steering": {"method": "fisao"}})
        assert r.status_code == 400 and "needs verifier" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "qwen", "messages": _messages(1), "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0


def test_byte_level_output_streams_whole_characters():
    """A byte-level tokenizer emits "ü" and "€" as several byte tokens: no delta carries half a character."""
    from decoding.transformers_engine import TransformersEngine
    from server.scheduler import Scheduler, Ticket

    engine = TransformersEngine.__new__(TransformersEngine)  # only the detokenizing verbs are used
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        from transformers import AutoTokenizer

        build("qwen2_5_vl", d)
        engine.tokenizer = AutoTokenizer.from_pretrained(d)
    engine.eos_ids, engine.max_context = {engine.tokenizer.eos_token_id}, 4096
    text = "a café über 5€ in 日本 ü"
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in engine.tokenizer.decode(ids[:k]) for k in range(1, len(ids)))  # characters split
    for stop in ((), ("zz",)):
        from decoding.transformers_engine import Row

        row = Row(GenerationRequest([], sampling=SamplingParams(max_tokens=len(ids), stop=stop)), [1], {})
        deltas = []
        ticket = Ticket(row, deltas.append)
        for t in ids:
            engine._append(row, t)
            Scheduler._emit(ticket, row)
        assert all("\ufffd" not in d.text for d in deltas)
        assert "".join(d.text for d in deltas) == text
        assert [t for d in deltas for t in d.token_ids] == ids


def test_the_familys_image_placeholder_in_text_is_refused(family_server):
    from server.chat_service import placeholder_tokens

    fam, srv, engine = family_server
    tokens = placeholder_tokens(engine.processor)
    image_token = engine.tokenizer.convert_ids_to_tokens(engine.processor.tokenizer.convert_tokens_to_ids(
        getattr(engine.tokenizer, "image_token", None) or engine.processor.image_token))
    assert image_token in tokens  # the token the model reads as an image position (Gemma: <image_soft_token>)
    for token in tokens:
        for content in (f"what is {token} here ?", [{"type": "image_url", "image_url": {"url": data_url(
                Image.new("RGB", (30, 30)))}}, {"type": "text", "text": f"look {token}"}]):
            r = httpx.post(srv.url + "/v1/chat/completions", json={
                "model": fam, "messages": [{"role": "user", "content": content}], "max_tokens": 4})
            assert r.status_code == 400 and token in r.json()["error"]["message"], (token, r.text)
    ok = httpx.post(srv.url + "/v1/chat/completions", json={"model": fam, "messages": _messages(2), "max_tokens": 4})
    assert ok.status_code == 200  # the server is healthy
