"""The ``vlm-steer`` command: train the embedded models, run benchmarks (and, later, serve)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shapeworld.models import MODELS_DIR


def _train(args: argparse.Namespace) -> None:
    from shapeworld.train_verifier import VerifierTrainConfig, train_verifier
    from shapeworld.train_vlm import VLMTrainConfig, train_vlm

    out = Path(args.out)
    if args.what in ("verifier", "all"):
        cfg = VerifierTrainConfig(seed=args.seed, out=out / "verifier")
        if args.verifier_steps:
            cfg.steps = args.verifier_steps
        train_verifier(cfg)
    if args.what in ("vlm", "all"):
        cfg = VLMTrainConfig(seed=args.seed, verifier=out / "verifier", out=out / "vlm")
        if args.vlm_steps:
            cfg.steps = args.vlm_steps
        train_vlm(cfg)


def _bench_quality(args: argparse.Namespace) -> None:
    from decoding.transformers_engine import TransformersEngine
    from shapeworld.bench import RESERVED_SEEDS, format_table, plot_quality, run_quality, write_json

    if args.seed in RESERVED_SEEDS:
        print(f"warning: seed {args.seed} is reserved for training/calibration; results are not held-out",
              file=sys.stderr)
    engine = TransformersEngine(args.model, device=args.device, dtype=args.dtype)
    splits = args.split.split(",")
    methods = args.methods.split(",")
    reports = []
    for split in splits:
        rep = run_quality(engine, split, args.n, args.seed, methods, batch=args.batch)
        reports.append(rep)
        print(format_table(rep))
        if args.json:
            path = Path(args.json)
            if len(splits) > 1:
                path = path.with_name(f"{path.stem}-{split}{path.suffix}")
            write_json(rep, path)
            print(f"wrote {path}")
    if args.plot:
        plot_quality(reports, Path(args.plot))
        print(f"wrote {args.plot}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-steer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the embedded ShapeWorld models (seeded, reproducible)")
    t.add_argument("what", choices=["verifier", "vlm", "all"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=str(MODELS_DIR), help="folder that receives verifier/ and vlm/")
    t.add_argument("--verifier-steps", type=int, default=None)
    t.add_argument("--vlm-steps", type=int, default=None)
    t.set_defaults(func=_train)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser("quality", help="CHAIR, recall and POPE per steering method on ShapeWorld")
    q.add_argument("--split", default="random", help="random, bait, or both comma-separated")
    q.add_argument("--methods", default="none", help="comma-separated steering methods")
    q.add_argument("--n", type=int, default=300, help="scenes per split")
    q.add_argument("--seed", type=int, default=1234, help="scene seed (held out: not in 0-99)")
    q.add_argument("--json", default=None, help="write the report here")
    q.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    q.add_argument("--model", default=str(MODELS_DIR / "vlm"))
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="float32")
    q.add_argument("--batch", type=int, default=32)
    q.set_defaults(func=_bench_quality)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
