"""The forked reward model (``decoding.fork``): served inside the target's engine on its own hidden states,
it steers exactly as the same weights do as a whole separate reward model, on every family; the lazy
gate's catch-up gives the reward model the whole prefix; a fork of the untouched target changes nothing;
a fork is refused beside any other target; and `vlm-steer train reward --fork-layers` trains and serves one
on each family's tiny checkpoint."""

import json

import pytest
import torch

from decoding.fork import is_fork, materialise, trunk_fingerprint
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from decoding.transformers_engine import TransformersEngine
from reward_models.data import DataSet
from server.cli import main
from shapeworld.models import MODELS_DIR
from shapeworld.world import make_scene
from tests.families import FAMILIES, build, build_fork, build_set


def _requests(images, method="tita", n=24, strength=None):
    return [GenerationRequest.single_turn("describe the image .", [im], sampling=SamplingParams(max_tokens=n),
                                          steering=SteeringSpec(method, strength)) for im in images]


def _separate(path, fork, tmp_path, **kw):
    """The same reward model as a whole checkpoint (the target with the fork's layers in place)."""
    from reward_models.checkpoints import save_checkpoint

    engine = TransformersEngine(path)
    whole = materialise(engine.model, fork)
    save_checkpoint(whole, engine.processor, tmp_path / "whole")
    return TransformersEngine(path, reward_path=tmp_path / "whole", **kw)


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(split, i, 4321).image() for i in range(3) for split in ("bait", "random")]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fork_steers_as_the_same_weights_as_a_separate_model(family, tmp_path, scenes):
    """Greedy TITA, in one batch of rows of different prompt lengths: the fork (k=1, on the target's hidden
    states, its own KV cache) gives the same tokens and steered-step counts as the materialised whole model
    run as a separate reward model; with the gate, the same again (its catch-up feeds the skipped tokens);
    with TITA over the target's top 5 tokens (the fork's head over those rows only), the same again."""
    path = build(family, tmp_path / family)
    fork = build_fork(path, tmp_path / "fork", layers=1, noise=0.2)
    assert is_fork(fork) and not is_fork(path)
    reqs = _requests(scenes[:4], n=12)
    reqs[1] = GenerationRequest.single_turn("what is there ? describe it .", [scenes[1]], sampling=SamplingParams(max_tokens=12),
                                            steering=SteeringSpec("tita"))
    # a gate at the median top-1 probability of the plain model's steps: some steps consulted, some skipped
    plain = TransformersEngine(path).generate([GenerationRequest(r.messages, r.images, SamplingParams(max_tokens=12, top_logprobs=0))
                                               for r in reqs])
    median = float(torch.tensor([lp.logprob for c in plain for lp in c.logprobs]).exp().median())
    for gate, k in ((1.0, 0), (median, 0), (1.0, 5)):  # k: the fork's head over the target's top 5 only
        forked = TransformersEngine(path, reward_path=fork, tita_gate=gate, tita_candidates=k)
        whole = _separate(path, fork, tmp_path, tita_gate=gate, tita_candidates=k)
        a, b = forked.generate(reqs), whole.generate(reqs)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        assert [c.steered_tokens for c in a] == [c.steered_tokens for c in b]
        asked, skipped = forked.pop_consultations()["tita"]
        assert asked + skipped == sum(len(c.token_ids) + (c.finish_reason == "stop") for c in a)
        assert asked > 0 and (skipped > 0) == (gate < 1.0)
        assert (skipped == 0) == (gate == 1.0)


def test_fork_logits_equal_the_whole_models_step_by_step(tmp_path, scenes):
    """On the embedded model, the fork's log-probs at each step (consulted every step and after a catch-up
    of several tokens) equal the materialised model's own forward over the whole prefix."""
    fork = build_fork(MODELS_DIR / "vlm", tmp_path / "fork", layers=2, noise=0.1)
    engine = TransformersEngine(MODELS_DIR / "vlm", reward_path=fork)
    whole = materialise(TransformersEngine(MODELS_DIR / "vlm").model, fork)
    row = engine.encode(_requests(scenes[:1])[0])
    batch = engine.prefill([row])
    state = batch.states["tita"]
    tokens = []
    for step in range(6):
        tok = batch.logits.argmax(-1)
        tokens.append(int(tok))
        engine.decode_one_token(batch, tok)
        state = batch.states["tita"]
        if step in (0, 4, 5):  # consult after 1, then 4 waiting tokens, then 1
            engine.fork.catch_up(state)
            got = engine.fork.logits(state).log_softmax(-1)
            ids = torch.tensor([row.prompt_ids + tokens])
            ref = whole(input_ids=ids, pixel_values=row.pixel_values).logits[:, -1].float().log_softmax(-1)
            assert torch.allclose(got, ref, atol=1e-4)


def test_a_fork_of_the_untouched_target_changes_nothing(tmp_path, scenes):
    fork = build_fork(MODELS_DIR / "vlm", tmp_path / "fork", layers=1, noise=0.0)
    engine = TransformersEngine(MODELS_DIR / "vlm", reward_path=fork)
    steered = engine.generate(_requests(scenes, strength=1.0))
    plain = engine.generate(_requests(scenes, method="none"))
    assert [c.token_ids for c in steered] == [c.token_ids for c in plain]
    assert sum(c.steered_tokens for c in steered) == 0


def test_a_fork_is_refused_beside_another_target(tmp_path):
    a = build("llava", tmp_path / "a", seed=0)
    b = build("llava", tmp_path / "b", seed=5)
    fork = build_fork(a, tmp_path / "fork", layers=1)
    with pytest.raises(ValueError, match="another target's weights"):
        TransformersEngine(b, reward_path=fork)
    with pytest.raises(ValueError, match="runs inside its target's engine"):
        TransformersEngine(fork)
    other = build("qwen2_5_vl", tmp_path / "q")
    with pytest.raises(ValueError, match="vocabulary|was built for a llava target"):  # another family, another tokenizer
        TransformersEngine(other, reward_path=fork)
    # the fingerprint reads the weights, not their dtype: the same checkpoint in bfloat16 is the same target
    m32 = TransformersEngine(a).model
    m16 = TransformersEngine(a, dtype="bfloat16").model
    assert trunk_fingerprint(m32, 1) == trunk_fingerprint(m16, 1)


def test_the_vllm_engines_file_check_is_the_same_fingerprint(tmp_path):
    """The vllm engine checks a fork from the target's files before vLLM loads anything
    (``decoding.vllm.fork_spec``): the same fingerprint as the loaded model's, for checkpoints in
    transformers' current key layout (the tiny LLaVA) and the older one vLLM reads (the embedded model);
    another target is refused (also for a fork that runs in the worker)."""
    from decoding.vllm.fork_spec import check_fork_files, file_fingerprint, in_model_overrides, reward_placement

    a = build("llava", tmp_path / "a", seed=0)
    fork = build_fork(a, tmp_path / "fork", layers=1)
    info = json.loads((fork / "fork.json").read_text())
    assert file_fingerprint(a, info) == info["trunk_sha256"]
    embedded = json.loads((MODELS_DIR / "reward" / "fork.json").read_text())
    assert file_fingerprint(MODELS_DIR / "vlm", embedded) == embedded["trunk_sha256"]
    check_fork_files(a, fork)
    with pytest.raises(ValueError, match="another target's weights"):
        check_fork_files(build("llava", tmp_path / "b", seed=5), fork)
    assert in_model_overrides(a, fork)["hf_overrides"]["vlm_steer_fork"]["first_layer"] == info["first_layer"]
    g = build("gemma3", tmp_path / "g")
    gfork = build_fork(g, tmp_path / "gfork", layers=1)
    quantized = reward_placement(g, gfork, {"quantization": "fp8"})  # a whole model in the worker: checked all the same
    assert quantized[0] is None and "quantized" in quantized[1]
    check_fork_files(g, gfork)
    with pytest.raises(ValueError, match="another target's weights"):
        check_fork_files(build("gemma3", tmp_path / "g5", seed=5), gfork)
    with pytest.raises(ValueError, match="was built for a llava target"):
        check_fork_files(build("llava_next", tmp_path / "next"), fork)
    for family in FAMILIES:  # each family's checkpoint layout maps to its state-dict names
        path = build(family, tmp_path / f"own-{family}")
        own = build_fork(path, tmp_path / f"own-{family}-fork", layers=1)
        assert file_fingerprint(path, json.loads((own / "fork.json").read_text())) == json.loads((own / "fork.json").read_text())["trunk_sha256"], family
    assert in_model_overrides(a, None) is None  # no reward model


def test_a_separate_reward_model_goes_inside_vllms_model_when_it_shares_the_processor(tmp_path):
    """``decoding.vllm.paired_model`` takes a reward model of the target's family that turns requests into the
    target's prompt ids and pixels (each of the four families); one with its own image processing, or of
    another family, runs in the worker."""
    import shutil

    from decoding.vllm.fork_spec import PAIR_ARCH, in_model_overrides, reward_placement

    a = build("llava", tmp_path / "a")
    rm = build("llava", tmp_path / "rm", size="tiny_rm", seed=1)
    got = in_model_overrides(a, rm)
    assert got["hf_overrides"]["architectures"] == [PAIR_ARCH]
    assert got["hf_overrides"]["vlm_steer_reward"]["path"] == str(rm.resolve())
    assert got["model_class_overrides"] == {PAIR_ARCH: "decoding.vllm.paired_model:PairedLlava"}
    other = shutil.copytree(rm, tmp_path / "rm-own-processor")
    cfg = json.loads((other / "processor_config.json").read_text())
    cfg["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]  # other pixels for the same image
    (other / "processor_config.json").write_text(json.dumps(cfg))
    assert in_model_overrides(a, other) is None
    assert "its processor, image size, patch size or vision feature settings differ" in reward_placement(a, other)[1]
    assert reward_placement(a, rm)[1].startswith("inside vLLM's model: a separate llava reward model")
    online = reward_placement(a, rm, {"quantization": "fp8"})
    assert online[0] is None and "quantized" in online[1]
    quantized = shutil.copytree(a, tmp_path / "a-awq")
    cfg = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq", "bits": 4}}))
    assert in_model_overrides(quantized, rm) is None
    pairs = {}
    for family, cls in (("llava_next", "PairedLlavaNext"), ("qwen2_5_vl", "PairedQwen2_5_VL"), ("gemma3", "PairedGemma3")):
        pairs[family] = build(family, tmp_path / family), build(family, tmp_path / f"{family}-rm", size="tiny_rm", seed=1)
        got = in_model_overrides(*pairs[family])
        arch = got["hf_overrides"]["architectures"][0]
        assert got["model_class_overrides"] == {arch: f"decoding.vllm.paired_model:{cls}"}, family
    placed = reward_placement(pairs["qwen2_5_vl"][0], pairs["gemma3"][1])  # another family's reward model
    assert placed[0] is None and "of the target's family ('qwen2_5_vl')" in placed[1]
    qwen_rm = shutil.copytree(pairs["qwen2_5_vl"][1], tmp_path / "qwen-rm-merge")
    cfg = json.loads((qwen_rm / "config.json").read_text())
    cfg["vision_config"]["spatial_merge_size"] = 1  # four times the image tokens of the target's
    (qwen_rm / "config.json").write_text(json.dumps(cfg))
    assert in_model_overrides(pairs["qwen2_5_vl"][0], qwen_rm) is None
    nxt = pairs["llava_next"][0]
    # a fork goes inside vLLM's LLaVA-NeXT (the same Llama decoder), Qwen2.5-VL and Gemma 3 models
    for family, arch in (("llava_next", "ForkedLlavaNext"), ("qwen2_5_vl", "ForkedQwen2_5_VL"), ("gemma3", "ForkedGemma3")):
        got = in_model_overrides(pairs[family][0], build_fork(pairs[family][0], tmp_path / f"{family}-fork", layers=1))
        assert got["hf_overrides"]["architectures"] == [f"VlmSteer{arch}"]
        assert got["model_class_overrides"] == {f"VlmSteer{arch}": f"decoding.vllm.fork_model:{arch}"}
    # a LLaVA whose language model is not a Llama (vLLM's fork layers are Llama's there) runs it in the worker
    other = shutil.copytree(a, tmp_path / "llava-qwen2")
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["model_type"] = "qwen2"
    (other / "config.json").write_text(json.dumps(cfg))
    placed = reward_placement(other, build_fork(a, tmp_path / "a-fork", layers=1))
    assert placed[0] is None and "hold a fork" in placed[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_train_a_fork_on_each_family_and_steer_with_it(family, tmp_path, shapes):
    """`vlm-steer train reward --fork-layers 1`: only the fork trains (the trunk is checked at save), the
    folder holds the fork and no whole model, training.json no absolute path, and it steers."""
    paths = build_set(family, tmp_path / family, verifier="siglip" if family == "gemma3" else "clip")
    (paths["verifier"] / "calibration.json").unlink()
    main(["train", "calibrate", "--verifier", str(paths["verifier"]), "--data", str(shapes)])
    out = tmp_path / "rm"
    main(["train", "reward", "--target", str(paths["model"]), "--data", str(shapes), "--verifier", str(paths["verifier"]),
          "--out", str(out), "--fork-layers", "1", "--images", "6", "--steps", "3", "--samples", "2",
          "--questions", "2", "--anchor", "0.5"])
    meta = json.loads((out / "training.json").read_text())
    assert meta["recipe"]["fork_layers"] == 1 and "distill" not in meta["seconds"]
    assert not any(isinstance(v, str) and v.startswith("/") for v in meta.values())
    assert is_fork(out) and not (out / "model.safetensors").exists()
    fork_meta = json.loads((out / "fork.json").read_text())
    n = TransformersEngine(paths["model"]).config.get_text_config().num_hidden_layers
    assert fork_meta["layers"] == 1 and fork_meta["first_layer"] == n - 1
    engine = TransformersEngine(paths["model"], reward_path=out)
    data = DataSet.load(shapes)
    a, b = engine.generate(_requests([data.image(data.image_ids[0])] * 2, n=6))
    assert a.token_ids == b.token_ids and len(a.token_ids) >= 1


def test_skipped_steps_explain_as_unsteered(tmp_path, scenes):
    """A step the gate leaves to the target reports no TITA contribution (the method still returns log-probs),
    and the rows are consulted at none of them."""
    fork = build_fork(MODELS_DIR / "vlm", tmp_path / "fork", layers=1, noise=0.2)
    engine = TransformersEngine(MODELS_DIR / "vlm", reward_path=fork, tita_gate=1e-6)
    reqs = [GenerationRequest.single_turn("describe the image .", [im], sampling=SamplingParams(max_tokens=8),
                                          steering=SteeringSpec("tita", explain=True)) for im in scenes[:2]]
    for c in engine.generate(reqs):
        assert c.explain and all(abs(e.contributions["tita"]) < 1e-5 and e.logprob == pytest.approx(e.base_logprob, abs=1e-5)
                                 for e in c.explain)
    asked, skipped = engine.pop_consultations()["tita"]
    assert asked == 0 and skipped > 0


def test_clear_errors_before_any_work(tmp_path, capsys):
    from reward_models.train_reward import build_init

    with pytest.raises(ValueError, match="no such folder"):
        TransformersEngine(tmp_path / "missing")
    with pytest.raises(ValueError, match="no such folder"):
        TransformersEngine(MODELS_DIR / "vlm", reward_path=tmp_path / "missing")
    target = TransformersEngine(MODELS_DIR / "vlm").model
    with pytest.raises(ValueError, match="exclude each other"):
        build_init(target, None, 2, fork=1)
    train = ["train", "reward", "--target", str(MODELS_DIR / "vlm"), "--data", str(tmp_path), "--out", str(tmp_path / "rm")]
    with pytest.raises(SystemExit, match="the target has 4 decoder layers"):
        main([*train, "--fork-layers", "9"])
    with pytest.raises(SystemExit, match="exclude each other"):
        main([*train, "--fork-layers", "1", "--init-layers", "2"])
    with pytest.raises(SystemExit, match="invalid settings: tita_gate"):
        main(["serve", "--tita-gate", "2"])
    with pytest.raises(SystemExit):
        main(["bench", "speed", "--tita-gate", "abc"])
    assert "invalid probability value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "speed", "--tita-gate", "0"])
    assert "is not in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "abc", "2.5", "1"])
def test_bad_candidate_counts_are_one_line_errors(value, capsys):
    """--tita-candidates: 0 or an integer >= 2 (one candidate makes TITA a no-op), on serve (a setting)
    and on the benchmarks (a flag)."""
    with pytest.raises(SystemExit, match="invalid settings: tita_candidates"):
        main(["serve", "--tita-candidates", value])
    with pytest.raises(SystemExit):
        main(["bench", "speed", "--tita-candidates", value])
    assert "is not 0 or an integer >= 2" in capsys.readouterr().err
