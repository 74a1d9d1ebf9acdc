"""The live server through the official openai client: completions, streaming, steering, errors, metrics."""

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shapeworld.text import CAPTION_PROMPT, parse_objects
from shapeworld.world import make_scenes
from tests.server.conftest import data_url, start

SCENES = make_scenes("bait", 8, 4242)


def image_message(i=0, text=CAPTION_PROMPT):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(SCENES[i].image())}},
                                         {"type": "text", "text": text}]}]


def create(client, i=0, **kw):
    kw.setdefault("max_tokens", 40)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="shapeworld", messages=image_message(i), **kw)


def test_non_streaming_caption(client, steering_engine):
    r = create(client)
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.role == "assistant"
    assert parse_objects(c.message.content)
    ref = steering_engine.generate([_engine_request(0)])[0]
    assert c.message.content == ref.text  # the server adds nothing to the engine's greedy output
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens == ref.prompt_tokens
    assert r.model_extra["steering"] == {"method": "none", "strength": None, "arm": "default", "steered_tokens": 0}


def _engine_request(i, method="none"):
    from decoding.request import GenerationRequest, SamplingParams, SteeringSpec

    return GenerationRequest.single_turn(CAPTION_PROMPT, [SCENES[i].image()], sampling=SamplingParams(max_tokens=40),
                                         steering=SteeringSpec(method))


def test_streaming_matches_non_streaming(client):
    whole = create(client, 1).choices[0].message.content
    chunks = list(create(client, 1, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model_extra["steering"]["method"] == "none"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_continuous_usage_stats(client):
    """vLLM's ``stream_options.continuous_usage_stats``: every chunk carries the usage so far, its completion
    tokens never decreasing and ending at the final usage; without it only the last chunk has one."""
    chunks = list(create(client, 1, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None and c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == chunks[-1].usage.total_tokens - chunks[-1].usage.prompt_tokens
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len({c.usage.completion_tokens for c in text_chunks}) > 1  # it grows while the text streams
    plain = list(create(client, 1, stream=True, stream_options={"include_usage": True}))
    assert [c.usage is not None for c in plain] == [False] * (len(plain) - 1) + [True]
    assert plain[-1].usage == chunks[-1].usage


def test_harmless_defaults_of_unsupported_fields_are_accepted(client):
    r = create(client, 0, response_format={"type": "text"}, tool_choice="none")
    assert r.choices[0].message.content == create(client, 0).choices[0].message.content


def test_presence_and_frequency_penalties_reach_the_engine(client, steering_engine):
    """Scene 3's greedy caption names "a green triangle" twice; OpenAI's penalties (at their largest)
    change it, through the server as in the engine."""
    import dataclasses

    plain = create(client, 3).choices[0].message.content
    got = create(client, 3, presence_penalty=2.0, frequency_penalty=2.0).choices[0].message.content
    req = _engine_request(3)
    req.sampling = dataclasses.replace(req.sampling, presence_penalty=2.0, frequency_penalty=2.0)
    assert got == steering_engine.generate([req])[0].text
    assert got != plain


@pytest.mark.parametrize("method", ["tita", "fisao", "tita+fisao", "vcd"])
def test_steering_per_request_equals_engine(client, steering_engine, method):
    if method not in steering_engine.available_methods and "+" not in method:  # vllm: no VCD, said plainly
        with pytest.raises(openai.BadRequestError, match=f"'{method}' is not available on the {steering_engine.name} engine"):
            create(client, 2, extra_body={"steering": {"method": method}})
        return
    raw = client.chat.completions.with_raw_response.create(
        model="shapeworld", messages=image_message(2), max_tokens=40, temperature=0, extra_body={"steering": {"method": method}})
    r = raw.parse()
    assert raw.headers["x-steering-arm"] == "default"
    ref = steering_engine.generate([_engine_request(2, method)])[0]
    assert r.choices[0].message.content == ref.text
    s = r.model_extra["steering"]
    assert s["method"] == method and s["steered_tokens"] == ref.steered_tokens
    assert set(s["strength"]) == set(method.split("+"))


def test_a_combination_in_any_order_is_the_same_method(client):
    """``fisao+tita`` is ``tita+fisao`` (methods apply in registry order): same answer, one method name in
    the response and in the metrics' labels."""
    a = create(client, 2, extra_body={"steering": {"method": "fisao+tita"}})
    b = create(client, 2, extra_body={"steering": {"method": "tita+fisao"}})
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.model_extra["steering"]["method"] == b.model_extra["steering"]["method"] == "tita+fisao"


def test_n_seed_and_logprobs(client):
    r = create(client, 3, n=2, temperature=1.0, seed=11, max_tokens=8, logprobs=True, top_logprobs=2)
    again = create(client, 3, n=2, temperature=1.0, seed=11, max_tokens=8, logprobs=True, top_logprobs=2)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    assert [c.index for c in r.choices] == [0, 1]
    lp = r.choices[0].logprobs.content
    assert lp and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)


def test_stop_and_max_tokens(client):
    r = create(client, 0, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    full = create(client, 0).choices[0].message.content
    word = full.split()[1]
    r = create(client, 0, stop=[word])
    assert r.choices[0].finish_reason == "stop" and word not in r.choices[0].message.content
    r = create(client, 0, max_tokens=30, extra_body={"ignore_eos": True})  # vLLM's extension: past the end
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 30
    assert r.choices[0].message.content.startswith(full)


@pytest.mark.parametrize("kw,status,match", [
    ({"temperature": 5}, 400, "temperature"),
    ({"extra_body": {"steering": {"method": "telepathy"}}}, 400, "unknown steering method"),
    ({"extra_body": {"steering": {"method": "tita", "strength": 3}}}, 400, "out of range"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "gpt-9"}, 404, "does not exist"),
    ({"logit_bias": {"99999": 10}}, 400, "outside the vocabulary"),
    ({"logit_bias": {"5": 101}}, 400, "[-100, 100]"),
    ({"logit_bias": {"five": 1}}, 400, "token ids"),
    ({"extra_body": {"guided_json": {"type": "integer"}}}, 400, "no token of this model's vocabulary can begin"),  # no digit
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools is not supported"),
])
def test_errors_are_openai_shaped(client, kw, status, match):
    model = kw.pop("model", "shapeworld")
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=model, messages=image_message(0), **kw)
    assert e.value.status_code == status
    body = e.value.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status
    assert match in body["message"]


def test_bad_bodies_and_images(live):
    post = lambda **kw: httpx.post(live.url + "/v1/chat/completions", timeout=30, **kw)
    r = post(content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    r = post(json={"model": "shapeworld"})  # no messages: 400, not FastAPI's 422
    assert r.status_code == 400
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
                                        {"type": "text", "text": "hi"}]}]
    r = post(json={"model": "shapeworld", "messages": bad})
    assert r.status_code == 400 and "decode image" in r.json()["error"]["message"]
    r = post(content=b"x" * (live.state.settings.max_body_bytes + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413
    for url, what in [("file:///etc/passwd", "scheme"), ("http://example.invalid/a.png", "not allowed")]:
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]
        r = post(json={"model": "shapeworld", "messages": msgs})
        assert r.status_code == 400 and what in r.json()["error"]["message"]
    assert httpx.get(live.url + "/health").status_code == 200  # still healthy


def test_allow_listed_host_resolving_to_loopback_is_refused(steering_engine):
    with start(steering_engine, image_url_hosts=["localhost"]) as srv:
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": srv.url.replace("127.0.0.1", "localhost") + "/health"}},
                                             {"type": "text", "text": "hi"}]}]
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "shapeworld", "messages": msgs}, timeout=30)
        assert r.status_code == 400 and "non-public" in r.json()["error"]["message"]


def test_models_health_metrics(live, client):
    assert [m.id for m in client.models.list().data][0] == "shapeworld"  # then its steering profiles (test_profiles.py)
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    create(client, 0, max_tokens=5)
    text = httpx.get(live.url + "/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for fam in ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                "request_queue_time_seconds", "prompt_tokens", "generation_tokens", "request_success",
                "num_requests_running", "num_requests_waiting", "steered_tokens", "steering_step_seconds",
                "requests_aborted"]:
        assert "vlm_steer_" + fam in names, fam
    if live.state.engine.name == "vllm":  # vLLM's own families beside ours
        assert {"vllm:num_requests_running", "vllm:time_to_first_token_seconds", "vllm:generation_tokens"} <= names
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    ok = [s for s in fams["vlm_steer_request_success"].samples if s.name.endswith("_total")]
    assert any(s.labels["method"] == "none" and s.labels["finished_reason"] == "length" for s in ok)


def test_concurrent_requests_share_decode_steps(live, client):
    before = live.state.scheduler.steps
    with cf.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda i: create(client, i, max_tokens=12), range(6)))
    tokens = sum(o.usage.completion_tokens for o in outs)
    assert live.state.scheduler.steps - before < tokens  # some steps decoded several rows


def test_client_disconnect_aborts_and_frees_the_row(live):
    body = {"model": "shapeworld", "messages": image_message(4), "max_tokens": 200, "stream": True,
            "temperature": 1.0, "seed": 1, "stop": ["zzz"]}
    aborted = lambda: sum(s.value for f in text_string_to_metric_families(httpx.get(live.url + "/metrics").text)
                          if f.name == "vlm_steer_requests_aborted" for s in f.samples if s.name.endswith("_total"))
    before = aborted()
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        next(r.iter_lines())  # the first chunk arrived; now hang up
    deadline = time.time() + 20
    while time.time() < deadline and (live.state.scheduler.num_running or aborted() == before):
        time.sleep(0.1)
    assert live.state.scheduler.num_running == 0
    assert aborted() > before


def test_queue_full_is_429_with_retry_after(steering_engine):
    with start(steering_engine, max_queue=0) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "shapeworld", "messages": image_message(0)}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert httpx.get(srv.url + "/health").status_code == 200


def test_api_keys(steering_engine):
    from openai import OpenAI

    with start(steering_engine, api_keys=["sekret"]) as srv:
        bad = OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="shapeworld", messages=image_message(0), max_tokens=2)
        good = OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.chat.completions.create(model="shapeworld", messages=image_message(0), max_tokens=2).choices
        assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/metrics").status_code == 200


def test_ab_arms_are_sticky_per_user(steering_engine, tmp_path):
    from openai import OpenAI

    exp = {"name": "exp1", "arms": [{"name": "control", "weight": 1, "steering": {"method": "none"}},
                                    {"name": "tita", "weight": 1, "steering": {"method": "tita", "strength": 0.6}}]}
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(exp))
    with start(steering_engine, experiment=path) as srv:
        c = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        seen = {}
        for user in [f"user{k}" for k in range(8)]:
            arms = set()
            for _ in range(2):
                raw = c.chat.completions.with_raw_response.create(model="shapeworld", messages=image_message(0),
                                                                  max_tokens=3, user=user)
                r = raw.parse()
                assert raw.headers["x-steering-arm"] == r.model_extra["steering"]["arm"]
                arms.add(r.model_extra["steering"]["arm"])
            assert len(arms) == 1  # sticky
            seen[user] = arms.pop()
        assert set(seen.values()) == {"control", "tita"}
        # an explicit steering overrides the arm (the experiment is not locked)
        r = c.chat.completions.create(model="shapeworld", messages=image_message(0), max_tokens=3, user="user0",
                                      extra_body={"steering": {"method": "fisao"}})
        assert r.model_extra["steering"]["arm"] == "explicit" and r.model_extra["steering"]["method"] == "fisao"
        text = httpx.get(srv.url + "/metrics").text
        assert 'arm="tita"' in text and 'arm="control"' in text
