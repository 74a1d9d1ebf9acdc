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


# In-process hooks. On the vllm engine only FiSAO's start runs in this process (its reward table is made
# at admission); faults inside vLLM's worker are tested in tests/vllm/test_vllm_engine.py.
HOOKS = [("tita", "advance"), ("fisao", "start"), ("fisao", "steer")] if ENGINE == "transformers" else [("fisao", "start")]


@pytest.mark.parametrize("method,hook", HOOKS)
def test_a_failing_steering_method_fails_only_its_requests(client, live, steering_engine, monkeypatch, method, hook):
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
