"""`vlm-steer bench speed`'s report: a plain-target baseline timed alone before and after the steering engine,
and TITA's FLOPs limit of a fork with its head over the target's top candidates (counts, not timings: speed is a
benchmark)."""

from decoding.transformers_engine import TransformersEngine
from bench.speed import format_speed, plain_speed, run_speed, tita_limit, with_plain
from shapeworld.commands import images
from shapeworld.models import MODELS_DIR


def test_plain_baseline_and_the_candidate_heads_limit():
    steered = TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", tita_candidates=8)
    plain = TransformersEngine(MODELS_DIR / "vlm")
    pics, prompt = images(4, 4321)
    runs = [plain_speed(plain, pics, prompt, batch=2, max_tokens=6, ignore_eos=True) for _ in range(2)]
    assert [t for t, _ in runs] == [24, 24]
    rep = with_plain(run_speed(steered, ["none", "tita"], pics, prompt, batch=2, max_tokens=6, ignore_eos=True), runs)
    assert rep["plain_tokens_per_second"] == 48 / sum(s for _, s in runs)
    assert {m: r["tokens"] for m, r in rep["methods"].items()} == {"none": 24, "tita": 24}
    assert all(r["ratio_to_plain"] > 0 for r in rep["methods"].values())
    lim = tita_limit(MODELS_DIR / "vlm", steered)
    assert "head over 8 rows" in lim["design"]  # 8 of the 64 rows of the embedded head
    full = tita_limit(MODELS_DIR / "vlm", TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward"))
    d = 128  # the head's width: 56 rows fewer at 2 FLOPs per multiply-add
    assert full["reward_flops_per_token"] - lim["reward_flops_per_token"] == 2 * 56 * d
    rep["tita_limit"] = lim
    text = format_speed(rep)
    assert "plain target alone (no reward model or verifier loaded; runs before / after:" in text and "x plain target; measured" in text
