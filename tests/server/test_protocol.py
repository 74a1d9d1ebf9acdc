"""OpenAI protocol fidelity and request isolation (issue 17), through the live server on either engine:
messages into prompts, one request's fault failing only that request, strict validation, logprobs that
are those of the content, the stream's shape, images as clients send them, the endpoints and fields
users expect, and 500s logged with their request id."""

import base64
import concurrent.futures as cf
import io
import itertools
import json
import logging
import threading

import httpx
import openai
import pytest
from PIL import Image

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from server.chat_service import chat_messages, derived_seed
from server.protocol import ChatCompletionRequest
from shapeworld.text import CAPTION_PROMPT
from tests.conftest import ENGINE
from tests.server.conftest import data_url
from tests.server.test_chat import SCENES, create, image_message

MODEL = "shapeworld"


def post(live, body=None, content=None, headers=None, timeout=60):
    if content is None:
        content = json.dumps(body)
        headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(live.url + "/v1/chat/completions", content=content, headers=headers, timeout=timeout)


def body(i=0, **kw):
    return {"model": MODEL, "messages": image_message(i), "max_tokens": 40, "temperature": 0, **kw}


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in a response")
    return json.loads(text, parse_constant=refuse)


def sse(r: httpx.Response) -> list[dict]:
    lines = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [strict_json(x) for x in lines[:-1]]


def engine_text(engine, i, method="none", **sampling) -> str:
    req = GenerationRequest.single_turn(CAPTION_PROMPT, [SCENES[i].image()],
                                        sampling=SamplingParams(max_tokens=40, **sampling), steering=SteeringSpec(method))
    return engine.generate([req])[0].text


def assert_error(r: httpx.Response, status: int, param: str | None = None, match: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    if match is not None:
        assert match in err["message"], err


# ------------------------------------------------------------------ 1. messages into prompts


def test_text_parts_are_joined_with_a_newline():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}, {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "c"}]}, {"role": "developer", "content": "be brief"}, {"role": "user", "content": "d"}]})
    messages, urls = chat_messages(req, max_images=4)
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "a\nb"}, {"type": "image"}, {"type": "text", "text": "c"}]},
                        {"role": "system", "content": "be brief"}, {"role": "user", "content": "d"}]
    assert urls == [("data:,", "messages.0.content.2.image_url.url")]


def test_split_text_parts_answer_as_one(client):
    one = create(client, 2).choices[0].message.content
    split = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(SCENES[2].image())}},
                                          {"type": "text", "text": "describe the"}, {"type": "text", "text": "image ."}]}]
    r = client.chat.completions.create(model=MODEL, messages=split, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == one


def test_the_embedded_tokenizer_splits_words_at_any_whitespace(steering_engine):
    tok = steering_engine.tokenizer
    assert tok("describe the\nimage .").input_ids == tok("describe the  image .").input_ids == tok(CAPTION_PROMPT).input_ids


@pytest.mark.parametrize("role", ["system", "developer", "assistant"])
def test_images_outside_user_messages_are_refused_at_validation(live, role):
    messages = [{"role": role, "content": [{"type": "image_url", "image_url": {"url": data_url(SCENES[0].image())}},
                                           {"type": "text", "text": "hello"}]},
                {"role": "user", "content": CAPTION_PROMPT}]
    r = post(live, {"model": MODEL, "messages": messages})
    assert_error(r, 400, "messages.0", f"only allowed in user messages (this one is from the {role})")


# ------------------------------------------------------------------ 2. isolation


def _long_request(client):
    return create(client, 7, max_tokens=120, extra_body={"ignore_eos": True})


def test_a_bad_request_in_a_burst_fails_alone(client, live, steering_engine):
    """One request decoding, then 7 good captions and one invalid request at once: 7 answers, one 400."""
    refs = [create(client, i).choices[0].message.content for i in range(7)]
    bad = {"model": MODEL, "messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": data_url(SCENES[0].image())}}]}, {"role": "user", "content": "hi"}]}
    with cf.ThreadPoolExecutor(9) as pool:
        running = pool.submit(_long_request, client)
        good = [pool.submit(post, live, body(i)) for i in range(7)]
        worse = pool.submit(post, live, bad)
        texts = [f.result().json()["choices"][0]["message"]["content"] for f in good]
        assert_error(worse.result(), 400, "messages.0")
        assert running.result().usage.completion_tokens == 120
    assert texts == refs


def _poisoned(rows) -> bool:
    return any("poison" in json.dumps(r.request.messages) for r in rows)


def _poison_body(i=5, **kw):
    msgs = image_message(i, text="poison " + CAPTION_PROMPT)
    return {"model": MODEL, "messages": msgs, "max_tokens": 40, "temperature": 0, **kw}


@pytest.mark.parametrize("where", ["prefill", "steering start"])
def test_a_fault_in_one_row_of_a_prefill_batch_fails_that_row_alone(client, live, steering_engine, monkeypatch, where):
    """A fault injected into one request among concurrent ones (the prefill forward, or a steering
    method's start) fails that request; the others finish, unchanged (whether they share its prefill
    depends on timing here; ``test_the_scheduler_isolates_...`` makes it certain). On vLLM,
    which prefills inside itself, the fault is injected into that request's output stream, or into its
    steering arguments (an image the worker cannot read: the steering start fails in vLLM's worker)."""
    vllm = ENGINE == "vllm"
    method = "none" if where == "prefill" else ("fisao" if vllm else "tita")
    steer = {"steering": {"method": method}}
    refs = [post(live, body(i, **steer)).json()["choices"][0]["message"]["content"] for i in range(7)]
    if where == "prefill" and vllm:
        _inject_generation_fault(steering_engine, monkeypatch)
        target, name = None, None
    elif vllm:
        from tests.server.test_faults import unreadable_images

        unreadable_images(steering_engine, monkeypatch, lambda request: _poisoned([type("R", (), {"request": request})]))
        target, name = None, None
    elif where == "prefill":
        target, name = steering_engine, "prefill"
    else:
        target, name = steering_engine.methods[method], "start"
    original = getattr(target, name) if target is not None else None

    def faulty(rows, *a, **kw):
        if _poisoned(rows):
            raise RuntimeError("injected fault")
        return original(rows, *a, **kw)

    if target is not None:
        monkeypatch.setattr(target, name, faulty)
    with cf.ThreadPoolExecutor(9) as pool:
        running = pool.submit(_long_request, client)
        while live.state.scheduler.num_running == 0:
            pass
        good = [pool.submit(post, live, body(i, **steer)) for i in range(7)]
        bad = pool.submit(post, live, _poison_body(**steer), None, {"x-request-id": "poisoned-1"})
        texts = [f.result().json()["choices"][0]["message"]["content"] for f in good]
        assert_error(bad.result(), 500)
        assert running.result().usage.completion_tokens == 120
    assert texts == refs
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


@pytest.fixture(scope="module")
def our_engine(steering_engine):
    """The transformers engine with the reward model and verifier: the one our scheduler drives (on the
    vllm test run too, where ``steering_engine`` is vLLM's)."""
    if ENGINE == "transformers":
        return steering_engine
    from decoding.transformers_engine import TransformersEngine
    from shapeworld.models import MODELS_DIR

    return TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", verifier_path=MODELS_DIR / "verifier")


@pytest.mark.parametrize("where", ["prefill", "steering start"])
def test_the_scheduler_isolates_a_faulty_row_of_one_prefill(our_engine, monkeypatch, where):
    """Eight rows queued before the step loop starts are prefilled in one forward (deterministically,
    unlike requests racing over HTTP); one of them carries a fault: it fails alone, the other seven
    finish with the text they have alone."""
    import queue

    from decoding.request import Failed, Finished
    from server.scheduler import Scheduler

    eng = our_engine
    method = "none" if where == "prefill" else "tita"
    reqs = [GenerationRequest.single_turn(("poison " if i == 3 else "") + CAPTION_PROMPT, [SCENES[i].image()],
                                          sampling=SamplingParams(max_tokens=40), steering=SteeringSpec(method))
            for i in range(8)]
    refs = {i: eng.generate([r])[0].text for i, r in enumerate(reqs) if i != 3}
    target = eng if where == "prefill" else eng.methods["tita"]
    original, sizes = getattr(target, "prefill" if where == "prefill" else "start"), []

    def faulty(rows, *a, **kw):
        sizes.append((len(rows), _poisoned(rows)))
        if _poisoned(rows):
            raise RuntimeError("injected fault")
        return original(rows, *a, **kw)

    monkeypatch.setattr(target, "prefill" if where == "prefill" else "start", faulty)
    events: queue.Queue = queue.Queue()
    sched = Scheduler(eng, max_batch=8, max_queue=8)
    for i, r in enumerate(reqs):
        sched.submit(eng.encode(r), lambda ev, i=i: events.put((i, ev)))
    sched.start()
    try:
        done = {}
        while len(done) < 8:
            i, ev = events.get(timeout=60)
            if isinstance(ev, (Finished, Failed)):
                done[i] = ev
    finally:
        sched.stop()
    assert sizes[0] == (8, True)  # all eight in one prefill, the poisoned one among them
    assert isinstance(done[3], Failed) and "injected fault" in str(getattr(done[3].error, "cause", done[3].error))
    assert {i: ev.completion.text for i, ev in done.items() if i != 3} == refs


# ------------------------------------------------------------------ 3. validation


STRICT_CASES = [
    ({"n": "2"}, "n"), ({"max_tokens": "3"}, "max_tokens"), ({"temperature": "0.5"}, "temperature"),
    ({"logprobs": "yes"}, "logprobs"), ({"stream": "no"}, "stream"), ({"stream": 1}, "stream"),
    ({"max_tokens": 3.0}, "max_tokens"), ({"n": True}, "n"), ({"top_p": "1"}, "top_p"), ({"seed": "7"}, "seed"),
    ({"presence_penalty": "0"}, "presence_penalty"), ({"stop": 5}, "stop"), ({"user": 5}, "user"),
    ({"logprobs": True, "top_logprobs": "2"}, "top_logprobs"), ({"ignore_eos": "true"}, "ignore_eos"),
    ({"steering": {"method": "tita", "strength": "0.5"}}, "steering.strength"),
    ({"steering": {"method": 1}}, "steering.method"), ({"store": "yes"}, "store"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"logit_bias": {"5": "1"}}, "logit_bias.5"), ({"model": 3}, "model"),
]


@pytest.mark.parametrize("fields,param", STRICT_CASES, ids=[p for _, p in STRICT_CASES])
def test_wrong_json_types_are_refused(live, fields, param):
    assert_error(post(live, body(**fields)), 400, param)


def test_wrong_types_inside_messages_are_refused(live):
    b = body()
    b["messages"][0]["content"][1]["text"] = 5
    assert_error(post(live, b), 400)
    b = body()
    b["messages"][0]["role"] = ["user"]
    assert_error(post(live, b), 400, "messages.0.role")


def test_numbers_of_the_right_kind_are_served(live):
    r = post(live, body(temperature=0, top_p=1, max_tokens=5, presence_penalty=0, seed=3))  # ints for floats
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("where,param", [
    (("messages", 0, "content", 1, "text"), "messages.0.content.1.text"), (("user",), "user"), (("stop",), "stop"),
])
def test_unpaired_surrogates_are_refused_naming_the_field(live, where, param):
    b = body()
    target = b
    for k in where[:-1]:
        target = target[k]
    target[where[-1]] = "describe @@SURROGATE@@ ."
    raw = json.dumps(b).replace("@@SURROGATE@@", "\\ud800")
    assert_error(post(live, content=raw, headers={"content-type": "application/json"}), 400, param, "unpaired surrogate")
    assert httpx.get(live.url + "/health").status_code == 200


@pytest.mark.parametrize("temperature", [0, 1])
@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_seeds_outside_signed_64_bits_are_refused(live, seed, temperature):
    assert_error(post(live, body(seed=seed, temperature=temperature)), 400, "seed")


def test_seeds_at_the_ends_of_the_range_are_served(live):
    for seed in (2**63 - 1, -(2**63)):
        r = post(live, body(seed=seed, temperature=1, n=2, max_tokens=5))
        assert r.status_code == 200, r.text
    assert derived_seed(2**63 - 1, 1) == -(2**63) and derived_seed(5, 2) == 7 and derived_seed(None, 1) is None


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"])
def test_bodies_that_are_not_json_are_refused_with_415(live, content_type):
    r = post(live, content=json.dumps(body()), headers={"content-type": content_type})
    assert_error(r, 415, None, "application/json")


def test_a_body_without_content_type_is_refused_with_415(live):
    """What ``fetch(url, {method: "POST", body: new Blob([json])})`` sends from any web page, with no CORS
    preflight: no Content-Type. Refused, so a page an operator opens cannot drive the server."""
    r = httpx.post(live.url + "/v1/chat/completions", content=json.dumps(body(max_tokens=3)).encode(), timeout=60)
    assert "content-type" not in r.request.headers
    assert_error(r, 415, None, "no Content-Type")


def test_json_with_a_charset_is_served(live):
    r = post(live, content=json.dumps(body(max_tokens=3)), headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw", ['"temperature": NaN', '"temperature": Infinity', '"steering": {"method": "tita", "strength": Infinity}'])
def test_nan_and_infinity_are_not_json(live, raw):
    text = json.dumps(body(max_tokens=3))[:-1] + ", " + raw + "}"
    assert_error(post(live, content=text, headers={"content-type": "application/json"}), 400, None, "not valid JSON")


def test_top_p_zero_is_the_top_token(client, live):
    greedy = create(client, 1).choices[0].message.content
    r = post(live, body(1, temperature=1.0, top_p=0, seed=11))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == greedy
    for bad in (-0.1, 1.1):
        assert_error(post(live, body(1, top_p=bad)), 400, "top_p")


# ------------------------------------------------------------------ 4. logprobs


def _content_logprobs(r: dict) -> list[dict]:
    return r["choices"][0]["logprobs"]["content"]


@pytest.mark.parametrize("i", [0, 3])
def test_logprob_tokens_rebuild_the_content(live, i):
    r = post(live, body(i, logprobs=True, top_logprobs=3)).json()
    content = r["choices"][0]["message"]["content"]
    lps = _content_logprobs(r)
    assert "".join(x["token"] for x in lps) == content
    assert bytes(b for x in lps for b in x["bytes"]).decode() == content
    assert any(x["token"].startswith(" ") for x in lps)  # words after the first keep their space
    assert len(lps) == r["usage"]["completion_tokens"]  # no entry for the end-of-sequence token
    assert r["choices"][0]["finish_reason"] == "stop"


def test_streamed_logprobs_equal_the_whole_answers(live):
    whole = post(live, body(4, logprobs=True, top_logprobs=2)).json()
    chunks = sse(post(live, body(4, logprobs=True, top_logprobs=2, stream=True)))
    streamed, text = [], ""
    for c in chunks:
        for ch in c["choices"]:
            if ch["delta"].get("content"):
                text += ch["delta"]["content"]
                entries = ch["logprobs"]["content"]
                assert "".join(x["token"] for x in entries) == ch["delta"]["content"]
                streamed += entries
    assert text == whole["choices"][0]["message"]["content"]
    assert streamed == _content_logprobs(whole)


def test_logprobs_of_tokens_that_cannot_be_chosen_are_finite(live, steering_engine):
    """VCD's plausibility cut (transformers) or top_p 0 (vLLM, whose processed logprobs follow top-k)
    leaves tokens at -inf: OpenAI writes -9999.0, JSON has no -Infinity."""
    extra = {"steering": {"method": "vcd"}} if "vcd" in steering_engine.available_methods else {"temperature": 1.0, "top_p": 0, "seed": 1}
    r = post(live, body(2, logprobs=True, top_logprobs=5, **extra))
    assert r.status_code == 200, r.text
    values = [t["logprob"] for x in _content_logprobs(strict_json(r.text)) for t in [x, *x["top_logprobs"]]]
    assert -9999.0 in values and all(v == -9999.0 or -1000 < v <= 0 for v in values)
    streamed = sse(post(live, body(2, logprobs=True, top_logprobs=5, stream=True, **extra)))  # strict_json: no -Infinity
    got = [x for c in streamed for ch in c["choices"] if ch.get("logprobs") for x in ch["logprobs"]["content"]]
    assert got == _content_logprobs(r.json())


# ------------------------------------------------------------------ 5. stream shape


def test_one_created_per_completion_and_null_usage_until_the_last_chunk(live, monkeypatch):
    clock = itertools.count(1_700_000_000)
    monkeypatch.setattr("server.serving_chat.now", lambda: next(clock))
    chunks = sse(post(live, body(0, stream=True, stream_options={"include_usage": True})))
    assert len({c["created"] for c in chunks}) == 1 and len({c["id"] for c in chunks}) == 1
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    plain = sse(post(live, body(0, stream=True)))
    assert all("usage" not in c for c in plain)
    whole = post(live, body(0)).json()
    assert isinstance(whole["created"], int)


# ------------------------------------------------------------------ 6. images


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _with_url(i, url):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": CAPTION_PROMPT}]}]
    return {"model": MODEL, "messages": msgs, "max_tokens": 40, "temperature": 0}


def _variants(b64: str) -> dict[str, str]:
    wrapped = "\n".join(b64[k:k + 76] for k in range(0, len(b64), 76))
    return {
        "upper-case media type": "data:IMAGE/PNG;base64," + b64,
        "upper-case base64 marker": "data:image/png;BASE64," + b64,
        "upper-case scheme": "DATA:image/png;base64," + b64,
        "a charset parameter": "data:image/png;charset=utf-8;base64," + b64,
        "line-wrapped base64": "data:image/png;base64," + wrapped,
        "URL-safe alphabet, no padding": "data:image/png;base64," + b64.replace("+", "-").replace("/", "_").rstrip("="),
        "no media type": "data:;base64," + b64,
        "a media type that does not match": "data:image/jpeg;base64," + b64,
    }


def test_data_urls_are_parsed_per_rfc_2397(live):
    ref = post(live, _with_url(3, data_url(SCENES[3].image()))).json()["choices"][0]["message"]["content"]
    for name, url in _variants(_png_b64(SCENES[3].image())).items():
        r = post(live, _with_url(3, url))
        assert r.status_code == 200, (name, r.text)
        assert r.json()["choices"][0]["message"]["content"] == ref, name
    assert_error(post(live, _with_url(3, "data:text/plain;base64," + _png_b64(SCENES[3].image()))), 400,
                 "messages.0.content.0.image_url.url", "MIME")


def test_transparent_pixels_are_white(live):
    scene = SCENES[5].image().convert("RGBA")
    scene.putalpha(0)  # the scene is there, fully transparent
    white = Image.new("RGB", scene.size, "white")
    a = post(live, _with_url(5, data_url(scene))).json()["choices"][0]["message"]["content"]
    b = post(live, _with_url(5, data_url(white))).json()["choices"][0]["message"]["content"]
    assert a == b


def test_a_long_thin_image_is_refused_by_its_aspect_ratio(live):
    thin = Image.new("RGB", (1, 20000), "white")  # 162 bytes as PNG, 64 x 1,280,000 pixels once resized
    r = post(live, _with_url(0, data_url(thin)))
    assert_error(r, 400, "messages.0.content.0.image_url.url", "aspect ratio")
    ok = post(live, _with_url(0, data_url(Image.new("RGB", (400, 20), "white"))))
    assert ok.status_code == 200, ok.text


def test_image_decoding_and_the_processor_run_off_the_event_loop(live, monkeypatch):
    import server.chat_service as service
    import server.images as images

    threads = {}
    for mod, name, key in ((images, "_open", "decode"), (service.ChatService, "_encode", "encode")):
        original = getattr(mod, name)

        def spy(*a, _original=original, _key=key, **kw):
            threads[_key] = threading.current_thread()
            return _original(*a, **kw)

        monkeypatch.setattr(mod, name, spy)
    assert post(live, body(0, max_tokens=3)).status_code == 200
    loop_thread = live.thread
    assert set(threads) == {"decode", "encode"} and all(t is not loop_thread for t in threads.values())


# ------------------------------------------------------------------ 7. endpoints and fields


def test_models_retrieve(client):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model" and "none" in m.model_extra["steering_methods"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def _token_id(engine, word: str) -> int:
    (tid,) = engine.tokenizer(word, add_special_tokens=False).input_ids
    return tid


@pytest.mark.parametrize("method", ["none", "tita"])
def test_logit_bias_is_applied_before_steering_as_in_the_engine(client, steering_engine, method):
    """+100 on a word brings it into the answer; -100 on the greedy first word removes it unsteered (TITA
    weighs the target's log-probs, bias included, by 1 - strength: the same -100 leaves "a" first); the
    server's text equals the engine's own generate with the same bias."""
    plain = create(client, 1, extra_body={"steering": {"method": method}}).choices[0].message.content
    first = plain.split()[0]
    for bias in ({str(_token_id(steering_engine, "purple")): 100}, {str(_token_id(steering_engine, first)): -100}):
        r = create(client, 1, logit_bias=bias, extra_body={"steering": {"method": method}})
        got = r.choices[0].message.content
        pairs = tuple(sorted((int(k), float(v)) for k, v in bias.items()))
        assert got == engine_text(steering_engine, 1, method, logit_bias=pairs)
        assert ("purple" in got) if bias[next(iter(bias))] > 0 else (got.split()[0] != first) == (method == "none")


# ------------------------------------------------------------------ 8. diagnostics


def _inject_generation_fault(engine, monkeypatch) -> None:
    """Poisoned requests fail during generation: in our scheduler's prefill (transformers), or in the
    stream of vLLM's outputs (vllm)."""
    if ENGINE == "transformers":
        original = engine.prefill

        def faulty(rows, *a, **kw):
            if _poisoned(rows):
                raise RuntimeError("injected fault")
            return original(rows, *a, **kw)

        monkeypatch.setattr(engine, "prefill", faulty)
        return
    from decoding.request import Failed

    original_stream = engine._stream

    async def faulty_stream(row, sink):
        if not _poisoned([row]):
            return await original_stream(row, sink)
        try:
            raise RuntimeError("injected fault")
        except RuntimeError as e:
            sink(Failed(e))

    monkeypatch.setattr(engine, "_stream", faulty_stream)


def test_a_500_logs_its_traceback_with_the_request_id(live, steering_engine, monkeypatch, caplog):
    _inject_generation_fault(steering_engine, monkeypatch)
    with caplog.at_level(logging.ERROR, logger="vlm_steer.server"):
        r = post(live, _poison_body(), headers={"x-request-id": "req-abc-123"})
        s = post(live, _poison_body(stream=True), headers={"x-request-id": "req-def-456"})
    assert_error(r, 500)
    assert r.headers["x-request-id"] == "req-abc-123"
    assert "Traceback" not in r.text and "injected" not in r.text
    assert sse(s)[-1]["error"]["code"] == 500 and "injected" not in s.text
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    for rid in ("req-abc-123", "req-def-456"):
        assert rid in logged
    assert "Traceback" in logged and "injected fault" in logged


def test_an_unexpected_error_in_the_route_is_logged_with_the_request_id(live, monkeypatch, caplog):
    def boom(*a, **kw):
        raise KeyError("internal detail")

    monkeypatch.setattr(live.state.service, "prepare", boom)
    with caplog.at_level(logging.ERROR, logger="vlm_steer.server"):
        r = post(live, body(), headers={"x-request-id": "req-route-1"})
    assert_error(r, 500)
    assert "internal detail" not in r.text
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "req-route-1" in logged and "internal detail" in logged and "Traceback" in logged
    assert httpx.get(live.url + "/health").status_code == 200


def test_a_tiny_temperature_is_greedy_and_harms_no_other_request(client, live):
    """logits / 1e-300 are infinite: vLLM samples greedily below 1e-5, so does this server (before, the
    draw raised and failed every row of the decode step)."""
    greedy = [create(client, i).choices[0].message.content for i in (0, 1)]
    with cf.ThreadPoolExecutor(2) as pool:
        tiny = pool.submit(post, live, body(0, temperature=1e-300))
        other = pool.submit(post, live, body(1))
        assert tiny.result().json()["choices"][0]["message"]["content"] == greedy[0]
        assert other.result().json()["choices"][0]["message"]["content"] == greedy[1]


def test_a_body_nested_too_deeply_is_a_400(live):
    raw = '{"model": "shapeworld", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert_error(post(live, content=raw, headers={"content-type": "application/json"}), 400, None, "nested too deeply")
    assert httpx.get(live.url + "/health").status_code == 200


# ------------------------------------------------------------------ found by trying to break it


@pytest.mark.parametrize("where", ["user part", "system string"])
def test_the_image_placeholder_in_text_is_refused(live, where):
    """``<image>`` typed in a text part made the processor raise StopIteration, which cannot cross a
    future: the request hung for good. It is the model's image placeholder: a 400 naming the text."""
    if where == "user part":
        b = body(0)
        b["messages"][0]["content"][1]["text"] = "<image> describe the image ."
        param = "messages.0.content.1.text"
    else:
        b = body(0)
        b["messages"].insert(0, {"role": "system", "content": "you see <image>"})
        param = "messages.0.content"
    assert_error(post(live, b, timeout=30), 400, param, "placeholder")
    assert httpx.get(live.url + "/health").status_code == 200


@pytest.mark.parametrize("key", ["--5", "1" * 5000, "5.0", "0x5", ""])
def test_malformed_logit_bias_keys_are_a_400(live, key):
    assert_error(post(live, body(0, logit_bias={key: 1})), 400, "logit_bias", "token ids")


def test_null_means_the_default_for_nullable_fields(live):
    r = post(live, body(0, n=None, stream=None, logprobs=None, ignore_eos=None, max_tokens=None, top_p=None))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("stop", [[" and"], [" red circle"], ["a"], [" and a"], ["red circle"]])
def test_logprobs_end_where_a_stop_string_cuts_the_content(live, stop):
    """The tokens after a stop string's cut leave the completion; a token the cut splits (" red" when
    the stop string is "red circle") stays, its string the part of its text that is in the content."""
    whole = post(live, body(1, stop=stop, logprobs=True, top_logprobs=2)).json()
    content = whole["choices"][0]["message"]["content"]
    lps = _content_logprobs(whole)
    assert whole["choices"][0]["finish_reason"] == "stop" and len(lps) == whole["usage"]["completion_tokens"]
    assert "".join(x["token"] for x in lps) == content
    if stop == ["red circle"]:  # the cut splits " red": the token stays, with the part of its text in the content
        assert lps[-1]["token"] == " " and lps[-1]["top_logprobs"][0]["token"] == " red"
    chunks = sse(post(live, body(1, stop=stop, logprobs=True, top_logprobs=2, stream=True)))
    streamed = [x for c in chunks for ch in c["choices"] if ch.get("logprobs") for x in ch["logprobs"]["content"]]
    assert streamed == lps
    assert "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"]) == content


def test_logprobs_rebuild_the_content_past_end_of_sequence_tokens(live, steering_engine):
    r = post(live, body(0, max_tokens=40, ignore_eos=True, logprobs=True, top_logprobs=3)).json()
    content, lps = r["choices"][0]["message"]["content"], _content_logprobs(r)
    eos = steering_engine.tokenizer.eos_token
    assert len(lps) == 40 == r["usage"]["completion_tokens"]
    assert "".join(x["token"] for x in lps) == content and eos not in content
    assert any(t["token"] == eos for x in lps for t in x["top_logprobs"])  # alternatives show special tokens


def test_a_huge_body_is_parsed_off_the_event_loop(live, monkeypatch):
    import server.chat_service as service

    threads = []
    original = service.parse_request

    def spy(raw):
        threads.append(threading.current_thread())
        return original(raw)

    monkeypatch.setattr(service, "parse_request", spy)
    many = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 20000}]}
    assert_error(post(live, many), 400, "messages", "context")
    assert post(live, body(0, max_tokens=2)).status_code == 200
    assert len(threads) == 2 and threads[0] is not live.thread and threads[1] is live.thread  # a small body stays


@pytest.mark.parametrize("rid,echoed", [("abc-123", True), ("x" * 129, False), ("tab\there", False)])
def test_client_request_ids_are_echoed_when_reasonable(live, rid, echoed):
    r = post(live, body(0, max_tokens=2), headers={"x-request-id": rid})
    assert (r.headers["x-request-id"] == rid) == echoed
    assert echoed or r.headers["x-request-id"].startswith("chatcmpl-")


def test_a_client_that_hangs_up_while_sending_its_body_is_no_server_error(live):
    import socket

    def errors_500() -> float:
        text = httpx.get(live.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("vlm_steer_request_errors_total") and 'code="500"' in line)

    before = errors_500()
    host, port = live.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\":")
    assert post(live, body(0, max_tokens=2)).status_code == 200  # the server went on
    assert errors_500() == before


def test_choices_share_one_encoding_and_keep_their_own_samplers(live, steering_engine, monkeypatch):
    calls = []
    original = steering_engine.encode
    monkeypatch.setattr(steering_engine, "encode", lambda g, *a, **kw: calls.append(g) or original(g, *a, **kw))
    r = post(live, body(2, n=3, temperature=1.0, seed=5, max_tokens=12)).json()
    assert len(calls) == 1 and len(r["choices"]) == 3
    alone = [post(live, body(2, temperature=1.0, seed=seed, max_tokens=12)).json()["choices"][0]["message"]["content"]
             for seed in (5, 6, 7)]
    assert [c["message"]["content"] for c in r["choices"]] == alone


@pytest.mark.parametrize("fields,param,match", [
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    ({"min_tokens": 3, "max_tokens": 2}, "min_tokens", "at most max_tokens"), ({"best_of": 2}, "best_of", "not supported"),
    ({"use_beam_search": True}, "use_beam_search", "not supported"), ({"vllm_xargs": {"a": 1}}, "vllm_xargs", "not supported"),
])
def test_cross_field_and_unimplemented_fields_name_the_field(live, fields, param, match):
    assert_error(post(live, body(0, **fields)), 400, param, match)


def test_no_op_values_of_unimplemented_fields_are_served(live):
    r = post(live, body(0, max_tokens=2, best_of=1, echo=False, use_beam_search=False, tool_choice="none", vllm_xargs={}))
    assert r.status_code == 200, r.text


def test_malformed_parts_and_conversations_name_the_place(live):
    b = body(0)
    b["messages"][0]["content"][1] = {"type": "text"}
    assert_error(post(live, b), 400, "messages.0.content.1.text", "Field required")
    b["messages"][0]["content"][1] = {"type": "video", "text": "x"}
    assert_error(post(live, b), 400, "messages.0.content.1")
    b = body(0)
    b["messages"].append({"role": "assistant", "content": "a red"})
    assert_error(post(live, b), 400, "messages", "last message")


def test_n_beyond_the_queue_is_a_400(steering_engine):
    from tests.server.conftest import start

    with start(steering_engine, max_queue=2) as srv:
        assert_error(post(srv, body(0, n=3)), 400, "n", "queue")
        assert post(srv, body(0, n=2, max_tokens=2)).status_code == 200


@pytest.mark.parametrize("data", [b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", b"", b"not an image at all"])
def test_formats_outside_the_allow_list_are_refused_plainly(live, data):
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    r = post(live, _with_url(0, url))
    assert_error(r, 400, "messages.0.content.0.image_url.url", "supported format")
    assert "0x" not in r.json()["error"]["message"]
