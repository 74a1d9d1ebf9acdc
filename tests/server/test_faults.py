"""Faults inside steering: a reward model or verifier that raises fails only the requests that use it,
with a clear error and a metric, never serving them unsteered; the server stays healthy."""

import concurrent.futures as cf

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ENGINE
from tests.server.test_chat import create


def _failures(url: str, method: str) -> float:
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if fam.name == "vlm_steer_steering_failures":
            return sum(s.value for s in fam.samples if s.name.endswith("_total") and s.labels["method"] == method)
    return 0.0


# In-process hooks on the transformers engine. On the vllm engine the methods run in vLLM's worker: the
# fault is an image the worker cannot read, put into the steered request's arguments (its start fails).
HOOKS = ([("tita", "advance"), ("fisao", "start"), ("fisao", "steer")] if ENGINE == "transformers"
         else [("fisao", "arguments"), ("tita", "arguments")])


def unreadable_images(engine, monkeypatch, poisoned=lambda request: True):
    """vllm engine: the steering arguments of ``poisoned`` requests carry bytes that are no image."""
    original = engine._steering_args

    def corrupt(request, steering):
        args = original(request, steering)
        return {**args, "images": [b"\x89PNG not really"]} if poisoned(request) else args

    monkeypatch.setattr(engine, "_steering_args", corrupt)
    return original


@pytest.mark.parametrize("method,hook", HOOKS)
def test_a_failing_steering_method_fails_only_its_requests(client, live, steering_engine, monkeypatch, method, hook):
    if hook == "arguments":
        target, hook = steering_engine, "_steering_args"
        original = unreadable_images(steering_engine, monkeypatch)
    else:
        target = steering_engine.methods[method]
        original = getattr(target, hook)
        calls = {"n": 0}

        def broken(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= 2 or hook == "start":  # mid-generation for advance/steer
                raise RuntimeError("reward model exploded (internal detail)")
            return original(*args, **kwargs)

        monkeypatch.setattr(target, hook, broken)
    before = _failures(live.url, method)
    with cf.ThreadPoolExecutor(3) as pool:
        plain = [pool.submit(create, client, i) for i in (2, 3)]
        steered = pool.submit(create, client, 4, extra_body={"steering": {"method": method}})
        with pytest.raises(openai.InternalServerError) as err:
            steered.result()
        texts = [f.result().choices[0].message.content for f in plain]
    assert f"steering method '{method}' failed" in str(err.value) and "not served without its steering" in str(err.value)
    assert "exploded" not in str(err.value)  # no internals
    assert all(texts)
    monkeypatch.setattr(target, hook, original)
    assert _failures(live.url, method) == before + 1
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    ok = create(client, 4, extra_body={"steering": {"method": method}})  # healthy again once fixed
    assert ok.choices[0].message.content and ok.model_extra["steering"]["method"] == method
    assert live.state.scheduler.num_running == 0
