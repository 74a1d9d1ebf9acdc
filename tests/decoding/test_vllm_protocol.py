"""The server/worker contract of the vllm engine, which needs no vLLM: argument validation and the shared
counter file (two mappings of one file see each other's writes, as the server and vLLM's worker do), and
the engine's refusal of vLLM's Model Runner V2 (its processor implements the V1 interface)."""

import pytest

from decoding.vllm.protocol import Counters, validate


@pytest.mark.parametrize("args,match", [
    ({"methods": {"tita": 0.5}, "images": [b"x"]}, "slot"),
    ({"slot": -1}, "slot"),
    ({"slot": 1}, "methods"),
    ({"slot": 1, "methods": {"telepathy": 1}}, "unknown steering method"),
    ({"slot": 1, "methods": {"fisao": "strong"}}, "strength"),
    ({"slot": 1, "methods": {"fisao": -1}}, "strength"),
    ({"slot": 1, "methods": {"fisao": True}}, "strength"),
    ({"slot": 1, "methods": {"fisao": 1}, "images": ["not bytes"]}, "images"),
    ({"slot": 1, "methods": {"fisao": 1}, "verifier_scores": [0.1, float("nan")]}, "verifier_scores"),
    ({"slot": 1, "methods": {"fisao": 1}, "verifier_scores": "high"}, "verifier_scores"),
    ({"slot": 1, "methods": {"fisao": 1}, "messages": "hi"}, "messages"),
])
def test_malformed_steering_arguments_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        validate(args)


def test_well_formed_arguments_pass():
    validate({"slot": 3, "eos": 2, "methods": {"tita": 0.6, "fisao": 6}, "images": [b"png"],
              "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]})


def test_counters_are_shared_between_mappings(tmp_path):
    path = str(tmp_path / "counters")
    server, worker = Counters(path), Counters(path)
    worker.steered[7] += 3
    worker.failed[7] = 1
    worker.t[0] += 1
    assert float(server.steered[7]) == 3.0 and float(server.failed[7]) == 1.0 and float(server.t[0]) == 1.0
    server.reset(7)
    assert float(worker.steered[7]) == float(worker.failed[7]) == 0.0


def test_model_runner_v2_is_refused_with_the_fix(monkeypatch):
    from decoding.vllm.engine import VLLMEngine

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        VLLMEngine("models/shapeworld/vlm")


@pytest.mark.parametrize("family", ["embedded", "qwen2_5_vl", "gemma3"])
def test_the_first_text_piece_begins_as_the_whole_completion_decodes(family, tmp_path):
    """vLLM decodes a completion's first token after the prompt, so its first piece keeps the token's leading
    space; ``tokenizer.decode`` of the whole completion (the transformers engine's text) drops it for
    SentencePiece tokenizers (the embedded Llama one, Gemma's) and keeps it for byte-level ones (Qwen's):
    ``first_piece`` gives the latter's beginning for each."""
    from transformers import AutoTokenizer

    from decoding.vllm.engine import drops_first_space, first_piece
    from shapeworld.models import MODELS_DIR
    from tests.families import build

    path = MODELS_DIR / "vlm" if family == "embedded" else build(family, tmp_path / family)
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.encode("is there a red circle ?", add_special_tokens=False)
    completion = tok.encode(" a blue square", add_special_tokens=False)
    in_context = tok.decode(prompt + completion)[len(tok.decode(prompt)):]  # as vLLM's detokenizer gives it
    assert in_context.startswith(" ")
    assert first_piece(in_context, drops_first_space(tok)) == tok.decode(completion, skip_special_tokens=True)
    assert drops_first_space(tok) == (family in ("embedded", "gemma3"))
