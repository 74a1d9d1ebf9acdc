"""A live uvicorn server on a free loopback port, driven by the official openai client."""

import base64
import io
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.serve import uvicorn_config
from server.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, settings: Settings, engine=None):
        self.app = create_app(settings, engine=engine)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, settings, host="127.0.0.1", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.vlm


def start(steering_engine, **overrides) -> LiveServer:
    settings = Settings(port=free_port(), served_model_name="shapeworld", **overrides)
    return LiveServer(settings, engine=steering_engine)


@pytest.fixture(scope="session")
def live(steering_engine):
    with start(steering_engine, max_queue=64) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(live):
    from openai import OpenAI

    return OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
