"""Steering profiles as models (server.profiles), through the official openai client on a live loopback
server of the engine under test: the list, a profile's tokens against the same request's ``steering``,
the precedence of locked experiment > body ``steering`` > profile > unlocked experiment, the echoed model
name, the metrics' labels, and the profiles file."""

import json

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from server.profiles import Profiles, ProfilesFile, combinations
from tests.server.conftest import start
from tests.server.test_chat import image_message

# README's scene: the plain model names a "yellow star" that TITA and FiSAO change into the diamond
from shapeworld.world import make_scene  # noqa: E402
from tests.server.conftest import data_url  # noqa: E402

BAIT = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(make_scene("bait", 2, 1234).image())}},
                                     {"type": "text", "text": "describe the image ."}]}]
FILE = {"profiles": {"tita-light": {"method": "tita", "strength": 0.3}, "both": {"method": "fisao+tita", "strength": 0.5},
                     "contrast": {"method": "vcd"}}}


@pytest.fixture(scope="module")
def srv(steering_engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "profiles.yaml"
    path.write_text(json.dumps(FILE))  # YAML is a superset of JSON
    with start(steering_engine, profiles=path) as s:
        yield s


@pytest.fixture(scope="module")
def oai(srv):
    return OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, model, messages=BAIT, **kw):
    kw.setdefault("max_tokens", 40)
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)


def test_models_lists_the_served_model_then_every_profile_it_can_run(oai, steering_engine):
    methods = [m for m in steering_engine.available_methods if m != "none"]
    runs_vcd = "vcd" in methods  # not on the vllm engine
    ids = [m.id for m in oai.models.list().data]
    builtin = ["none", *combinations(methods)]
    files = ["tita-light", "both", *(["contrast"] if runs_vcd else [])]
    assert ids == ["shapeworld", *(f"shapeworld:{n}" for n in builtin + files)]
    assert "shapeworld:tita+fisao" in ids and ("shapeworld:vcd" in ids) == runs_vcd
    cards = {m.id: m for m in oai.models.list().data}
    assert cards["shapeworld"].model_extra["steering_methods"] == steering_engine.available_methods
    tita = cards["shapeworld:tita"].model_extra
    assert tita["parent"] == "shapeworld" and tita["steering"] == {"method": "tita", "strength": {"tita": 0.9}}
    assert cards["shapeworld:none"].model_extra["steering"] == {"method": "none", "strength": None}
    # a file profile: its strength, its method in application order
    assert cards["shapeworld:both"].model_extra["steering"] == {"method": "tita+fisao",
                                                                "strength": {"tita": 0.5, "fisao": 0.5}}
    assert oai.models.retrieve("shapeworld:tita-light").model_extra["steering"]["strength"] == {"tita": 0.3}
    for unknown in ("shapeworld:nope", "shapeworld:", "other:tita", "shapeworld:fisao+tita"):
        with pytest.raises(openai.NotFoundError):
            oai.models.retrieve(unknown)


def test_a_profile_steers_as_the_same_request_with_steering(oai):
    """Greedy: ``model="shapeworld:tita"`` gives the tokens of ``steering: {"method": "tita"}``, which are not
    the plain model's on this scene; the response echoes the name asked for."""
    by_name = ask(oai, "shapeworld:tita", logprobs=True)
    by_body = ask(oai, "shapeworld", logprobs=True, extra_body={"steering": {"method": "tita"}})
    plain = ask(oai, "shapeworld")
    tokens = [t.token for t in by_name.choices[0].logprobs.content]
    assert tokens == [t.token for t in by_body.choices[0].logprobs.content]
    assert by_name.choices[0].message.content == by_body.choices[0].message.content != plain.choices[0].message.content
    assert by_name.model == "shapeworld:tita" and by_body.model == plain.model == "shapeworld"
    assert by_name.model_extra["steering"]["method"] == "tita"
    assert by_name.model_extra["steering"]["arm"] == "shapeworld:tita"
    assert by_name.model_extra["steering"]["steered_tokens"] > 0
    # a file profile at its strength, and a combination
    light = ask(oai, "shapeworld:tita-light", logprobs=True)
    light_body = ask(oai, "shapeworld", logprobs=True, extra_body={"steering": {"method": "tita", "strength": 0.3}})
    assert [t.token for t in light.choices[0].logprobs.content] == [t.token for t in light_body.choices[0].logprobs.content]
    both = ask(oai, "shapeworld:tita+fisao")
    assert both.choices[0].message.content == ask(oai, "shapeworld", extra_body={"steering": {"method": "tita+fisao"}}).choices[0].message.content
    # streaming: every chunk names the profile
    chunks = list(oai.chat.completions.create(model="shapeworld:tita", messages=BAIT, temperature=0, max_tokens=40, stream=True))
    assert {c.model for c in chunks} == {"shapeworld:tita"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == by_name.choices[0].message.content


def test_the_body_steering_overrides_the_profile(oai):
    r = ask(oai, "shapeworld:tita", max_tokens=3, extra_body={"steering": {"method": "none"}})
    assert r.model_extra["steering"]["method"] == "none" and r.model_extra["steering"]["arm"] == "default"
    assert r.model == "shapeworld:tita"
    # without a method it keeps the profile's, at the body's strength
    r = ask(oai, "shapeworld:tita", max_tokens=3, extra_body={"steering": {"strength": 0.2}})
    assert r.model_extra["steering"]["strength"] == {"tita": 0.2} and r.model_extra["steering"]["arm"] == "shapeworld:tita"
    with pytest.raises(openai.BadRequestError):  # the profile's method, the body's strength: out of range
        ask(oai, "shapeworld:tita", max_tokens=3, extra_body={"steering": {"strength": 3.0}})


def test_unknown_model_is_a_404_and_the_server_stays_healthy(srv, oai):
    for name in ("shapeworld:nope", "gpt-4o", "shapeworld:tita ", "x" * 1_000_000):
        with pytest.raises(openai.NotFoundError) as e:
            ask(oai, name, max_tokens=2)
        assert e.value.body["param"] == "model" and e.value.body["type"] == "not_found_error"
        assert len(e.value.body["message"]) < 1000
    assert httpx.get(srv.url + "/health").status_code == 200


def test_a_strength_for_no_method_is_a_400(oai):
    """A strength with nothing to steer would be dropped in silence: the plain model, or ``MODEL:none``."""
    for model in ("shapeworld", "shapeworld:none"):
        with pytest.raises(openai.BadRequestError) as e:
            ask(oai, model, max_tokens=2, extra_body={"steering": {"strength": 0.5}})
        assert e.value.body["param"] == "steering.strength"
    assert ask(oai, "shapeworld:tita", max_tokens=2, extra_body={"steering": {"strength": 0.5}}).choices


def _success(url: str) -> list[dict]:
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    return [s.labels for s in fams["vlm_steer_request_success"].samples if s.name.endswith("_total")]


def test_metrics_keep_the_served_model_and_name_the_profile(srv, oai):
    ask(oai, "shapeworld:fisao", max_tokens=2)
    ask(oai, "shapeworld:tita-light", max_tokens=2)
    labels = _success(srv.url)
    assert {lab["model"] for lab in labels} == {"shapeworld"}  # per-model alerts stay valid
    pairs = {(lab["method"], lab["arm"]) for lab in labels}
    assert ("fisao", "shapeworld:fisao") in pairs and ("tita", "shapeworld:tita-light") in pairs


def _experiment(tmp_path, locked: bool):
    path = tmp_path / f"exp-{locked}.json"
    path.write_text(json.dumps({"name": "e", "locked": locked,
                                "arms": [{"name": "arm-fisao", "weight": 1, "steering": {"method": "fisao", "strength": 3.0}}]}))
    return path


def test_a_locked_experiment_overrides_body_and_profile(steering_engine, tmp_path):
    with start(steering_engine, experiment=_experiment(tmp_path, True)) as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        for model, body in (("shapeworld:tita", {}), ("shapeworld:tita", {"steering": {"method": "tita"}}),
                            ("shapeworld", {})):
            r = ask(c, model, image_message(0), max_tokens=2, extra_body=body)
            assert r.model_extra["steering"]["method"] == "fisao" and r.model_extra["steering"]["arm"] == "arm-fisao"
            assert r.model_extra["steering"]["strength"] == {"fisao": 3.0} and r.model == model


def test_a_profile_overrides_an_unlocked_experiment(steering_engine, tmp_path):
    with start(steering_engine, experiment=_experiment(tmp_path, False)) as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        cases = {("shapeworld", None): ("fisao", "arm-fisao"),  # no profile, no steering: the arm
                 ("shapeworld:tita", None): ("tita", "shapeworld:tita"),  # the profile
                 ("shapeworld:none", None): ("none", "shapeworld:none"),  # explicitly unsteered
                 ("shapeworld:tita", "none"): ("none", "explicit")}  # the body before the profile
        for (model, method), want in cases.items():
            body = {"steering": {"method": method}} if method else {}
            raw = c.chat.completions.with_raw_response.create(model=model, messages=image_message(0), max_tokens=2,
                                                              temperature=0, extra_body=body)
            r = raw.parse()
            got = (r.model_extra["steering"]["method"], r.model_extra["steering"]["arm"])
            assert got == want, (model, method)
            assert raw.headers["x-steering-arm"] == want[1]


def test_profiles_file_is_checked_at_start(tmp_path):
    cases = {"unknown method": {"profiles": {"x": {"method": "titaa"}}},
             "strength out of range": {"profiles": {"x": {"method": "tita", "strength": 2.0}}},
             "a built-in name": {"profiles": {"tita+fisao": {"method": "tita"}}},
             "a bad name": {"profiles": {"a b": {"method": "tita"}}},
             "an unknown field": {"profiles": {"x": {"method": "tita", "strenght": 0.5}}},
             "a method twice": {"profiles": {"x": {"method": "tita+tita"}}}}
    for why, data in cases.items():
        with pytest.raises(ValidationError):
            ProfilesFile.model_validate(data)
        path = tmp_path / "p.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValidationError):
            start_state(path)
    assert ProfilesFile.model_validate({"profiles": {"ok": {"method": "none"}}}).profiles["ok"].method == "none"


def start_state(path):
    from server.settings import Settings
    from server.state import State

    return State(Settings(profiles=path))


def test_profiles_of_methods_the_models_cannot_run_are_left_out(engine):
    """The target alone (no reward model, no verifier): none and vcd, and a file profile needing TITA is
    left out with the reason the log prints."""
    file = ProfilesFile.model_validate({"profiles": {"light": {"method": "tita", "strength": 0.3},
                                                     "soft-vcd": {"method": "vcd", "strength": 0.5}}})
    p = Profiles("vlm", engine, file)
    assert p.models == ["vlm", "vlm:none", "vlm:vcd", "vlm:soft-vcd"]
    assert set(p.unavailable) == {"light"} and "reward" in p.unavailable["light"]
    assert p.get("vlm") is None and p.get("vlm:soft-vcd").strengths == {"vcd": 0.5}
