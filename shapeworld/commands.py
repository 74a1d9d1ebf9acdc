"""ShapeWorld's part of the ``vlm-steer`` command: training the embedded models, `data shapeworld`, the
benchmarks' default scenes. The CLI (``server/cli.py``) finds this module through the ``vlm_steer.embedded``
entry point (pyproject.toml) and never imports ShapeWorld by name: without it, every command works on
the user's data (``--data``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


RESERVED_SEEDS = frozenset(range(0, 100)) | {500}  # training and calibration; benchmarks default to 1234
NAME = "ShapeWorld"


def images(n: int, seed: int) -> tuple[list, str]:
    """Bait scenes (the bias trigger without its partner) and the caption prompt: the requests of the load
    and speed benchmarks on the embedded models."""
    from shapeworld.text import CAPTION_PROMPT
    from shapeworld.world import make_scenes

    return [s.image() for s in make_scenes("bait", n, seed)], CAPTION_PROMPT


def data(args: argparse.Namespace) -> None:
    """`vlm-steer data shapeworld`: scenes of a split in the field's formats."""
    from shapeworld.export import export

    print(export(args.split, args.n, args.seed, args.out))


def train(args: argparse.Namespace, recipe) -> None:
    """The embedded models' stages (`vlm-steer train verifier|calibrate|vlm|reward|json|all` without --data), into
    ``--out`` (verifier/, vlm/, reward/); ``recipe``: the reward model's recipe from the command line."""
    out = Path(args.out)
    if args.what in ("verifier", "all"):
        from shapeworld.train_verifier import VerifierTrainConfig, train_verifier

        cfg = VerifierTrainConfig(seed=args.seed, out=out / "verifier")
        cfg.steps = args.steps or cfg.steps
        train_verifier(cfg)
    if args.what in ("calibrate", "all"):
        from shapeworld.calibration import calibrate_shapeworld

        print(json.dumps(calibrate_shapeworld(out / "verifier"), indent=2))
    if args.what in ("vlm", "all"):
        from shapeworld.train_vlm import RECIPES, VLMTrainConfig, train_vlm

        cfg = VLMTrainConfig(seed=args.seed, verifier=out / "verifier", out=out / "vlm", **RECIPES[args.recipe])
        for name in ("lr", "grounding_weight", "grounding_warmup"):
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        cfg.steps = args.steps or cfg.steps
        train_vlm(cfg)
    if args.what in ("judge", "all"):  # the grounding judge: an independent verifier (own seed, deeper tower)
        from shapeworld.calibration import calibrate_shapeworld
        from shapeworld.train_verifier import VerifierTrainConfig, train_verifier

        train_verifier(VerifierTrainConfig(seed=args.seed + 7, steps=2000, layers=6, out=out / "judge"))
        print(json.dumps(calibrate_shapeworld(out / "judge"), indent=2))
    if args.what in ("reward", "all"):
        from shapeworld.train_reward import train_embedded_reward

        train_embedded_reward(out, args.seed + 1, recipe)
    if args.what in ("json", "all"):  # JSON answers: the new tokens' rows of the VLM and of its fork
        from shapeworld.train_json import JsonTokensConfig, train_json_tokens

        cfg = JsonTokensConfig(seed=args.seed + 3)
        cfg.steps = args.steps or cfg.steps
        print(json.dumps(train_json_tokens(out, cfg), indent=2))


def reward_recipe():
    from shapeworld.train_reward import EMBEDDED_RECIPE

    return EMBEDDED_RECIPE


def quality_runs(args: argparse.Namespace, engine, methods: list[str], strengths: dict, sweep) -> list:
    """(name, run) per ShapeWorld split of `bench quality` without --data (scenes exported on the fly)."""
    from shapeworld.bench import run_quality

    if args.seed in RESERVED_SEEDS:
        print(f"warning: seed {args.seed} is reserved for training/calibration; results are not held-out", file=sys.stderr)
    return [(split, lambda split=split: run_quality(engine, split, args.n, args.seed, methods, strengths,
                                                    batch=args.batch, sweep=sweep, captions=args.captions))
            for split in args.split.split(",")]


def bench_verifier(args: argparse.Namespace, engine) -> dict:
    """`vlm-steer bench verifier`: verifier scores of correct vs hallucinated mentioned objects."""
    from shapeworld.bench_verifier import mentioned_object_scores, plot_scores

    v = engine.resources.verifier
    if v is None:
        raise SystemExit(f"no calibrated verifier at {args.verifier}")
    scores = mentioned_object_scores(engine, v, args.n, args.seed)
    for k, vals in scores.items():
        print(f"{k:<13} n={len(vals):<5} mean z={np.mean(vals) if vals else float('nan'):.3f}")
    if args.plot:
        plot_scores(scores, v.calibration, Path(args.plot))
        print(f"wrote {args.plot}")
    return {"n": args.n, "seed": args.seed, "scores": scores}
