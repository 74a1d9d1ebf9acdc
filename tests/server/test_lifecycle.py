"""Process-level behaviour: `vlm-steer serve` drains on SIGTERM and exits 0; deadlines give 504."""

import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.conftest import ENGINE
from tests.server.conftest import free_port, start
from tests.server.test_chat import image_message


def test_sigterm_drains_in_flight_stream_and_exits_zero():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                             "--served-model-name", "shapeworld", "--log-level", "warning", "--engine", ENGINE])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        lines = []
        body = {"model": "shapeworld", "messages": image_message(0), "max_tokens": 200, "stream": True,
                "temperature": 1.0, "seed": 5, "steering": {"method": "tita"}}

        def stream():
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if len(lines) == 1:
                        proc.send_signal(signal.SIGTERM)  # mid-stream

        t = threading.Thread(target=stream)
        t.start()
        t.join(60)
        assert proc.wait(60) == 0
        assert "data: [DONE]" in lines  # the in-flight stream was finished, not cut
        assert not any('"error"' in line for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_deadline_gives_504_and_frees_the_row(steering_engine):
    with start(steering_engine, request_timeout=0.001) as srv:
        body = {"model": "shapeworld", "messages": image_message(0), "max_tokens": 40}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == 504
        time.sleep(0.5)
        assert srv.state.scheduler.num_running == 0
        assert httpx.get(srv.url + "/health").status_code == 200
