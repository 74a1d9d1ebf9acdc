"""vLLM's request fields through the live server, on either engine (issue 31, item 3): top_k, min_p,
repetition_penalty, min_tokens and stop_token_ids honoured (greedy output equal to transformers'
``generate`` with the same settings), their ranges refused with a 400; the checkpoint's
generation_config.json sampling defaults applied as vLLM's ``--generation-config auto`` does, and not with
``vllm``; every top-level field the server does not implement a 400 naming it, the fields that ask for
nothing accepted."""

import json
import logging

import httpx
import pytest

from decoding.prompts import render_prompt
from decoding.request import GenerationRequest
from server.protocol import ASK_NOTHING, NOT_SERVED
from shapeworld.models import MODELS_DIR
from shapeworld.text import CAPTION_PROMPT
from tests.server.conftest import LiveServer, free_port, start
from tests.server.test_chat import SCENES, create, image_message
from tests.server.test_protocol import assert_error, body, post

MAX = 30


def reference(engine, i: int, max_tokens: int = MAX, **generate_kw) -> tuple[str, int]:
    """transformers' greedy ``generate`` on scene ``i``'s caption request, cut at the first end token (the
    EOS, or any ``eos_token_id`` given): (its text, its token count)."""
    req = GenerationRequest.single_turn(CAPTION_PROMPT, [SCENES[i].image()])
    out = engine.processor(images=req.images, text=render_prompt(engine.processor, req.messages), return_tensors="pt")
    g = engine.model.generate(**out, max_new_tokens=max_tokens, do_sample=False, **generate_kw)[0, out["input_ids"].shape[1]:]
    ends = set(engine.eos_ids) | set(generate_kw.get("eos_token_id", ()))
    ids = g.tolist()
    ids = next((ids[:k] for k, t in enumerate(ids) if t in ends), ids)
    return engine.tokenizer.decode(ids, skip_special_tokens=True), len(ids)


def token_id(engine, word: str) -> int:
    """The id of a word that is one token of the embedded vocabulary ("and" is "▁and")."""
    (tid,) = engine.tokenizer(word, add_special_tokens=False).input_ids
    return tid


# ------------------------------------------------------------------ the fields, honoured


@pytest.mark.parametrize("fields,generate_kw", [
    ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
    ({"min_tokens": 20}, {"min_new_tokens": 20}),
    ({"repetition_penalty": 0.8, "min_tokens": 12}, {"repetition_penalty": 0.8, "min_new_tokens": 12}),
])
def test_greedy_equals_generate_with_the_same_settings(client, engine, fields, generate_kw):
    changed = 0
    for i in range(4):
        r = create(client, i, max_tokens=MAX, extra_body=fields)
        text, n = reference(engine, i, **generate_kw)
        assert (r.choices[0].message.content, r.usage.completion_tokens) == (text, n)
        changed += text != create(client, i, max_tokens=MAX).choices[0].message.content
    assert changed >= 1  # the setting changed some caption: the comparison can fail


def test_stop_token_ids_end_the_answer_with_stop(client, engine):
    full = create(client, 0).choices[0].message.content
    assert full.startswith("a red circle and ")
    stop = token_id(engine, "and")
    r = create(client, 0, extra_body={"stop_token_ids": [stop]})
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == ("a red circle", "stop", 3)
    # min_tokens masks the stop token until four tokens are out: transformers' generate with it as an end token
    r = create(client, 0, max_tokens=MAX, extra_body={"stop_token_ids": [stop], "min_tokens": 4})
    text, n = reference(engine, 0, min_new_tokens=4, eos_token_id=[*engine.eos_ids, stop])
    assert (r.choices[0].message.content, r.usage.completion_tokens) == (text, n) and n >= 4
    assert r.choices[0].finish_reason == ("stop" if n < MAX else "length")


def test_stop_token_ids_in_a_stream(client, engine):
    stop = token_id(engine, "and")
    chunks = list(create(client, 0, stream=True, extra_body={"stop_token_ids": [stop]}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a red circle"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_one_and_min_p_one_sample_the_greedy_answer(client, cut):
    seeds = (3, 5, 7, 11)
    greedy = [create(client, i).choices[0].message.content for i in range(4)]
    hot = [create(client, i, temperature=1.5, seed=s, extra_body=cut).choices[0].message.content for i, s in zip(range(4), seeds)]
    free = [create(client, i, temperature=1.5, seed=s).choices[0].message.content for i, s in zip(range(4), seeds)]
    assert hot == greedy and free != greedy


@pytest.mark.parametrize("off", [-1, 0, 64, 2**63 - 1])  # the embedded vocabulary has 64 tokens
def test_top_k_minus_one_zero_and_past_the_vocabulary_cut_nothing(client, off):
    free = create(client, 2, temperature=1.0, seed=9).choices[0].message.content
    assert create(client, 2, temperature=1.0, seed=9, extra_body={"top_k": off}).choices[0].message.content == free


@pytest.mark.parametrize("fields,param,match", [
    ({"top_k": -2}, "top_k", "greater than or equal to -1"), ({"top_k": 1.5}, "top_k", "integer"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"), ({"min_p": -0.1}, "min_p", "greater than or equal to 0"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"repetition_penalty": -1.2}, "repetition_penalty", "greater than 0"),
    ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
    ({"min_tokens": 41}, "min_tokens", "at most max_tokens (40)"),
    ({"stop_token_ids": [99999]}, "stop_token_ids", "outside the vocabulary"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "outside the vocabulary"),
    ({"stop_token_ids": ["and"]}, "stop_token_ids.0", "integer"), ({"stop_token_ids": 3}, "stop_token_ids", "list"),
])
def test_out_of_range_values_name_the_field(live, fields, param, match):
    assert_error(post(live, body(0, **fields)), 400, param, match)
    assert post(live, body(0, max_tokens=2)).status_code == 200


# ------------------------------------------------------------------ fields the server does not implement

# A value that asks for something, for every field of ``NOT_SERVED`` (a field added there needs one here).
ASKING = {
    "structural_tag": '{"type": "structural_tag"}',
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
    "functions": [{"name": "f"}], "function_call": "auto", "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"}, "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low",
    "best_of": 2, "use_beam_search": True, "length_penalty": 0.5, "echo": True, "watermarking": True,
    "include_stop_str_in_output": True, "skip_special_tokens": False, "spaces_between_special_tokens": False,
    "truncate_prompt_tokens": 10, "truncation_side": "left", "prompt_logprobs": 0, "logprob_token_ids": [5],
    "allowed_token_ids": [5, 6], "bad_words": ["red"], "add_generation_prompt": False, "continue_final_message": True,
    "add_special_tokens": True, "documents": [{"title": "t", "text": "x"}], "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": True}, "media_io_kwargs": {"image": {"x": 1}},
    "mm_processor_kwargs": {"do_resize": False}, "priority": 1, "request_id": "mine", "cache_salt": "salt",
    "kv_transfer_params": {"do_remote_prefill": True}, "ec_transfer_params": {}, "vllm_xargs": {"k": 1},
    "return_tokens_as_token_ids": True, "return_token_ids": True, "return_token_offsets": True, "return_prompt_text": True,
    "thinking_token_budget": 10, "include_reasoning": False, "repetition_detection": {"max_pattern_size": 4},
    "stream_interval": 4, "logits_processors": ["mod:Cls"],
}


def test_every_field_not_served_has_a_value_that_asks_for_something():
    assert set(ASKING) == set(NOT_SERVED)


@pytest.mark.parametrize("name", sorted(NOT_SERVED))
def test_a_field_not_served_is_a_400_naming_it(live, name):
    assert_error(post(live, body(0, **{name: ASKING[name]})), 400, name, f"{name} is not supported by this server")


def test_fields_at_the_values_that_ask_for_nothing_are_served(client):
    """Clients that always send a field at its default (``tool_choice: "none"``, ``best_of: 1``, ...) are
    answered, and the answer is the one without them."""
    plain = create(client, 1).choices[0].message.content
    no_ops = {name: values[-1] for name, values in NOT_SERVED.items()}  # the last: a value that is not null
    assert all(v is not None for n, v in no_ops.items() if len(NOT_SERVED[n]) > 1)
    assert create(client, 1, extra_body=no_ops).choices[0].message.content == plain


@pytest.mark.parametrize("name,value", [("foo", 1), ("extra_body", {"top_k": 5}), ("Temperature", 0.5),
                                        ("steer", {"method": "tita"}), ("guided_jsn", {}), ("nothing", None)])
def test_an_unknown_field_is_a_400_naming_it(live, name, value):
    """OpenAI refuses names it does not know ("Unrecognized request argument supplied"); here too, so that a
    misspelt or unsupported request (``steer`` for ``steering``) is never answered as if it were not there."""
    assert_error(post(live, body(0, **{name: value})), 400, name, "unrecognized request argument")


def test_fields_that_ask_for_nothing_are_accepted(client):
    plain = create(client, 1).choices[0].message.content
    harmless = {"user": "u-1", "metadata": {"k": "v"}, "store": True, "service_tier": "auto", "parallel_tool_calls": False,
                "prompt_cache_key": "k", "prompt_cache_retention": "24h", "safety_identifier": "s",
                "prediction": {"type": "content", "content": "a red"}, "session_id": "s-1", "mm_payload": "none",
                "return_mm_kwargs": False, "routed_experts_prompt_start": 3}
    assert set(harmless) >= ASK_NOTHING
    assert create(client, 1, extra_body=harmless).choices[0].message.content == plain


# ------------------------------------------------------------------ generation_config.json defaults


def checkpoint_with(tmp_path, **sampling):
    """The embedded model's folder (its files linked) with ``sampling`` added to its generation config."""
    folder = tmp_path / "vlm"
    folder.mkdir()
    for f in (MODELS_DIR / "vlm").iterdir():
        if f.name != "generation_config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((MODELS_DIR / "vlm" / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **sampling}))
    return folder


def test_the_checkpoints_sampling_defaults_apply_as_vllm_auto(steering_engine, engine, tmp_path, caplog):
    """A checkpoint whose generation_config.json sets repetition_penalty 1.5 and top_k 1 (as Qwen2.5-VL
    ships 1.05 and 1): with ``auto`` a request that sets neither samples the greedy caption of transformers'
    generate with that penalty, and the start-up log names both; a request's own values win; with ``vllm``
    the same request is answered as without them."""
    folder = checkpoint_with(tmp_path, repetition_penalty=1.5, top_k=1)
    want = [reference(engine, i, repetition_penalty=1.5)[0] for i in range(4)]
    plain = [reference(engine, i)[0] for i in range(4)]
    assert want != plain
    caplog.set_level(logging.INFO, logger="vlm_steer.server")
    hot = dict(max_tokens=MAX, temperature=1.5)
    with start(steering_engine, model=folder) as srv:
        assert "sampling defaults from" in caplog.text and "repetition_penalty=1.5, top_k=1" in caplog.text
        got = [_text(srv, i, seed=i, **hot) for i in range(4)]
        assert got == want
        own = [_text(srv, i, max_tokens=MAX, temperature=0, repetition_penalty=1.0) for i in range(4)]
        assert own == plain
    with start(steering_engine, model=folder, generation_config="vllm") as srv:
        assert [_text(srv, i, max_tokens=MAX, temperature=0) for i in range(4)] == plain
        assert [_text(srv, i, seed=i, **hot) for i in range(4)] != want  # no top_k 1: it samples
    assert "none from the checkpoint (--generation-config vllm)" in caplog.text


def _text(srv, i, **fields) -> str:
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "shapeworld", "messages": image_message(i), **fields},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_defaults_of_a_tiny_family_checkpoint(tmp_path):
    """A random-weight LLaVA checkpoint (tests/families.py) whose generation_config.json sets
    repetition_penalty, top_k and max_new_tokens, served on the transformers engine: greedy answers are
    transformers' generate with that penalty, and max_new_tokens is the default max_tokens."""
    from decoding.transformers_engine import TransformersEngine
    from server.generation_defaults import load_generation_defaults
    from server.settings import Settings
    from tests.families import build

    folder = build("llava", tmp_path / "llava")
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.3, "top_k": 1,
                                                               "max_new_tokens": 7}))
    assert load_generation_defaults("auto", folder, 256).values == {"repetition_penalty": 1.3, "top_k": 1, "max_tokens": 7}
    assert load_generation_defaults("auto", folder, 5).values["max_tokens"] == 5  # within --max-tokens-limit
    assert load_generation_defaults("vllm", folder, 256).values == {}
    assert load_generation_defaults(str(folder), MODELS_DIR / "vlm", 256).values["top_k"] == 1  # a folder of its own
    e = TransformersEngine(folder)
    messages = [{"role": "user", "content": "describe the image ."}]
    out = e.processor(text=render_prompt(e.processor, messages), return_tensors="pt")
    ids = e.model.generate(**out, max_new_tokens=7, do_sample=False, repetition_penalty=1.3)[0, out["input_ids"].shape[1]:].tolist()
    # (generate itself reads the folder's generation config: the plain answer needs an explicit 1.0)
    plain = e.model.generate(**out, max_new_tokens=7, do_sample=False, repetition_penalty=1.0)[0, out["input_ids"].shape[1]:].tolist()
    assert ids != plain and not set(ids) & e.eos_ids
    with LiveServer(Settings(port=free_port(), served_model_name="tiny", model=folder, engine_process=False), engine=e) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": messages, "temperature": 1.0, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 7
        assert r.json()["choices"][0]["message"]["content"] == e.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("bad,match", [({"temperature": 3.0}, "temperature=3.0"), ({"top_k": 2.5}, "top_k=2.5"),
                                       ({"repetition_penalty": 0.0}, "repetition_penalty=0.0")])
def test_a_default_the_schema_refuses_stops_the_server_before_loading(tmp_path, bad, match):
    from server.generation_defaults import load_generation_defaults

    folder = checkpoint_with(tmp_path, **bad)
    with pytest.raises(ValueError, match=match) as e:
        load_generation_defaults("auto", folder, 256)
    assert "--generation-config vllm" in str(e.value) and str(folder) in str(e.value)
