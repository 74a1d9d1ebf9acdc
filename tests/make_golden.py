"""Regenerate tests/golden.json (greedy outputs per method on fixed scenes) after retraining:
    .venv/bin/python tests/make_golden.py
and, after retraining the reward model, the TITA entries of tests/golden_quality.json (the quality benchmark
through exported files; the other methods' entries do not depend on the reward model and stay):
    .venv/bin/python tests/make_golden.py --quality"""

import json
from pathlib import Path

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from decoding.transformers_engine import TransformersEngine
from shapeworld.models import MODELS_DIR
from shapeworld.text import CAPTION_PROMPT, question
from shapeworld.world import make_scenes

METHODS = ["none", "tita", "fisao", "tita+fisao", "vcd"]
GOLDEN = Path(__file__).with_name("golden.json")


def golden_requests(method: str) -> list[GenerationRequest]:
    reqs = []
    for split in ("random", "bait"):
        for s in make_scenes(split, 4, 777):
            for text in (CAPTION_PROMPT, question(s.objects[0])):
                reqs.append(GenerationRequest.single_turn(text, [s.image()], sampling=SamplingParams(max_tokens=40),
                                                          steering=SteeringSpec(method)))
    return reqs


def compute(engine) -> dict[str, list[str]]:
    return {m: [c.text for c in engine.generate(golden_requests(m))] for m in METHODS}


def recompute_quality_tita(engine) -> None:
    import sys
    import tempfile

    from reward_models.data import DataSet
    from bench.quality import run_quality
    from server.cli import main

    path = GOLDEN.with_name("golden_quality.json")
    golden = json.loads(path.read_text())
    for split in golden:
        with tempfile.TemporaryDirectory() as d:
            main(["data", "shapeworld", "--split", split, "--n", "24", "--seed", "4321", "--out", d])
            rep = run_quality(engine, DataSet.load(d), ["tita", "tita+fisao"], batch=32)
        for m, got in rep["methods"].items():
            golden[split][m] = {k: got[k] for k in ("chair_i", "chair_s", "recall", "pope")}
    path.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    import sys

    e = TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", verifier_path=MODELS_DIR / "verifier")
    if "--quality" in sys.argv:
        recompute_quality_tita(e)
    else:
        GOLDEN.write_text(json.dumps(compute(e), indent=1) + "\n")
        print(f"wrote {GOLDEN}")
