"""The ``vlm-steer`` command: serve, train the embedded models, run benchmarks."""

from __future__ import annotations

import argparse
import json
import sys

from pathlib import Path

from server.settings import EMBEDDED as MODELS_DIR  # the committed embedded models: a path, not a dependency


def _embedded():
    """The embedded world's commands: the module the ``vlm_steer.embedded`` entry point names (ShapeWorld's
    ``shapeworld.commands``, pyproject.toml). It trains the embedded models and supplies the benchmarks'
    default images; commands given ``--data`` never need it."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="vlm_steer.embedded"))
    if not found:
        raise SystemExit("vlm-steer: no embedded data set is installed: give --data DIR (a data set folder)")
    return found[0].load()


def _train(args: argparse.Namespace) -> None:
    if args.what == "calibrate" and args.data:  # any verifier on any labelled data set
        from reward_models.calibrate import calibrate

        if not args.verifier:
            raise SystemExit("train calibrate --data needs --verifier DIR")
        print(json.dumps(calibrate(Path(args.verifier), args.data.split(","), args.vocabulary), indent=2))
    elif args.what == "reward" and args.data:  # any target, any folder of images
        from reward_models.train_reward import train_reward

        if not args.target or args.out == str(MODELS_DIR):
            raise SystemExit("train reward --data DIR needs --target DIR (the VLM the reward model steers) and "
                             "--out DIR (the reward model's folder)")
        recipe = _recipe(args)
        _check_fork(recipe, args)
        train_reward(args.target, args.data, args.out, recipe, init=args.init, verifier=args.verifier,
                     pairs_from=args.pairs_from)
    elif args.data:
        raise SystemExit(f"train {args.what} trains an embedded model; --data is for calibrate and reward")
    else:
        world = _embedded()
        world.train(args, _recipe(args, world.reward_recipe()))


def _check_fork(recipe, args: argparse.Namespace) -> None:
    """A fork's layer count against the target's, and its exclusion of a separate model, in one line before
    any work (the trainer raises the same as ValueError)."""
    if not recipe.fork_layers:
        return
    if args.init or recipe.init_layers:
        raise SystemExit("vlm-steer: --init/--init-layers (a separate model) and --fork-layers (a fork of the target) "
                         "exclude each other")
    from transformers import AutoConfig

    from decoding.model_inputs import local_folder

    try:
        local_folder(args.target, "target")
    except ValueError as e:
        raise SystemExit(f"vlm-steer: {e}") from None
    n = AutoConfig.from_pretrained(args.target).get_text_config().num_hidden_layers
    if not 0 < recipe.fork_layers <= n:
        raise SystemExit(f"vlm-steer: --fork-layers {recipe.fork_layers}: the target has {n} decoder layers (1..{n})")


def _recipe(args: argparse.Namespace, base=None):
    """The reward model's recipe: ``base`` (default: the generic one) with what the command line sets."""
    from dataclasses import replace

    from reward_models.train_reward import RewardRecipe

    base = base or RewardRecipe(seed=args.seed + 1)
    given = {"pairs": args.pairs, "init_layers": args.init_layers, "fork_layers": args.fork_layers, "anchor": args.anchor, "images": args.images,
             "distill_images": args.distill_images, "distill_steps": args.distill_steps, "dpo_steps": args.steps,
             "dpo_lr": args.lr if args.what == "reward" else None,
             "view": args.view, "samples": args.samples, "questions": args.questions, "steered": args.steered}
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def _images(args: argparse.Namespace):
    """Where a load or speed benchmark's requests come from: --data's images, else the embedded world's."""
    if getattr(args, "data", None):
        from reward_models.data import DataSet

        return DataSet.load(args.data).sample_images
    return _embedded().images


def _write_json(report: dict, path: str | None) -> None:
    if path:
        from bench.quality import write_json

        write_json(report, Path(path))
        print(f"wrote {path}")


def _engine(args: argparse.Namespace, engine_args: dict | None = None):
    """The engine a benchmark runs: the embedded reward model and verifier go with the embedded VLM only;
    ``engine_args``: vLLM's engine arguments (the vllm engine)."""
    embedded = Path(args.model).resolve() == (MODELS_DIR / "vlm").resolve()
    reward = args.reward if args.reward is not None else (MODELS_DIR / "reward" if embedded else None)
    verifier = args.verifier if args.verifier is not None else (MODELS_DIR / "verifier" if embedded else None)
    reward, verifier = reward or None, verifier or None  # "" disables
    from server.settings import Settings

    def setting(name):
        value = getattr(args, name, None)
        return value if value is not None else Settings.model_fields[name].default

    if getattr(args, "engine", "transformers") == "vllm":
        from decoding.vllm.engine import VLLMEngine

        return VLLMEngine(args.model, device=args.device, dtype=args.dtype, reward_path=reward, verifier_path=verifier,
                          max_batch=max(8, getattr(args, "batch", 8)), tita_gate=setting("tita_gate"),
                          tita_candidates=setting("tita_candidates"), engine_args=engine_args)
    from decoding.transformers_engine import TransformersEngine

    return TransformersEngine(args.model, device=args.device, dtype=args.dtype, reward_path=reward, verifier_path=verifier,
                              tita_gate=setting("tita_gate"), tita_candidates=setting("tita_candidates"))


def probability(text: str) -> float:
    """--tita-gate: a probability in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def positive(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
    return value


def methods(text: str) -> str:
    """--methods: comma-separated steering methods, each ``none``, a registered name or names joined by '+'."""
    from decoding.methods.base import UnknownMethod, method_parts

    for m in filter(None, text.split(",")):
        try:
            method_parts(m)
        except UnknownMethod as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def splits(text: str) -> str:
    """--split: ShapeWorld splits, comma-separated."""
    bad = [p for p in text.split(",") if p not in ("train", "random", "bait")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown split {bad[0]!r} (ShapeWorld's are train, random and bait)")
    return text


def count(text: str) -> int:
    """--tita-candidates: 0 (the whole vocabulary) or an integer >= 2."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"{text} is not 0 or an integer >= 2 (one candidate leaves TITA nothing to change)")
    return value


def _strengths(text: str | None) -> dict[str, float]:
    out = {}
    for part in filter(None, (text or "").split(",")):
        name, value = part.split(":")
        out[name] = float(value)
    return out


def _data_shapeworld(args: argparse.Namespace) -> None:
    _embedded().data(args)


def _export_lmms_eval(args: argparse.Namespace) -> None:
    from server.export_lmms_eval import export_lmms_eval

    names = export_lmms_eval(args.data, args.out, args.name)
    print(f"wrote {args.out}: the group {names[0]} of the tasks {', '.join(names[1:])}")
    print(f"run: HF_HUB_OFFLINE=1 .venv-lmms/bin/lmms-eval --model openai --model_args model=vlm:tita,base_url=http://127.0.0.1:8000/v1,api_key=none "
          f"--include_path {args.out} --tasks {names[0]}")


def _bench_quality(args: argparse.Namespace) -> None:
    from bench.quality import format_table, plot_quality, plot_sweep, write_json

    engine = _engine(args)
    methods = args.methods.split(",")
    sweep = None
    if args.sweep:
        name, values = args.sweep.split(":")
        sweep = (name, [float(v) for v in values.split(",")])
    reports = []
    if args.data:  # data set folders in the field's formats (reward_models.data)
        from reward_models.data import DataSet
        from bench.quality import run_quality as run_on_data

        runs = [(Path(d).name, lambda d=d: run_on_data(engine, DataSet.load(d), methods, _strengths(args.strength),
                                                       batch=args.batch, sweep=sweep, captions=args.captions))
                for d in args.data.split(",")]
    else:  # the embedded world's splits (ShapeWorld's: exported to those formats on the fly)
        runs = _embedded().quality_runs(args, engine, methods, _strengths(args.strength), sweep)
    for name, run in runs:
        rep = run()
        reports.append(rep)
        print(format_table(rep), flush=True)
        if args.json:
            path = Path(args.json)
            if len(runs) > 1:
                path = path.with_name(f"{path.stem}-{name}{path.suffix}")
            write_json(rep, path)
            print(f"wrote {path}")
    if args.plot:
        (plot_sweep if sweep else plot_quality)(reports, Path(args.plot))
        print(f"wrote {args.plot}")


def _bench_speed(args: argparse.Namespace) -> None:
    from bench.speed import format_speed, plain_speed, run_speed, tita_limit, with_plain

    images, prompt = _images(args)(args.n, args.seed)
    plain = []

    def measure_plain():  # the target alone, with no other engine alive (bench.speed.plain_speed says why)
        alone = _engine(argparse.Namespace(**{**vars(args), "reward": "", "verifier": ""}))
        try:
            plain.append(plain_speed(alone, images, prompt, batch=args.batch, max_tokens=args.max_tokens,
                                     ignore_eos=args.ignore_eos))
        finally:
            if hasattr(alone, "close"):
                alone.close()

    if args.plain_baseline:
        measure_plain()
    engine = _engine(args)
    methods = [m for m in args.methods.split(",") if all(p in engine.available_methods for p in m.split("+"))]
    skipped = sorted(set(args.methods.split(",")) - set(methods))
    if skipped:
        print(f"not measured (not available with these models on this engine): {', '.join(skipped)}")
    try:
        rep = run_speed(engine, methods, images, prompt, batch=args.batch, ignore_eos=args.ignore_eos,
                        max_tokens=args.max_tokens, meta={"seed": args.seed, "images": args.data or "embedded"})
    finally:
        if args.plain_baseline and hasattr(engine, "close"):
            engine.close()
    if args.plain_baseline:
        measure_plain()
        rep = with_plain(rep, plain)
    share = rep["methods"].get("tita", {}).get("consulted_share", {}).get("tita", 1.0)
    rep["tita_limit"] = tita_limit(args.model, engine, share) if "tita" in engine.available_methods else None
    print(format_speed(rep))
    if not args.plain_baseline and hasattr(engine, "close"):  # else closed before the second plain run
        engine.close()
    _write_json(rep, args.json)


def _bench_arrival(args: argparse.Namespace) -> None:
    from bench.arrival import format_arrival, keep_off_worker_cores, run_arrival

    images, prompt = _images(args)(args.running + args.repeats, args.seed)
    engine = _engine(argparse.Namespace(**{**vars(args), "engine": "vllm", "batch": args.running + 1}),
                     engine_args={"worker_extension_cls": "bench.arrival.RewardTimer"})
    try:
        methods = [m for m in args.methods.split(",") if all(p in engine.available_methods for p in m.split("+"))]
        skipped = sorted(set(args.methods.split(",")) - set(methods))
        if skipped:
            print(f"not measured (not available with these models on this engine): {', '.join(skipped)}")
        api_cpus = keep_off_worker_cores(engine)
        rep = run_arrival(engine, methods, images, prompt, running=args.running, repeats=args.repeats)
    finally:
        engine.close()
    rep.update(seed=args.seed, images=args.data or "embedded", model=args.model, api_cpus=api_cpus)
    print(format_arrival(rep))
    _write_json(rep, args.json)


def _bench_verifier(args: argparse.Namespace) -> None:
    _write_json(_embedded().bench_verifier(args, _engine(args)), args.json)


def _bench_load(args: argparse.Namespace) -> None:
    import asyncio

    from bench.load import format_load, run_load

    source = _images(args)
    if args.engines:  # servers of each engine started here, interleaved rounds at each concurrency
        from bench.load import format_engines, run_engines

        rep = asyncio.run(run_engines(args.engines.split(","), [int(c) for c in str(args.concurrency).split(",")],
                                      args.requests, args.methods.split(","), source, max_tokens=args.max_tokens))
        print(format_engines(rep))
    elif args.overhead:  # the server vs this process's own engine, interleaved, concurrency 1
        from decoding.transformers_engine import TransformersEngine
        from bench.load import format_overhead, run_overhead

        engine = TransformersEngine(args.model, device=args.device, dtype=args.dtype)
        rep = asyncio.run(run_overhead(args.url, engine, args.requests, source, model=args.model_name, max_tokens=args.max_tokens))
        print(format_overhead(rep))
    else:
        rep = asyncio.run(run_load(args.url, int(args.concurrency), args.requests, args.methods.split(","), source,
                                   model=args.model_name,
                                   max_tokens=args.max_tokens, disconnect_fraction=args.disconnect_fraction,
                                   api_key=args.api_key))
        print(format_load(rep))
    _write_json(rep, args.json)


def _bench_health(args: argparse.Namespace) -> None:
    import asyncio

    from bench.health import format_health, run_health

    w, h = (int(x) for x in args.image_size.lower().split("x"))
    rep = asyncio.run(run_health(args.url, (w, h), args.requests, model=args.model_name))
    print(format_health(rep))
    _write_json(rep, args.json)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(MODELS_DIR / "vlm"), help="target VLM folder (any family transformers loads)")
    p.add_argument("--reward", "--reward-model", dest="reward", default=None,
                   help="TITA reward model: a fork of the target or a separate model with its tokenizer (default: the "
                        "embedded one for the embedded VLM; '' for none)")
    p.add_argument("--verifier", default=None, help="FiSAO verifier folder (CLIP/SigLIP with objects.json and "
                                                     "calibration.json; default: the embedded one for the embedded VLM)")
    p.add_argument("--tita-gate", type=probability, default=None,
                   help="TITA: consult the reward model only where the target's top-1 probability is below this, in "
                        "(0, 1] (default: the server's, see `vlm-steer serve --help`)")
    p.add_argument("--tita-candidates", type=count, default=None,
                   help="TITA: take the log-ratio inside the target's top K tokens only (0: the whole vocabulary; "
                        "default: the server's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")


def _serve(args: argparse.Namespace) -> None:
    from server.serve import serve
    from server.settings import from_args

    serve(from_args(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-steer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    from server.settings import add_arguments

    sv = sub.add_parser("serve", help="the OpenAI-compatible steering server (embedded ShapeWorld models by default)")
    add_arguments(sv)
    sv.set_defaults(func=_serve)

    t = sub.add_parser("train", help="train the embedded ShapeWorld models (seeded, reproducible), or a reward model "
                                     "and a verifier calibration for any target on any data set (--data)")
    t.add_argument("what", choices=["verifier", "calibrate", "vlm", "reward", "judge", "json", "all"],
                   help="json: teach the embedded VLM and its fork the JSON tokens of their one JSON shape "
                        "(shapeworld/train_json.py), rewriting OUT/vlm and OUT/reward in place")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--verifier", default=None, help="calibrate: the verifier folder (CLIP, SigLIP, ...) to calibrate")
    t.add_argument("--data", default=None, help="calibrate: labelled data set folder(s), comma-separated "
                                                "(reward_models/data.py); default: ShapeWorld's calibration scenes")
    t.add_argument("--vocabulary", default=None, help="calibrate: vocabulary.json (default: the data set's)")
    t.add_argument("--out", default=str(MODELS_DIR), help="the embedded models: the folder that receives verifier/, vlm/ and reward/; "
                                                          "train reward --data: the reward model's folder")
    t.add_argument("--recipe", default="committed", choices=["committed", "plain", "bound-qa"],
                   help="vlm (and the reward model distilled from it): the committed model's recipe, or an earlier "
                        "one (shapeworld.train_vlm.RECIPES)")
    t.add_argument("--grounding-weight", type=float, default=None,
                   help="vlm: weight of the per-image-slot object loss on the projector (0: off)")
    t.add_argument("--grounding-warmup", type=int, default=None,
                   help="vlm: projector-only steps on that loss before the language model trains")
    t.add_argument("--lr", type=float, default=None, help="vlm: override the peak learning rate; reward: the DPO learning rate")
    t.add_argument("--steps", type=int, default=None, help="override the number of training (or DPO) steps")
    t.add_argument("--target", default=None, help="reward: the target VLM folder the reward model steers")
    t.add_argument("--init", default=None, help="reward: a smaller VLM with the target's tokenizer to start from "
                                                "(default: a copy of the target, see --init-layers)")
    t.add_argument("--init-layers", type=int, default=None,
                   help="reward without --init: a separate copy of the target keeping its first N decoder layers "
                        "(0: all); it runs its own whole forward beside the target at every step")
    t.add_argument("--fork-layers", type=int, default=None,
                   help="reward: a fork instead, the target's top N decoder layers, final norm and head trained on the "
                        "target's frozen trunk; served inside the target's engine on its hidden states (N layers "
                        "and a head per step), only with the exact target it was trained on")
    t.add_argument("--anchor", type=float, default=None,
                   help="reward: weight of a KL anchor on the target's own yes/no answers during DPO (0: none)")
    t.add_argument("--pairs-from", default=None,
                   help="reward: reuse the pairs.jsonl of an earlier run on the same target and data")
    t.add_argument("--pairs", default=None,
                   help="reward: preference pair sources, '+'-joined: verifier (label-free: the calibrated --verifier "
                        "judges the target's own answers), labels (the data set's annotations), views (clean vs "
                        "augmented view, no judge); default verifier")
    t.add_argument("--images", type=int, default=None, help="reward: images the pairs are built from")
    t.add_argument("--distill-images", type=int, default=None, help="reward: images of the distillation (0: none)")
    t.add_argument("--distill-steps", type=int, default=None, help="reward: distillation steps")
    t.add_argument("--samples", type=int, default=None, help="reward: sampled candidate captions per image")
    t.add_argument("--view", default=None, help="reward: augmented view, noise:<share> or erase:<share>")
    t.add_argument("--questions", type=int, default=None, help="reward: yes/no questions per image (0: caption pairs only)")
    t.add_argument("--steered", default=None, help="reward: steering methods of extra greedy candidates, e.g. fisao or "
                                                   "fisao:10 ('' for none; default auto: fisao when calibrated)")
    t.set_defaults(func=_train)

    d = sub.add_parser("data", help="write a data set in the field's formats")
    dsub = d.add_subparsers(dest="data", required=True)
    ds = dsub.add_parser("shapeworld", help="ShapeWorld scenes: images, COCO instances and captions, POPE files, vocabulary")
    ds.add_argument("--split", default="random", choices=["train", "random", "bait"])
    ds.add_argument("--n", type=positive, default=300)
    ds.add_argument("--seed", type=int, default=1234)
    ds.add_argument("--out", required=True)
    ds.set_defaults(func=_data_shapeworld)

    ex = sub.add_parser("export", help="a data set folder as another tool's task")
    exsub = ex.add_subparsers(dest="export", required=True)
    el = exsub.add_parser("lmms-eval", help="an lmms-eval task of the data set's POPE files (lmms-eval's POPE "
                                            "scoring, one-token answers; the method chosen by model name, e.g. vlm:tita)")
    el.add_argument("--data", required=True, help="data set folder with pope/*.jsonl (reward_models/data.py)")
    el.add_argument("--out", required=True, help="task folder to write (lmms-eval's --include_path)")
    el.add_argument("--name", default="steered_pope", help="the group's task name; each file's task is NAME_<file>")
    el.set_defaults(func=_export_lmms_eval)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser("quality", help="CHAIR, recall and POPE per steering method on a data set (or ShapeWorld)")
    q.add_argument("--data", default=None, help="data set folder(s), comma-separated: images, COCO instances and "
                                                "captions, POPE question files, vocabulary (see reward_models/data.py); "
                                                "default: ShapeWorld scenes of --split")
    q.add_argument("--split", type=splits, default="random", help="ShapeWorld: random, bait, or both comma-separated")
    q.add_argument("--methods", type=methods, default="none", help="comma-separated steering methods")
    q.add_argument("--strength", default=None, help="per-method strengths, e.g. tita:0.6,fisao:3")
    q.add_argument("--sweep", default=None, help="strength sweep of one method, e.g. tita:0,0.2,0.4,0.6,0.8")
    q.add_argument("--n", type=positive, default=300, help="scenes per split")
    q.add_argument("--seed", type=int, default=1234, help="scene seed (held out: not in 0-99)")
    q.add_argument("--captions", default="text", choices=["text", "json"],
                   help="json: captions answered under a JSON schema (a list of object strings, structured outputs) "
                        "and scored on the listed objects; POPE is not asked")
    q.add_argument("--json", default=None, help="write the report here")
    q.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    q.add_argument("--batch", type=positive, default=32)
    _model_args(q)
    q.set_defaults(func=_bench_quality)

    s = bsub.add_parser("speed", help="tokens/s per method, interleaved, with the ratio to none")
    s.add_argument("--methods", type=methods, default="none,tita,fisao,tita+fisao,vcd")
    s.add_argument("--n", type=positive, default=64)
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--batch", type=positive, default=8)
    s.add_argument("--ignore-eos", action="store_true",
                   help="every request generates --max-tokens tokens (vLLM's benchmark convention): methods compared per "
                        "decoding step, not by the length of their answers")
    s.add_argument("--max-tokens", type=positive, default=40)
    s.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    s.add_argument("--plain-baseline", action="store_true",
                   help="also time none on the target alone (no reward model, no verifier), an engine of its own "
                        "before and after the steering one (never two at once): what a reward model inside the "
                        "engine's model costs every request")
    s.add_argument("--data", default=None, help="a data set folder whose images (and caption prompt) the requests use "
                                                "(default: the embedded world's bait scenes)")
    s.add_argument("--json", default=None)
    _model_args(s)
    s.set_defaults(func=_bench_speed)

    ar = bsub.add_parser("arrival", help="the vllm engine: what a steered arrival adds to the step that admits it, "
                                         "against an unsteered one, and TITA's reward model's prefill alone")
    ar.add_argument("--methods", type=methods, default="none,tita,fisao,tita+fisao")
    ar.add_argument("--running", type=positive, default=8, help="unsteered requests decoding when each arrival comes")
    ar.add_argument("--repeats", type=positive, default=20, help="arrivals per method (interleaved)")
    ar.add_argument("--seed", type=int, default=1234)
    ar.add_argument("--data", default=None, help="a data set folder whose images (and caption prompt) the requests use "
                                                 "(default: the embedded world's bait scenes)")
    ar.add_argument("--json", default=None)
    _model_args(ar)
    ar.set_defaults(func=_bench_arrival)

    ld = bsub.add_parser("load", help="load generator against a running server (streaming, mixed methods)")
    ld.add_argument("--url", default="http://127.0.0.1:8000")
    ld.add_argument("--concurrency", default="8", help="clients at once (with --engines: a comma-separated list)")
    ld.add_argument("--requests", type=positive, default=64)
    ld.add_argument("--methods", type=methods, default="none,tita,fisao,tita+fisao,vcd")
    ld.add_argument("--data", default=None, help="a data set folder whose images (and caption prompt) the requests use "
                                                 "(default: the embedded world's bait scenes)")
    ld.add_argument("--model-name", default="vlm")
    ld.add_argument("--max-tokens", type=positive, default=40)
    ld.add_argument("--disconnect-fraction", type=float, default=0.0, help="share of clients that hang up mid-stream")
    ld.add_argument("--api-key", default=None)
    ld.add_argument("--json", default=None)
    ld.add_argument("--engines", default=None,
                    help="start a server per engine here (e.g. transformers,vllm) and compare them, interleaved")
    ld.add_argument("--overhead", action="store_true",
                    help="compare with this process's own engine at concurrency 1 (interleaved rounds, method none)")
    _model_args(ld)
    ld.set_defaults(func=_bench_load)

    hb = bsub.add_parser("health", help="/health latency while costly images are processed, against idle")
    hb.add_argument("--url", default="http://127.0.0.1:8000")
    hb.add_argument("--image-size", default="1x20000", help="WIDTHxHEIGHT of a white PNG sent with each request")
    hb.add_argument("--requests", type=positive, default=4, help="such requests at once")
    hb.add_argument("--model-name", default="vlm")
    hb.add_argument("--json", default=None)
    hb.set_defaults(func=_bench_health)

    v = bsub.add_parser("verifier", help="verifier scores of correct vs hallucinated mentioned objects (plot)")
    v.add_argument("--n", type=positive, default=300)
    v.add_argument("--seed", type=int, default=1234)
    v.add_argument("--json", default=None)
    v.add_argument("--plot", default=None)
    _model_args(v)
    v.set_defaults(func=_bench_verifier)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from reward_models.data import DataError

    from decoding.methods.base import UnknownMethod
    from decoding.model_inputs import NoSuchFolder
    from decoding.request import EngineMissing
    from pydantic import ValidationError

    try:
        args.func(args)
    except (DataError, NoSuchFolder, UnknownMethod, EngineMissing) as e:  # a user's data, model folder, method
        raise SystemExit(f"vlm-steer: {e}") from None  # or engine: one clear line, no traceback
    except ValidationError as e:  # a setting out of range: each field and why
        raise SystemExit("vlm-steer: invalid settings: " + "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None


if __name__ == "__main__":
    main()
