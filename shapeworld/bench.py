"""The quality benchmark: captions scored with CHAIR and recall, yes/no answers scored with POPE, per
steering method, all through the engine's batched ``generate`` (the code path the server uses)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from shapeworld.metrics import binary_scores, chair
from shapeworld.pope import SAMPLINGS, questions_for
from shapeworld.text import CAPTION_PROMPT, parse_objects, parse_yes_no, question
from shapeworld.world import make_scenes

# Seeds the embedded models were trained or calibrated on; evaluation must use others.
RESERVED_SEEDS = frozenset(range(0, 100)) | {500}
CAPTION_MAX_TOKENS = 40


def _generate(engine, requests: list[GenerationRequest], batch: int, desc: str):
    out = []
    for i in tqdm(range(0, len(requests), batch), desc=desc, leave=False):
        out.extend(engine.generate(requests[i : i + batch], max_batch=batch))
    return out


def evaluate_method(engine, scenes, steering: SteeringSpec, batch: int = 32) -> dict:
    images = [s.image() for s in scenes]
    greedy = SamplingParams(max_tokens=CAPTION_MAX_TOKENS)
    caps = [GenerationRequest.single_turn(CAPTION_PROMPT, [im], sampling=greedy, steering=steering) for im in images]
    t0 = time.perf_counter()
    done = _generate(engine, caps, batch, f"captions [{steering.method}]")
    seconds = time.perf_counter() - t0
    generated = sum(len(c.token_ids) + (c.finish_reason == "stop") for c in done)
    result = chair([parse_objects(c.text) for c in done], [s.objects for s in scenes])

    # POPE: every distinct (scene, object) question is asked once and shared by the samplings.
    sets = {name: [q for s in scenes for q in questions_for(s, name)] for name in SAMPLINGS}
    keys = sorted({(q.scene_index, q.obj) for qs in sets.values() for q in qs})
    by_index = {s.index: i for i, s in enumerate(scenes)}
    one = SamplingParams(max_tokens=1)
    asks = [GenerationRequest.single_turn(question(o), [images[by_index[si]]], sampling=one, steering=steering)
            for si, o in keys]
    answers = {k: parse_yes_no(c.text) is True for k, c in zip(keys, _generate(engine, asks, batch * 2, "POPE"))}
    result["pope"] = {
        name: binary_scores([answers[(q.scene_index, q.obj)] for q in qs], [q.answer for q in qs])
        for name, qs in sets.items()
    }
    result["tokens_per_second"] = generated / seconds
    result["examples"] = [{"truth": s.caption(), "generated": c.text} for s, c in zip(scenes[:5], done[:5])]
    return result


def run_quality(engine, split: str, n: int, seed: int, methods: list[str], strengths: dict | None = None,
                batch: int = 32, sweep: tuple[str, list[float]] | None = None) -> dict:
    """One entry per method (at its requested or default strength) and, with ``sweep=(method, values)``,
    one entry ``method@value`` per strength."""
    scenes = make_scenes(split, n, seed)
    report = {"split": split, "n": n, "seed": seed, "model": engine.model_path, "engine": engine.name, "methods": {}}
    for m in methods:
        spec = SteeringSpec(m, (strengths or {}).get(m))
        report["methods"][m] = evaluate_method(engine, scenes, spec, batch)
        report["methods"][m]["strength"] = engine.resolve(spec)
    if sweep:
        name, values = sweep
        for v in values:
            report["methods"][f"{name}@{v:g}"] = evaluate_method(engine, scenes, SteeringSpec(name, v), batch)
    return report


def format_table(report: dict) -> str:
    head = (f"split={report['split']} n={report['n']} seed={report['seed']}\n"
            f"{'method':<12} {'CHAIR_i':>8} {'CHAIR_s':>8} {'recall':>7} "
            + " ".join(f"{'F1-' + s[:3]:>7} {'acc-' + s[:3]:>7}" for s in SAMPLINGS) + f" {'tok/s':>8}")
    lines = [head]
    for m, r in report["methods"].items():
        pope = " ".join(f"{r['pope'][s]['f1']:>7.3f} {r['pope'][s]['accuracy']:>7.3f}" for s in SAMPLINGS)
        lines.append(f"{m:<12} {r['chair_i']:>8.3f} {r['chair_s']:>8.3f} {r['recall']:>7.3f} {pope} "
                     f"{r['tokens_per_second']:>8.1f}")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


def plot_quality(reports: list[dict], path: Path) -> None:
    """Bars per method: CHAIR_i, recall and POPE F1 (each sampling), one panel per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [("CHAIR_i", lambda r: r["chair_i"]), ("recall", lambda r: r["recall"])] + [
        (f"POPE F1 {s}", lambda r, s=s: r["pope"][s]["f1"]) for s in SAMPLINGS
    ]
    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4), squeeze=False)
    for ax, rep in zip(axes[0], reports):
        methods = list(rep["methods"])
        x = np.arange(len(metrics))
        w = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals = [f(rep["methods"][m]) for _, f in metrics]
            bars = ax.bar(x + j * w - 0.4 + w / 2, vals, w, label=m)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(x, [name for name, _ in metrics], rotation=20)
        ax.set_ylim(0, 1.08)
        ax.set_title(f"{rep['split']} (n={rep['n']}, seed={rep['seed']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(reports: list[dict], path: Path) -> None:
    """CHAIR_i, recall and POPE-adversarial F1 against the swept strength (the TITA paper's lambda curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4), squeeze=False)
    for ax, rep in zip(axes[0], reports):
        pts = sorted((float(k.split("@")[1]), v) for k, v in rep["methods"].items() if "@" in k)
        name = next(k.split("@")[0] for k in rep["methods"] if "@" in k)
        xs = [x for x, _ in pts]
        ax.plot(xs, [r["chair_i"] for _, r in pts], "o-", label="CHAIR_i")
        ax.plot(xs, [r["recall"] for _, r in pts], "s-", label="recall")
        ax.plot(xs, [r["pope"]["adversarial"]["f1"] for _, r in pts], "^-", label="POPE-adv F1")
        ax.set_xlabel(f"{name} strength")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{rep['split']} (n={rep['n']}, seed={rep['seed']})")
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
