"""Regenerate tests/golden.json (greedy outputs per method on fixed scenes) after retraining:
    .venv/bin/python tests/make_golden.py"""

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


if __name__ == "__main__":
    e = TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", verifier_path=MODELS_DIR / "verifier")
    GOLDEN.write_text(json.dumps(compute(e), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
