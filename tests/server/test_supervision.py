"""Supervision and drain of a real `vlm-steer serve` (a subprocess on loopback, on the engine under test):
an engine process killed under load fails the requests in flight and the server exits 1 (its supervisor
restarts it); an engine stopped with requests turns liveness and readiness 503 within
--engine-stall-timeout and back to 200 when it resumes; a drain that reaches --drain-timeout ends every
stream still open with its error event and [DONE], and exits 0."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import httpx
import psutil

from server.supervision import EXIT_ENGINE_DEAD, Heartbeat
from tests.conftest import ENGINE
from tests.server.conftest import free_port

TEXT = [{"role": "user", "content": "describe the scene"}]
VLLM_LOG = re.compile(r"^\(\w+ pid=\d+\) ")  # a line of vLLM's own log (its processes prefix every line)
LONG = {"model": "shapeworld", "messages": TEXT, "max_tokens": 400, "ignore_eos": True}  # outlasts every deadline here


@contextlib.contextmanager
def serve(*args: str):
    """`vlm-steer serve` on a free port; yields (process, url, log file path) once /ready is 200."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="vlm-steer-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--engine", ENGINE,
                             "--served-model-name", "shapeworld", "--max-tokens-limit", "400", *args],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{open(log.name).read()[-3000:]}"
            assert time.time() < deadline, "the server did not get ready"
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield proc, url, log.name
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        os.unlink(log.name)


def engine_process(server: subprocess.Popen) -> psutil.Process:
    """The engine among the server's children: vLLM's engine core (it names itself VLLM::EngineCore), or the
    transformers engine's process (multiprocessing's spawn child; the resource tracker is not it)."""
    for p in psutil.Process(server.pid).children(recursive=True):
        text = p.name() + " " + " ".join(p.cmdline())
        if ("EngineCore" in text) if ENGINE == "vllm" else ("spawn_main" in text):
            return p
    raise AssertionError(f"no engine process among {psutil.Process(server.pid).children(recursive=True)}")


class Stream(threading.Thread):
    """One streamed chat completion, read line by line in a thread."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, {**body, "stream": True}
        self.lines: list[str] = []
        self.status = None
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=self.body, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line:
                    self.lines.append(line)

    def events(self) -> list:
        return [line if line == "data: [DONE]" else json.loads(line.removeprefix("data: ")) for line in self.lines]

    def content(self) -> int:
        return sum(1 for e in self.events() if isinstance(e, dict) and "choices" in e
                   and any(c["delta"].get("content") for c in e["choices"]))


class Call(threading.Thread):
    """One non-streamed chat completion in a thread."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body, self.response = url, body, None
        self.start()

    def run(self) -> None:
        self.response = httpx.post(self.url + "/v1/chat/completions", json=self.body, timeout=120)


def wait_for(cond, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


def gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def health(url: str, path: str = "/health"):
    """(status code, JSON body), or None when nothing answers (the server has stopped listening)."""
    try:
        r = httpx.get(url + path, timeout=5)
        return r.status_code, r.json()
    except httpx.HTTPError:
        return None


# ------------------------------------------------------------ the engine dies

def test_a_killed_engine_fails_the_requests_in_flight_and_the_server_exits_1():
    with serve() as (proc, url, log):
        call = Call(url, LONG)
        stream = Stream(url, LONG)
        wait_for(lambda: stream.content() >= 2 and gauge(url, "vlm_steer_num_requests_running") == 2, 120,
                 "both requests generating")
        engine_process(proc).kill()  # SIGKILL

        stream.join(60)
        events = stream.events()
        assert stream.status == 200 and events[-1] == "data: [DONE]"
        error = events[-2]["error"]
        assert error["code"] == 500 and error["type"] == "internal_server_error"
        assert "engine died" in error["message"], error
        call.join(60)
        assert call.response.status_code == 500 and "engine died" in call.response.json()["error"]["message"]
        # from now on, until it exits: liveness and readiness 503 "engine down", new requests 503 (or nothing
        # listens any more)
        while proc.poll() is None:
            for path in ("/health", "/ready"):
                got = health(url, path)
                assert got is None or (got[0] == 503 and got[1]["status"] == "engine down"), got
            try:
                r = httpx.post(url + "/v1/chat/completions", json={**LONG, "max_tokens": 4}, timeout=5)
                assert r.status_code == 503 and "engine is down" in r.json()["error"]["message"]
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert proc.wait(120) == EXIT_ENGINE_DEAD == 1
        text = open(log).read()
        ours = [line for line in text.splitlines() if not VLLM_LOG.match(line)]  # vLLM logs its own traceback
        assert "exiting with status 1" in text and not any("Traceback" in line for line in ours), text[-3000:]
        assert "500 on POST" not in text  # one log line for the engine's death, no traceback per request


# ------------------------------------------------------------ the engine stops stepping

def test_a_stopped_engine_turns_liveness_503_within_the_stall_timeout_and_recovers():
    stall = 2.0
    with serve("--engine-stall-timeout", str(stall)) as (proc, url, log):
        stream = Stream(url, LONG)
        wait_for(lambda: stream.content() >= 2, 120, "the stream generating")
        engine = engine_process(proc)
        engine.suspend()  # SIGSTOP
        try:
            code, body = wait_for(lambda: (h := health(url)) and h[0] == 503 and h, stall + 20, "/health 503")
            assert body["status"] == "engine stalled" and body["seconds_since_step"] >= stall, body
            code, body = health(url, "/ready")
            assert code == 503 and body["status"] == "engine stalled"
            assert stream.is_alive()  # the request waits; nothing killed it
        finally:
            engine.resume()  # SIGCONT
        wait_for(lambda: health(url) == (200, {"status": "ok"}), 60, "/health 200 again")
        assert health(url, "/ready") == (200, {"status": "ready"})
        stream.join(120)
        events = stream.events()
        assert events[-1] == "data: [DONE]" and not any("error" in e for e in events[:-1])
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        text = open(log).read()
        assert "without completing a step" in text and "no longer stalled" in text, text


def test_the_heartbeat_is_fresh_while_idle_or_stepping_and_stale_while_busy_without_steps():
    now = [100.0]
    beat = Heartbeat(5.0, clock=lambda: now[0])
    sched = SimpleNamespace(steps=0, num_running=0, num_waiting=0)
    assert beat.sample(sched) == 0.0
    now[0] += 50  # idle for 50 s: no stall
    assert beat.sample(sched) == 0.0
    sched.num_waiting = 1  # a request arrives and no step follows
    now[0] += 3
    assert beat.sample(sched) == 3.0 and beat.stale == 3.0
    sched.steps, sched.num_waiting, sched.num_running = 1, 0, 1  # it steps
    now[0] += 1
    assert beat.sample(sched) == 0.0
    assert not beat.stalled
    now[0] += 7  # running, no further step: past the 5 s timeout
    assert beat.sample(sched) == 7.0 and beat.stalled
    sched.num_running = 0  # its request left (cancelled): idle is no stall
    assert beat.sample(sched) == 0.0 and not beat.stalled


# ------------------------------------------------------------ the drain's deadline

def test_streams_open_at_the_drain_deadline_end_with_an_error_event_and_done():
    with serve("--drain-timeout", "1", "--max-batch", "2") as (proc, url, log):
        # 15 requests of 400 tokens, 2 at a time: 6,000 tokens, several seconds of the embedded model's work even
        # on a quiet machine (7 requests with a 2 s deadline all finished there)
        streams = [Stream(url, LONG) for _ in range(14)]
        call = Call(url, LONG)
        wait_for(lambda: any(s.content() >= 2 for s in streams)
                 and gauge(url, "vlm_steer_num_requests_waiting") >= 4, 120, "streams generating, others queued")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        cut = 0
        for s in streams:
            s.join(30)
            events = s.events()
            assert s.status == 200 and events[-1] == "data: [DONE]", s.lines[-3:]
            last = events[-2]
            if "error" in last:
                cut += 1
                assert last["error"]["code"] == 503 and last["error"]["type"] == "service_unavailable"
                assert "drain timeout" in last["error"]["message"]
            else:
                assert last["choices"][0]["finish_reason"] == "length"
        assert cut >= 1  # not all done in 1 s
        call.join(30)
        r = call.response
        assert r.status_code in (200, 503) and (r.status_code == 200 or r.json()["error"]["code"] == 503)
        text = open(log).read()
        assert "Traceback" not in text and "drain timeout (1.0 s): ending" in text, text[-3000:]
