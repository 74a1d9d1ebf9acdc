"""Grounding blocks, per-arm mention metrics and per-token explanations through the live server."""

import json

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from decoding.explain import StepTrace, contribution, explain_tokens
from decoding.verifier import Verifier
from reward_models.grounding import Judge
from server.settings import EMBEDDED
from shapeworld.text import CAPTION_PROMPT, parse_objects
from shapeworld.world import make_scenes, phrase
from tests.server.conftest import data_url, start  # noqa: F401

SCENES = make_scenes("bait", 4, 777)


def message(i, text=CAPTION_PROMPT, image=True):
    parts = [{"type": "image_url", "image_url": {"url": data_url(SCENES[i].image())}}] if image else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def post(live, **body):
    body = {"model": "shapeworld", "max_tokens": 40, "temperature": 0, **body}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def counters(live) -> dict:
    text = httpx.get(live.url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in ("vlm_steer_object_mentions", "vlm_steer_suspect_mentions"):
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[(fam.name, s.labels["method"], s.labels["arm"])] = s.value
    return out


def test_grounding_block_matches_the_judge_and_counts_in_metrics(live):
    judge = Judge(Verifier(EMBEDDED / "judge"))
    before = counters(live)
    for i in range(len(SCENES)):
        body = post(live, messages=message(i), grounding=True)
        text = body["choices"][0]["message"]["content"]
        block = body["choices"][0]["grounding"]
        assert block == json.loads(json.dumps(judge.report(text, judge.scores([SCENES[i].image()]))))
        objs = [phrase(o) for o in parse_objects(text)]
        assert [m["object"] for m in block["mentions"]] == objs  # ShapeWorld's own parser agrees
        for m in block["mentions"]:
            assert text[m["start"]:m["end"]] == m["text"]
            assert m["verdict"] in ("grounded", "unsure", "suspect")
    after = counters(live)
    key = lambda n: (n, "none", "default")  # noqa: E731
    assert after[key("vlm_steer_object_mentions")] - before.get(key("vlm_steer_object_mentions"), 0) == sum(
        b for b in (len(set(parse_objects(t))) for t in texts(live)))


def texts(srv, **body):
    return [post(srv, messages=message(i), **body)["choices"][0]["message"]["content"] for i in range(len(SCENES))]


def test_sampled_judging_weighs_each_judged_response_by_the_inverse_share(steering_engine, monkeypatch):
    """Requests that do not ask for the block are judged with probability --grounding-sample, and each
    judged one counts 1/share times, so that the counters estimate every request's objects."""
    draws = iter([0.3, 0.7] * len(SCENES))  # judged, not judged, ...
    monkeypatch.setattr("server.serving_chat.random.random", lambda: next(draws))
    key = lambda n: (n, "none", "default")  # noqa: E731
    with start(steering_engine, grounding_sample=0.5) as srv:
        got = texts(srv)
        counted = counters(srv)[key("vlm_steer_object_mentions")]
        assert counted == 2 * sum(len(set(parse_objects(t))) for t in got[::2])
        asked = texts(srv, grounding=True)  # asked for: always judged, weight 1
        assert counters(srv)[key("vlm_steer_object_mentions")] - counted == sum(len(set(parse_objects(t))) for t in asked)


def test_grounding_without_a_judge_is_a_clear_400_and_type_errors_too(steering_engine, live):
    with start(steering_engine, grounding_verifier="") as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": "shapeworld", "messages": message(0), "grounding": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "grounding"
        assert httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": "shapeworld", "messages": message(0), "max_tokens": 4}).status_code == 200  # still healthy
    for bad, param in (({"grounding": "yes"}, "grounding"), ({"steering": {"method": "tita", "explain": 1}}, "steering.explain")):
        r = httpx.post(live.url + "/v1/chat/completions", timeout=60, json={"model": "shapeworld", "messages": message(0), **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_no_block_without_image_or_when_not_asked(live):
    body = post(live, messages=message(0, image=False), grounding=True)
    assert "grounding" not in body["choices"][0]
    body = post(live, messages=message(0))
    assert "grounding" not in body["choices"][0]


def test_stream_carries_grounding_in_the_final_chunk_and_explain_per_chunk(live):
    steering = {"method": "tita", "explain": True}
    plain = post(live, messages=message(1), grounding=True, steering=steering)
    chunks = []
    with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=60, json={
            "model": "shapeworld", "max_tokens": 40, "temperature": 0, "stream": True, "messages": message(1),
            "grounding": True, "steering": steering}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    last = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][0]
    assert last["choices"][0]["grounding"] == plain["choices"][0]["grounding"]
    assert "steering" in last
    streamed = [e for c in chunks for ch in c["choices"] for e in ch.get("explain", [])]
    assert streamed == plain["choices"][0]["explain"] and len(streamed) > 0


def test_explain_entries_are_consistent(live):
    body = post(live, messages=message(2), steering={"method": "tita", "explain": True}, logprobs=True)
    ch = body["choices"][0]
    ex = ch["explain"]
    assert len(ex) == len(ch["logprobs"]["content"]) > 0
    assert sum(e["changed"] for e in ex) == body["steering"]["steered_tokens"]
    for e, lp in zip(ex, ch["logprobs"]["content"]):
        assert set(e["contributions"]) == {"tita"}
        assert e["base_top_logprob"] >= e["base_logprob"]
        assert (e["base_token_id"] != e["token_id"]) == e["changed"]  # greedy: the choice is the steered top
        assert e["token_id"] == e["token_id"] and e["logprob"] == pytest.approx(lp["logprob"], abs=1e-4)
    off = post(live, messages=message(2), steering={"method": "tita"})
    assert "explain" not in off["choices"][0] and off["choices"][0]["message"] == ch["message"]


def test_explain_numbers_recomputed_from_one_step():
    torch.manual_seed(0)
    base = torch.randn(2, 7)
    rm = torch.randn(2, 7)
    s = 0.6
    lt, lr = base.log_softmax(-1), rm.log_softmax(-1)
    scores = lt + s * (lr - lt)  # TITA over both rows
    trace = StepTrace([1], base[[1]].log_softmax(-1), scores[[1]].log_softmax(-1),
                      {"tita": ([0], contribution(base[[1]], scores[[1]]))})
    tok = torch.tensor([0, int(scores[1].argmax())])
    e = explain_tokens(trace, tok)[1]
    c = int(tok[1])
    assert e.contributions["tita"] == pytest.approx(float(s * (lr[1, c] - lt[1, c])), abs=1e-5)
    assert e.base_logprob == pytest.approx(float(lt[1, c]), abs=1e-5)
    assert e.logprob == pytest.approx(float(scores[1].log_softmax(-1)[c]), abs=1e-5)
    assert e.base_token_id == int(base[1].argmax()) and e.changed == (int(base[1].argmax()) != c)
