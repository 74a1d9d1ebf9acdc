"""Verifier scores of the objects the base model mentions, correct vs hallucinated (FiSAO Fig. 1 style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from decoding.request import GenerationRequest, SamplingParams
from shapeworld.text import CAPTION_PROMPT, parse_objects
from shapeworld.world import make_scenes, phrase


def mentioned_object_scores(engine, verifier, n: int, seed: int, batch: int = 32) -> dict[str, list[float]]:
    scenes = make_scenes("random", n // 2, seed) + make_scenes("bait", n - n // 2, seed)
    index = {p: k for k, p in enumerate(verifier.phrases)}
    out = {"correct": [], "hallucinated": []}
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        images = [s.image() for s in chunk]
        caps = engine.generate([GenerationRequest.single_turn(CAPTION_PROMPT, [im], sampling=SamplingParams(max_tokens=40))
                                for im in images], max_batch=batch)
        z = verifier.scores(images).numpy()
        for s, c, row in zip(chunk, caps, z):
            for o in set(parse_objects(c.text)):
                out["correct" if o in s.objects else "hallucinated"].append(float(row[index[phrase(o)]]))
    return out


def plot_scores(scores: dict[str, list[float]], calibration: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(min(v) for v in scores.values() if v) - 0.2, max(max(v) for v in scores.values() if v) + 0.2, 40)
    for name, colour in (("correct", "tab:green"), ("hallucinated", "tab:red")):
        if scores[name]:
            ax.hist(scores[name], bins=bins, alpha=0.6, density=True, color=colour,
                    label=f"{name} object tokens (n={len(scores[name])})")
    if calibration:
        ax.axvline(calibration["low"], color="k", ls="--", label="penalty below")
        ax.axvline(calibration["high"], color="k", ls=":", label="bonus above")
    ax.set_xlabel("verifier score (z over the object vocabulary)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title("FiSAO verifier: mentioned objects of the base model")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
