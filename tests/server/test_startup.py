"""The first seconds of a server: the port is bound before the models load (/health and the API answer
503 while loading, then 200), a failed load exits 3 (uvicorn's start-up failure) with the reason in the log, and the log lines carry
time and level and name the methods offered and why the others are not."""

import contextlib
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

import server.app
from server.settings import Settings
from tests.conftest import ENGINE
from tests.server.conftest import free_port
from tests.server.test_chat import image_message

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"  # logging's asctime


def first_answer(url: str, deadline: float = 60) -> httpx.Response:
    """The first answer of /health once the port accepts connections."""
    end = time.time() + deadline
    while time.time() < end:
        try:
            return httpx.get(url + "/health", timeout=5)
        except httpx.TransportError:
            time.sleep(0.02)
    raise RuntimeError("the port never opened")


@contextlib.contextmanager
def serving(app, port: int, log_level: str = "warning", on_exit=lambda: None):
    """``app`` under uvicorn in a thread on loopback ``port``: yields its URL; ``on_exit`` runs first at the end
    (a held load's release), then the server stops."""
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        on_exit()
        srv.should_exit = True
        thread.join(30)


def test_health_answers_503_while_loading_then_200(steering_engine, monkeypatch):
    """Loading held at its last step (the grounding judge) until the test lets it go: meanwhile the port is
    open and every endpoint that needs the models answers 503 in OpenAI's shape."""
    release = threading.Event()
    real = server.app.load_judge

    def held(settings):
        release.wait(120)
        return real(settings)

    monkeypatch.setattr(server.app, "load_judge", held)
    settings = Settings(port=free_port(), served_model_name="shapeworld")
    app = server.app.create_app(settings, engine=steering_engine)
    with serving(app, settings.port, on_exit=release.set) as url:
        r = first_answer(url)
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        body = {"model": "shapeworld", "messages": image_message(0), "max_tokens": 2}
        chat = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
        assert chat.status_code == 503 and chat.json()["error"]["type"] == "service_unavailable"
        models = httpx.get(url + "/v1/models", timeout=10)
        assert models.status_code == 503 and models.json()["error"]["code"] == 503
        release.set()
        end = time.time() + 120
        while httpx.get(url + "/health", timeout=5).status_code != 200:
            assert time.time() < end
            time.sleep(0.05)
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_a_request_at_the_start_of_loading_is_a_503_with_its_request_id(steering_engine, monkeypatch):
    """Held while the engine loads (before the chat service exists): a chat request is a 503 in OpenAI's
    shape with an X-Request-Id, never a 500."""
    release = threading.Event()

    class Borrowed:  # the session's engine, lent: the app that "loaded" it must not close it
        def __getattr__(self, name):
            return getattr(steering_engine, name)

        def close(self):
            pass

    def held(settings):  # the engine's load, in its thread: the chat service does not exist yet
        release.wait(120)
        return Borrowed()

    monkeypatch.setattr(server.app, "load_engine", held)
    settings = Settings(port=free_port(), served_model_name="shapeworld", engine_process=False)
    with serving(server.app.create_app(settings), settings.port, on_exit=release.set) as url:
        assert first_answer(url).json() == {"status": "loading"}
        chat = httpx.post(url + "/v1/chat/completions", json={"model": "shapeworld", "messages": image_message(0)},
                          timeout=10)
        assert chat.status_code == 503 and chat.json()["error"]["type"] == "service_unavailable", chat.text
        assert chat.headers.get("x-request-id")


def test_a_failed_load_says_failed(steering_engine, monkeypatch):
    def broken(settings):
        raise OSError("no judge here")

    monkeypatch.setattr(server.app, "load_judge", broken)
    settings = Settings(port=free_port(), served_model_name="shapeworld")
    app = server.app.create_app(settings, engine=steering_engine)
    with serving(app, settings.port, log_level="critical") as url:
        first_answer(url)
        end = time.time() + 60
        while (r := httpx.get(url + "/health", timeout=5)).json()["status"] == "loading":
            assert time.time() < end
            time.sleep(0.05)
        assert (r.status_code, r.json()) == (503, {"status": "failed", "reason": "no judge here"})
        assert isinstance(app.state.vlm.load_error, OSError)


def test_serve_exits_3_when_loading_fails(tmp_path):
    """`vlm-steer serve` of a folder with no model: the port opens, the load fails, the process exits 3 and
    its log says why, with time and level."""
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--model", str(tmp_path),
                           "--engine", ENGINE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert re.search(rf"^{STAMP} ERROR vlm_steer\.server: loading failed", proc.stderr, re.M), proc.stderr[-3000:]
    assert re.search(rf"^{STAMP} INFO uvicorn\.error: Uvicorn running on http://127\.0\.0\.1:{port}", proc.stderr, re.M)


@pytest.fixture(scope="module")
def served():
    """`vlm-steer serve` without a FiSAO verifier: (statuses /health gave until 200, the log, the url)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--verifier", "",
                             "--engine", ENGINE], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    statuses = []
    try:
        statuses.append(first_answer(url, 300).json()["status"])
        end = time.time() + 300
        while statuses[-1] != "ok":
            assert time.time() < end and proc.poll() is None
            time.sleep(0.05)
            statuses.append(httpx.get(url + "/health", timeout=5).json()["status"])
        models = httpx.get(url + "/v1/models", timeout=10).json()
    finally:
        proc.terminate()
        log = proc.communicate(timeout=120)[1]
    yield statuses, log, models


def test_serve_binds_before_loading(served):
    statuses, log, _ = served
    assert statuses[0] == "loading" and set(statuses) == {"loading", "ok"}
    bound = log.index("Uvicorn running on")
    assert bound < log.index("serving vlm on")  # the port opened before the models were loaded


def test_the_log_names_the_methods_offered_and_why_not_the_others(served):
    _, log, models = served
    engine = "vllm" if ENGINE == "vllm" else "transformers"
    offered = "none, tita" if ENGINE == "vllm" else "none, tita, vcd"
    line = re.search(rf"^{STAMP} INFO vlm_steer\.server: serving vlm on the {engine} engine: steering methods "
                     rf"{offered}; models (.*)$", log, re.M)
    assert line, log[-3000:]
    assert line[1].split(", ") == [m["id"] for m in models["data"]]
    assert "vlm:tita" in line[1] and "vlm:fisao" not in line[1]
    assert re.search(rf"^{STAMP} WARNING vlm_steer\.server: steering method 'fisao' not offered: needs verifier, not "
                     "configured$", log, re.M), log[-3000:]
    ours = [t for t in log.splitlines() if any(k in t for k in ("not offered", "serving vlm on", "Uvicorn running on",
                                                                 "Application startup complete"))]
    assert len(ours) >= 4
    for text in ours:  # each of ours and uvicorn's with its time, level and logger (vLLM's lines have their own format)
        assert re.match(rf"{STAMP} (INFO|WARNING) (vlm_steer\.server|uvicorn\.error): ", text), text
