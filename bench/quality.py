"""The quality benchmark on any data set folder (``reward_models.data``): captions scored with CHAIR_i,
CHAIR_s and object recall against the images' COCO instances (mentions found with the vocabulary's
synonyms), and each POPE question file scored with accuracy, precision, recall, F1 and yes-ratio; per
steering method, through the engine's batched ``generate`` (the code path the server uses), for any
served family."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from decoding.grammar import StructuredOutput
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from reward_models.data import DataSet
from reward_models.metrics import answer_is_yes, binary_scores, chair, f1_difference_interval

CAPTION_MAX_TOKENS = 40
# `--captions json`: the caption prompt answered under this JSON schema (the objects as a list of free strings;
# strings, not enums, so that any tokenizer can write them), scored on the listed strings: the CHAIR of
# extracted JSON, where a hallucinated field is a hallucinated object. Bounded, as a JSON answer should be
# (README): a string that rambles is closed at 20 characters, so the answer stays valid within max_tokens.
OBJECTS_SCHEMA = {"type": "object", "properties": {"objects": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                               "maxItems": 8}},
                  "required": ["objects"], "additionalProperties": False}
CAPTION_FORMATS = ("text", "json")


def listed_objects(text: str) -> str:
    """The strings of an ``OBJECTS_SCHEMA`` answer joined as a sentence ("red square . blue circle"); the raw
    text when it does not parse (an answer cut by ``max_tokens``)."""
    try:
        objects = json.loads(text)["objects"]
    except (ValueError, KeyError, TypeError):
        return text
    return " . ".join(o for o in objects if isinstance(o, str))


def _generate(engine, requests: list[GenerationRequest], batch: int, desc: str):
    out = []
    for i in tqdm(range(0, len(requests), batch), desc=desc, leave=False):
        out.extend(engine.generate(requests[i : i + batch], max_batch=batch))
    return out


def evaluate(engine, data: DataSet, steering: SteeringSpec, batch: int = 32, max_tokens: int = CAPTION_MAX_TOKENS,
             captions: str = "text") -> dict:
    """CHAIR and recall of greedy captions of every image, and POPE scores per question file. ``captions``
    "json": the captions are answers under ``OBJECTS_SCHEMA`` (``structured_outputs`` json), scored on the
    listed objects, and POPE is not asked (its one-token answers do not change)."""
    if captions not in CAPTION_FORMATS:
        raise ValueError(f"captions {captions!r}: one of {CAPTION_FORMATS}")
    ids = data.image_ids
    images = {i: data.image(i) for i in ids}
    prompt = data.caption_prompt
    greedy = SamplingParams(max_tokens=max_tokens)
    fmt = StructuredOutput("json", json.dumps(OBJECTS_SCHEMA)) if captions == "json" else None
    caps = [GenerationRequest.single_turn(prompt, [images[i]], sampling=greedy, steering=steering, structured=fmt)
            for i in ids]
    t0 = time.perf_counter()
    done = _generate(engine, caps, batch, f"captions [{steering.method}]")
    seconds = time.perf_counter() - t0
    generated = sum(len(c.token_ids) + (c.finish_reason == "stop") for c in done)
    read = listed_objects if captions == "json" else (lambda text: text)
    result = chair([data.vocabulary.mentions(read(c.text)) for c in done], [data.objects[i] for i in ids])
    result["captions"] = captions
    result["tokens_per_second"] = generated / seconds
    result["examples"] = [{"truth": (data.captions.get(i) or [""])[0], "generated": c.text} for i, c in zip(ids[:5], done[:5])]
    if captions == "json":
        result["valid_json"] = sum(read(c.text) is not c.text for c in done) / len(done)
        result["pope"], result["pope_answers"] = {}, {}
        return result
    # every distinct (image, question) is asked once and shared by the question files
    keys = sorted({(q.image, q.text) for qs in data.pope.values() for q in qs})
    one = SamplingParams(max_tokens=1)
    asks = [GenerationRequest.single_turn(text, [data.image_by_file(f)], sampling=one, steering=steering) for f, text in keys]
    answers = {k: answer_is_yes(c.text) is True for k, c in zip(keys, _generate(engine, asks, batch * 2, "POPE"))}
    result["pope"] = {name: binary_scores([answers[(q.image, q.text)] for q in qs], [q.label for q in qs])
                      for name, qs in data.pope.items()}
    # each question's answer (1 = yes), in file order: the paired bootstrap against `none` reads them
    result["pope_answers"] = {name: [int(answers[(q.image, q.text)]) for q in qs] for name, qs in data.pope.items()}
    return result


def run_quality(engine, data: DataSet, methods: list[str], strengths: dict | None = None, batch: int = 32,
                sweep: tuple[str, list[float]] | None = None, meta: dict | None = None, captions: str = "text") -> dict:
    """One entry per method (at its requested or default strength) and, with ``sweep=(method, values)``,
    one entry ``method@value`` per strength. ``meta``: what the report says about the data (split, seed);
    ``captions``: "text" or "json" (``evaluate``)."""
    report = {"data": str(data.root), "n": len(data.image_ids), **(meta or {}), "model": engine.model_path,
              "engine": engine.name, "methods": {}}
    for m in methods:
        spec = SteeringSpec(m, (strengths or {}).get(m))
        report["methods"][m] = evaluate(engine, data, spec, batch, captions=captions)
        report["methods"][m]["strength"] = engine.resolve(spec)
    if sweep:
        name, values = sweep
        for v in values:
            report["methods"][f"{name}@{v:g}"] = evaluate(engine, data, SteeringSpec(name, v), batch, captions=captions)
    base = report["methods"].get("none")
    if base is not None and captions == "text":  # each method's POPE F1 minus none's, with a paired bootstrap 95% interval
        truth = {name: [q.label for q in qs] for name, qs in data.pope.items()}
        for m, r in report["methods"].items():
            if m != "none":
                r["pope_vs_none"] = {f: f1_difference_interval(r["pope_answers"][f], base["pope_answers"][f], truth[f])
                                     for f in truth}
    return report


def _title(report: dict) -> str:
    name = report.get("split") or Path(report.get("data", "data")).name
    seed = f", seed={report['seed']}" if "seed" in report else ""
    return f"{name} (n={report['n']}{seed})"


def _pope_files(report: dict) -> list[str]:
    return list(next(iter(report["methods"].values()))["pope"]) if report["methods"] else []


def format_table(report: dict) -> str:
    files = _pope_files(report)
    json_caps = any("valid_json" in r for r in report["methods"].values())
    head = (f"{_title(report)}{', JSON captions' if json_caps else ''}\n"
            f"{'method':<12} {'CHAIR_i':>8} {'CHAIR_s':>8} {'recall':>7} "
            + " ".join(f"{'F1 ' + s:>{max(7, len(s) + 3)}} {'acc ' + s:>{max(7, len(s) + 4)}}" for s in files)
            + (f" {'valid':>6}" if json_caps else "") + f" {'tok/s':>8}")
    lines = [head]
    for m, r in report["methods"].items():
        pope = " ".join(f"{r['pope'][s]['f1']:>{max(7, len(s) + 3)}.3f} {r['pope'][s]['accuracy']:>{max(7, len(s) + 4)}.3f}"
                        for s in files)
        valid = f" {r.get('valid_json', float('nan')):>6.3f}" if json_caps else ""
        lines.append(f"{m:<12} {r['chair_i']:>8.3f} {r['chair_s']:>8.3f} {r['recall']:>7.3f} {pope}{valid} "
                     f"{r['tokens_per_second']:>8.1f}")
    intervals = [(m, r["pope_vs_none"]) for m, r in report["methods"].items() if "pope_vs_none" in r]
    if intervals:
        lines.append("POPE F1 - none's, paired bootstrap 95% interval:")
        for m, per in intervals:
            lines.append(f"  {m:<12} " + "  ".join(f"{f} {v['diff']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]" for f, v in per.items()))
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
        (f"POPE F1 {s}", lambda r, s=s: r["pope"][s]["f1"]) for s in _pope_files(reports[0])
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
        ax.set_title(_title(rep))
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
        pope = _pope_files(rep)
        if pope:  # the last question file (ShapeWorld's: adversarial)
            ax.plot(xs, [r["pope"][pope[-1]]["f1"] for _, r in pts], "^-", label=f"POPE {pope[-1]} F1")
        ax.set_xlabel(f"{name} strength")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(_title(rep))
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
