"""The engine in its own process (the server's default for the transformers engine): the same greedy
outputs as the engine in this process, events and metrics across the pipe, disconnects, the engine
process dying, and the pieces (frames, pickled errors, the prefill-delay policy) on known inputs."""

import json
import os
import pickle
import threading
import time
from collections import deque

import httpx
import openai
import pytest

from decoding.methods import SteeringFailed
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from server.engine_process import _Frames, _portable
from server.scheduler import Scheduler, Ticket
from server.settings import Settings
from shapeworld.models import MODELS_DIR
from shapeworld.text import CAPTION_PROMPT
from tests.server.conftest import LiveServer, free_port
from tests.server.test_chat import SCENES, image_message


def _server(**overrides) -> LiveServer:
    return LiveServer(Settings(port=free_port(), served_model_name="shapeworld", **overrides))


@pytest.fixture(scope="module")
def proc_live():
    with _server() as srv:
        yield srv


@pytest.fixture(scope="module")
def reference():
    """The same models in this process: what the engine process must reproduce."""
    from decoding.transformers_engine import TransformersEngine

    return TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", verifier_path=MODELS_DIR / "verifier")


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_server_runs_its_engine_in_a_child_process(proc_live):
    sched = proc_live.state.scheduler
    assert type(sched).__name__ == "ProcessScheduler" and sched.alive
    assert sched._proc.pid != os.getpid() and sched._proc.is_alive()


@pytest.mark.parametrize("method", ["none", "tita", "fisao", "tita+fisao", "vcd"])
def test_same_greedy_outputs_as_the_engine_in_process(proc_live, reference, method):
    client = _client(proc_live)
    r = client.chat.completions.create(model="shapeworld", messages=image_message(2), max_tokens=40, temperature=0,
                                       extra_body={"steering": {"method": method}})
    ref = reference.generate([GenerationRequest.single_turn(CAPTION_PROMPT, [SCENES[2].image()],
                                                            sampling=SamplingParams(max_tokens=40),
                                                            steering=SteeringSpec(method))])[0]
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens == ref.prompt_tokens
    assert r.model_extra["steering"]["steered_tokens"] == ref.steered_tokens
    chunks = list(client.chat.completions.create(model="shapeworld", messages=image_message(2), max_tokens=40,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"steering": {"method": method}}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_steering_time_and_steps_cross_the_pipe(proc_live):
    before = proc_live.state.scheduler.steps
    _client(proc_live).chat.completions.create(model="shapeworld", messages=image_message(3), max_tokens=8, temperature=0,
                                               extra_body={"steering": {"method": "tita"}})
    assert proc_live.state.scheduler.steps > before
    text = httpx.get(proc_live.url + "/metrics").text
    counts = [line for line in text.splitlines()
              if line.startswith("vlm_steer_steering_step_seconds_count") and 'method="tita"' in line]
    assert counts and float(counts[0].split()[-1]) > 0


def test_sampling_with_a_seed_is_reproducible_across_the_pipe(proc_live):
    client = _client(proc_live)
    a, b = (client.chat.completions.create(model="shapeworld", messages=image_message(1), max_tokens=20, temperature=1.0,
                                           seed=7).choices[0].message.content for _ in range(2))
    assert a == b


def test_client_disconnect_frees_the_row_in_the_engine_process(proc_live):
    body = {"model": "shapeworld", "messages": image_message(4), "max_tokens": 200, "stream": True,
            "temperature": 1.0, "seed": 1, "stop": ["zzz"]}
    with httpx.stream("POST", proc_live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        next(r.iter_lines())  # the first events arrived; now hang up
    deadline = time.time() + 20
    while time.time() < deadline and proc_live.state.scheduler.num_running:
        time.sleep(0.05)
    assert proc_live.state.scheduler.num_running == 0 and proc_live.state.scheduler.num_waiting == 0
    ok = httpx.post(proc_live.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30)
    assert ok.status_code == 200  # and the engine goes on serving


def test_a_burst_of_long_requests_never_deadlocks_the_two_pipes(proc_live):
    """24 image captions of 40 tokens and 4 requests of 8 choices x 256 tokens at once: the API process
    once wrote its commands with blocking writes while the engine waited for it to read its events
    (both pipes full: the server hung for good, /health too). Every request is answered."""
    import concurrent.futures as cf

    def post(n, max_tokens):
        body = {"model": "shapeworld", "messages": image_message(n % 8), "max_tokens": max_tokens, "n": 1 if n < 24 else 8,
                "temperature": 0, "ignore_eos": True}
        return httpx.post(proc_live.url + "/v1/chat/completions", json=body, timeout=120)

    with cf.ThreadPoolExecutor(28) as pool:
        futures = [pool.submit(post, n, 40 if n < 24 else 256) for n in range(28)]
        done, _ = cf.wait(futures, timeout=150)
    assert len(done) == 28, "requests still hanging: the pipes deadlocked"
    rs = [f.result() for f in futures]
    assert [r.status_code for r in rs] == [200] * 28
    assert [r.json()["usage"]["completion_tokens"] for r in rs] == [40] * 24 + [8 * 256] * 4
    assert httpx.get(proc_live.url + "/health", timeout=5).json() == {"status": "ok"}


def test_the_command_pipe_frames_are_those_recv_bytes_reads():
    import multiprocessing as mp

    from server.engine_process import _frame

    reader, writer = mp.Pipe(duplex=False)
    for msg in (("submit", 7, {"x": [1, 2, 3]}), ("cancel", 7), ("stop",)):
        os.write(writer.fileno(), _frame(msg))
        assert pickle.loads(reader.recv_bytes()) == msg


def test_a_dead_engine_process_fails_requests_and_health():
    with _server() as srv:
        body = {"model": "shapeworld", "messages": image_message(4), "max_tokens": 200, "stream": True,
                "temperature": 1.0, "seed": 1, "stop": ["zzz"]}
        lines = []
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
            it = r.iter_lines()
            lines.append(next(it))
            srv.state.scheduler._proc.kill()
            lines.extend(it)  # the stream ends (with an error event), it does not hang
        events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == 500 and "the engine process was killed by SIGKILL" in error["message"]
        for path in ("/health", "/ready"):  # liveness and readiness both say so at once
            h = httpx.get(srv.url + path)
            assert h.status_code == 503 and h.json() == {"status": "engine down",
                                                         "reason": "the engine process was killed by SIGKILL"}
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 503 and "the engine is down" in r.json()["error"]["message"]


def test_frames_are_cut_out_however_the_reads_split_them():
    from multiprocessing import Pipe

    a, b = Pipe(duplex=False)
    msgs = [b"x", b"", bytes(range(256)) * 80, b"tail"]  # 20 KB: written as header, then body
    for m in msgs:
        b.send_bytes(m)
    b.close()
    raw = b""
    while chunk := os.read(a.fileno(), 1 << 16):  # the pipe's bytes as they are
        raw += chunk
    for step in (1, 7, len(raw)):
        got, closed = [], []
        f = _Frames(got.append, lambda: closed.append(True))
        for k in range(0, len(raw), step):
            f.data_received(raw[k : k + step])
        f.connection_lost(None)
        assert got == msgs and closed == [True]


def test_errors_cross_the_pipe_with_their_kind():
    e = pickle.loads(pickle.dumps(SteeringFailed("tita", RuntimeError("boom"))))
    assert isinstance(e, SteeringFailed) and e.method == "tita" and str(e) == "steering method 'tita' failed (RuntimeError)"
    assert isinstance(_portable(ValueError("bad")), ValueError)

    class Unpicklable(Exception):
        def __init__(self):
            super().__init__("held a lock")
            self.lock = threading.Lock()

    p = _portable(Unpicklable())
    assert type(p) is RuntimeError and "Unpicklable: held a lock" in str(p)


def test_images_cross_the_pipe_only_for_methods_that_read_them(engine):
    """Rows whose steering reads only pixels and tower outputs leave the decoded images behind (a large
    image held the event loop for hundreds of ms to pickle and send); the others carry them."""
    from server.engine_process import EngineFrontend, ProcessScheduler, Withheld

    sched = ProcessScheduler.__new__(ProcessScheduler)
    sched.engine = EngineFrontend(MODELS_DIR / "vlm", ["tita", "fisao"], 256, 64, image_methods=["fisao"])
    req = GenerationRequest.single_turn(CAPTION_PROMPT, [SCENES[0].image()])
    for steer, shipped in (({}, False), ({"tita": 0.9}, False), ({"fisao": 1.0}, True), ({"tita": 0.9, "fisao": 1.0}, True)):
        row = sched.engine.encode(req)
        row.steer = steer
        wire = pickle.loads(pickle.dumps(sched._wire(row)))
        assert len(wire.request.images) == 1 and (wire.request.images[0] == Withheld((64, 64))) != shipped
        assert row.request.images[0].size == (64, 64)  # the API process's request is left as it was
        assert (wire.inputs["pixel_values"] == row.pixel_values.numpy()).all()


def test_errors_cross_the_pipe_with_their_traceback():
    """The API process logs a 500's traceback, also when the error was raised in the engine process."""
    for make in (lambda: ValueError("bad pixels"), lambda: SteeringFailed("tita", RuntimeError("bad pixels"))):
        try:
            raise make()
        except Exception as e:
            p = pickle.loads(pickle.dumps(_portable(e)))
        assert type(p) is type(make()) and "Traceback" in p.remote_traceback and "raise make()" in p.remote_traceback
        assert getattr(p, "method", None) == getattr(make(), "method", None)


def test_prefill_delay_lets_new_rows_wait_for_company(engine):
    s = Scheduler(engine, max_batch=4, prefill_delay=1.0)
    s._last_prefill = 10.0
    running = object()  # a batch is decoding
    s.waiting = deque([Ticket(row=None, sink=print)])
    assert s._due(None, 4)  # idle: at once
    assert not s._due(running, 3)  # one waits, room for three: wait for company
    s.waiting.extend([Ticket(row=None, sink=print), Ticket(row=None, sink=print)])
    assert s._due(running, 3)  # enough to fill the batch
    s.waiting = deque([Ticket(row=None, sink=print, submitted=time.monotonic() - 10.5)])
    assert s._due(running, 3)  # waited longer than the last prefill took
    s.prefill_delay = 0.0
    s.waiting = deque([Ticket(row=None, sink=print)])
    assert s._due(running, 3)  # no delay: at once
