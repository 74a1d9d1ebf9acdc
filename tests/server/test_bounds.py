"""Bounded cost before a request is read (issue 30): clients that stall while sending a request are answered
408 and closed at the read deadlines, heads over the size or field limits get 431, and meanwhile the server
answers others; CORS headers only for the allowed origins. Raw sockets on loopback where clients misbehave."""

import concurrent.futures as cf
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import ENGINE
from tests.server.conftest import start

HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n")


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)))


def _until_closed(s: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after ``timeout``."""
    s.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            pytest.fail(f"connection still open after {timeout} s; received {data[:200]!r}")
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _status_and_error(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


@pytest.fixture(scope="module")
def short(steering_engine):
    """A server with 1-second read deadlines."""
    with start(steering_engine, header_timeout=1, body_timeout=1) as srv:
        yield srv


STALLS = {
    "nothing": b"",
    "part of the headers": HEAD[:40],
    "headers only": HEAD,
    "half a body": HEAD + b'{"model": "shapeworld", "messages": [' + b" " * 460,
}


def test_connections_that_stall_are_answered_408_and_closed_at_the_deadline(short):
    replies, sockets = {}, {name: _connect(short.url) for name in STALLS}
    for name, data in STALLS.items():
        sockets[name].sendall(data)

    def wait(name):
        with sockets[name] as s:
            replies[name] = _until_closed(s, 10)

    threads = [threading.Thread(target=wait, args=(n,)) for n in STALLS]
    for t in threads:
        t.start()
    # the server answers others while they stall
    assert httpx.get(short.url + "/health", timeout=5).json() == {"status": "ok"}
    for t in threads:
        t.join()
    assert replies["nothing"] == b""  # an idle connection is closed without a word, as a kept-alive one
    status, err = _status_and_error(replies["part of the headers"])
    assert status == 408 and err["code"] == 408 and "headers were not received within 1 s" in err["message"]
    for name in ("headers only", "half a body"):
        status, err = _status_and_error(replies[name])
        assert status == 408 and err["code"] == 408 and "body was not received within 1 s" in err["message"], name
        assert b"\r\nconnection: close\r\n" in replies[name].lower()
    assert httpx.get(short.url + "/health").status_code == 200


def test_a_kept_alive_connection_that_stalls_in_its_next_request_is_closed(short):
    with _connect(short.url) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):  # the head and the body may come in two reads
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request's head, never finished
        status, err = _status_and_error(_until_closed(s, 10))
    assert status == 408 and "headers were not received" in err["message"]


def test_a_request_sent_slowly_within_the_deadlines_is_served(short):
    body = json.dumps({"model": "shapeworld", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    with _connect(short.url) as s:
        for part in (head[:30], head[30:], body[:10], body[10:]):
            s.sendall(part)
            time.sleep(0.3)
        reply = _until_closed(s, 60)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["object"] == "chat.completion"


def test_a_large_body_in_the_same_read_as_its_head_is_not_counted_as_head(live):
    """The head's size is what ends at its blank line: a request of 100 KB sent in one write (head and body
    in one socket read, then the next request's head in the same read) is served."""
    # the bulk in a field that asks for nothing (a prompt this long is refused by vLLM's own character bound)
    body = json.dumps({"model": "shapeworld", "max_tokens": 2, "user": "u" * 100_000,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    one = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body)) + body
    with _connect(live.url) as s:
        s.sendall(one + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        replies = _until_closed(s, 60)
    assert replies.startswith(b"HTTP/1.1 200") and replies.count(b"HTTP/1.1 200") == 2, replies[:300]
    assert b'"chat.completion"' in replies and replies.endswith(b'{"status":"ok"}')


def _head_with(fields: list[bytes]) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def test_a_head_over_the_size_limit_gets_431(live):
    limit = live.state.settings.max_header_bytes
    assert limit == 32 * 1024
    ok = httpx.get(live.url + "/health", headers={"X-Pad": "a" * (limit - 200)})
    assert ok.status_code == 200  # just under the limit
    with _connect(live.url) as s:
        s.sendall(_head_with([b"X-Pad: " + b"a" * limit]))
        status, err = _status_and_error(_until_closed(s, 10))
    assert status == 431 and err["code"] == 431 and err["message"] == f"the request headers exceed {limit} bytes"
    with _connect(live.url) as s:  # a long request target counts too
        s.sendall(b"GET /health?" + b"q" * limit + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status_and_error(_until_closed(s, 10))[0] == 431


def test_a_huge_header_is_refused_before_it_is_read_and_others_are_served_meanwhile(live):
    sent, refused = 0, False
    health = []

    def poll():
        while not refused:
            health.append(httpx.get(live.url + "/health", timeout=10).status_code)

    poller = threading.Thread(target=poll)
    poller.start()
    with _connect(live.url) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(64):
                s.sendall(b"a" * 2**20)
                sent += 2**20
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            reply = _until_closed(s, 10)
        except ConnectionResetError:
            reply = b""
    refused = True
    poller.join()
    # the server stopped reading long before 64 MB (what the kernel's socket buffers took is all that went)
    assert sent < 64 * 2**20
    assert reply == b"" or _status_and_error(reply)[0] == 431
    assert health and set(health) == {200}


def test_too_many_header_fields_get_431(live):
    n = live.state.settings.max_headers
    ok = _head_with([b"X-F%d: v" % i for i in range(n - 1)])  # Host is one of them
    with _connect(live.url) as s:
        s.sendall(ok)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    with _connect(live.url) as s:
        s.sendall(_head_with([b"X-F%d: v" % i for i in range(n)]))
        status, err = _status_and_error(_until_closed(s, 10))
    assert status == 431 and err["message"] == f"the request has more than {n} header fields"


def test_no_cors_headers_unless_origins_are_allowed(live, steering_engine):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang"}
    body = {"model": "shapeworld", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.options(live.url + "/v1/chat/completions", headers=preflight)
    assert not any(h.startswith("access-control-") for h in r.headers)
    r = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Origin": "http://ui.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with start(steering_engine, allowed_origins=["http://ui.example"]) as srv:
        r = httpx.options(srv.url + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "x-stainless-lang" in r.headers["access-control-allow-headers"].lower()
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Origin": "http://ui.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        # errors carry them too, so the page can read the message
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "model": "nope"}, headers={"Origin": "http://ui.example"})
        assert r.status_code == 404 and r.headers["access-control-allow-origin"] == "http://ui.example"
        other = {**preflight, "Origin": "http://evil.example"}
        r = httpx.options(srv.url + "/v1/chat/completions", headers=other)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


# -- a huge prompt is refused by a prefix, and a long one does not hold up others

WORDS = "describe the red circle and the blue square . "


class CountingTokenizer:
    """The engine's tokenizer, recording the characters of each text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def __call__(self, text, *a, **kw):
        self.seen += [len(t) for t in ([text] if isinstance(text, str) else text)]
        return self.tokenizer(text, *a, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_prompt_is_refused_with_the_context_400_before_it_is_tokenised_whole(live, steering_engine, monkeypatch):
    counting = CountingTokenizer(steering_engine.tokenizer)
    monkeypatch.setattr(steering_engine, "tokenizer", counting)
    encoded = []
    monkeypatch.setattr(steering_engine, "encode", lambda *a, **k: encoded.append(a) or pytest.fail("encoded"))
    text = WORDS * (6 * 2**20 // len(WORDS))
    r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                   json={"model": "shapeworld", "max_tokens": 8, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"
    n = int(err["message"].split("at least ", 1)[1].split(" ")[0])
    assert n > 512 - 8 and err["message"] == f"prompt (at least {n} tokens) plus max_tokens (8) exceeds the context limit of 512"
    assert encoded == [] and counting.seen and max(counting.seen) <= 513 * 8  # a prefix only, never the 6 MB


def test_a_prompt_just_over_the_context_gets_its_exact_count(client, steering_engine):
    from decoding.request import GenerationRequest

    text = "describe the image . " * 130  # 520 words: under the prefix's length, tokenised whole as before
    n = len(steering_engine.encode(GenerationRequest.single_turn(text, [])).prompt_ids)
    assert n == 520 + 3  # <s>, USER:, ASSISTANT:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="shapeworld", max_tokens=8, messages=[{"role": "user", "content": text}])
    assert e.value.body["message"] == f"prompt ({n} tokens) plus max_tokens (8) exceeds the context limit of 512"


def test_a_long_prompt_of_few_tokens_is_served_as_its_short_form(client):
    """The prefix check refuses only on tokens counted: 300,000 spaces collapse to one (the embedded
    tokenizer's normaliser), so this prompt is the short one and is answered as it is. vLLM refuses it by
    its own bound first (at most 11 characters per token of context, before tokenising), as vLLM does."""
    if ENGINE == "vllm":
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="shapeworld", max_tokens=8, messages=[
                {"role": "user", "content": "describe" + " " * 300_000 + "the image ."}])
        assert "upper bound for 512 input tokens" in e.value.body["message"]
        return
    long = client.chat.completions.create(model="shapeworld", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "describe" + " " * 300_000 + "the image ."}])
    short = client.chat.completions.create(model="shapeworld", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "describe the image ."}])
    assert long.usage.prompt_tokens == short.usage.prompt_tokens
    assert long.choices[0].message.content == short.choices[0].message.content


def test_an_image_request_is_served_while_a_long_prompt_is_being_encoded(live, steering_engine, monkeypatch):
    """A long prompt's encoding is held until the small image request has been answered: with one lane
    for both the small request would wait behind it (and time out here)."""
    from tests.server.test_chat import image_message

    original = steering_engine.encode
    started, released, threads = threading.Event(), threading.Event(), {}

    def encode(request, *a, **k):
        long = sum(len(m["content"]) if isinstance(m["content"], str) else sum(len(p.get("text", "")) for p in m["content"])
                   for m in request.messages) > 64 * 1024
        threads["long" if long else "small"] = threading.current_thread().name
        if long:
            started.set()
            assert released.wait(60)
        return original(request, *a, **k)

    monkeypatch.setattr(steering_engine, "encode", encode)
    body = {"model": "shapeworld", "max_tokens": 4, "messages": [{"role": "user", "content": "describe" + " " * 100_000 + "the image ."}]}
    with cf.ThreadPoolExecutor(1) as pool:
        long = pool.submit(httpx.post, live.url + "/v1/chat/completions", json=body, timeout=90)
        assert started.wait(30)
        small = httpx.post(live.url + "/v1/chat/completions", timeout=20,
                           json={"model": "shapeworld", "max_tokens": 8, "temperature": 0, "messages": image_message(0)})
        assert small.status_code == 200 and not long.done()
        released.set()
        assert long.result().status_code == (400 if ENGINE == "vllm" else 200)  # vLLM's own character bound
    assert threads["long"].startswith("vlm-steer-long-prompt") and threads["small"].startswith("vlm-steer-preprocess")


# -- decoded images are held at the size the processors need

def _encoded(img, fmt="PNG") -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_processor_side_reads_the_sizes_a_processor_resizes_to(steering_engine):
    from transformers import Gemma3ImageProcessor, LlavaNextImageProcessor, Qwen2VLImageProcessor

    from server.images import processor_side

    assert processor_side(steering_engine.processor.image_processor) == 64  # CLIP: shortest edge 64, crop 64x64
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's grid
    assert processor_side(LlavaNextImageProcessor(image_grid_pinpoints=pinpoints)) == 1008
    assert processor_side(Gemma3ImageProcessor(size={"height": 896, "width": 896})) == 896
    assert processor_side(Gemma3ImageProcessor(do_pan_and_scan=True)) is None  # crops of the original
    assert processor_side(Qwen2VLImageProcessor()) is None  # a pixel budget
    assert processor_side(LlavaNextImageProcessor(do_resize=False)) is None


def test_large_images_are_reduced_at_decoding_and_others_left_as_they_are():
    import numpy as np
    from PIL import Image

    from server.images import ImageLimits, _open

    kept, plain = ImageLimits(keep_side=64), ImageLimits()
    assert _open(_encoded(Image.new("RGB", (4096, 2048), "red")), kept).size == (128, 64)
    assert _open(_encoded(Image.new("RGB", (2000, 4000), "red"), "JPEG"), kept).size == (64, 128)  # via JPEG draft
    noise = np.random.default_rng(0).integers(0, 256, (300, 50, 3), dtype=np.uint8)
    for img in (Image.fromarray(noise), Image.fromarray(noise[:64, :64]), Image.fromarray(noise[:64, :50])):
        for fmt in ("PNG", "JPEG"):  # at or below the side on one side: the very pixels of a plain decode
            a, b = _open(_encoded(img, fmt), kept), _open(_encoded(img, fmt), plain)
            assert a.size == b.size == img.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_a_4096_pixel_image_is_held_small_and_answered_as_the_engine_answers_it_whole(client, steering_engine, monkeypatch):
    """The server holds a 64x64 reduction of a 4096x4096 image (what the CLIP processor resizes it to) and
    answers what the engine's ``generate`` answers from the whole image."""
    from PIL import Image

    from decoding.request import GenerationRequest, SamplingParams
    from tests.server.conftest import data_url
    from tests.server.test_chat import SCENES

    held = []
    original = steering_engine.encode
    monkeypatch.setattr(steering_engine, "encode", lambda request, *a, **k: held.append([im.size for im in request.images])
                        or original(request, *a, **k))
    bigs = [SCENES[i].image().resize((4096, 4096), Image.Resampling.BICUBIC) for i in (1, 2)]
    urls = [data_url(big) for big in bigs]  # encoded first: seconds of PNG encoding between two requests could
    answers = []                            # outlast the kept-alive connection (uvicorn closes it after 5 s)
    for url in urls:
        r = client.chat.completions.create(model="shapeworld", max_tokens=30, temperature=0, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "describe the image ."}]}])
        answers.append((r.choices[0].message.content, r.usage.prompt_tokens))
    assert held == [[(64, 64)], [(64, 64)]]
    monkeypatch.undo()
    refs = steering_engine.generate([GenerationRequest.single_turn("describe the image .", [big], sampling=SamplingParams(max_tokens=30))
                                     for big in bigs])
    assert answers == [(ref.text, ref.prompt_tokens) for ref in refs]
