"""Calibrate the FiSAO verifier's thresholds on scenes with ground truth (reserved seeds).

``low`` is the ``quantile`` of correct (present) objects' per-image z-scores: almost no correct object
scores below it, so a phrase below it is penalised as a likely hallucination. ``high`` is the
``1 - quantile`` of absent objects' z-scores: almost no absent object scores above it, so a phrase
above it earns a bonus. ``group_low``/``group_high`` are the same quantiles for the best score among
the phrases that share a first word (present: some object with that word is in the scene). Written to
``calibration.json`` beside the verifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from reward_models.verifier import CALIBRATION, OBJECTS, Verifier
from shapeworld.world import OBJECTS as WORLD_OBJECTS
from shapeworld.world import make_scenes, phrase

CALIBRATION_SEED = 50


def write_object_vocabulary(path: Path) -> None:
    spec = {"phrases": [phrase(o) for o in WORLD_OBJECTS], "template": "a {}"}
    (Path(path) / OBJECTS).write_text(json.dumps(spec, indent=2))


def first_word_groups(phrases: list[str]) -> np.ndarray:
    """[n_groups, n_phrases] bool: the phrases of each first word."""
    words = sorted({p.split()[0] for p in phrases})
    return np.array([[p.split()[0] == w for p in phrases] for w in words])


def present_absent_scores(verifier: Verifier, n: int, seed: int, batch: int = 128) -> dict[str, np.ndarray]:
    """Per-image z-scores of present and absent phrases, and of first-word groups (their best score)."""
    present, absent, g_present, g_absent = [], [], [], []
    index = {p: k for k, p in enumerate(verifier.phrases)}
    groups = first_word_groups(verifier.phrases)
    scenes = make_scenes("random", n // 2, seed) + make_scenes("bait", n - n // 2, seed)
    for i in tqdm(range(0, len(scenes), batch), desc="verifier scores", leave=False):
        chunk = scenes[i : i + batch]
        z = verifier.scores([s.image() for s in chunk]).numpy()
        for row, s in zip(z, chunk):
            mask = np.zeros(len(row), dtype=bool)
            mask[[index[phrase(o)] for o in s.objects]] = True
            present.append(row[mask])
            absent.append(row[~mask])
            best = np.where(groups, row[None], -np.inf).max(1)
            hit = (groups & mask[None]).any(1)
            g_present.append(best[hit])
            g_absent.append(best[~hit])
    return {k: np.concatenate(v) for k, v in
            (("present", present), ("absent", absent), ("group_present", g_present), ("group_absent", g_absent))}


def calibrate(verifier_path: Path, n: int = 1000, seed: int = CALIBRATION_SEED, quantile: float = 0.02) -> dict:
    write_object_vocabulary(verifier_path)
    v = Verifier(verifier_path)
    z = present_absent_scores(v, n, seed)
    present, absent = z["present"], z["absent"]
    cal = {
        "low": float(np.quantile(present, quantile)),
        "high": float(np.quantile(absent, 1 - quantile)),
        "group_low": float(np.quantile(z["group_present"], quantile)),
        "group_high": float(np.quantile(z["group_absent"], 1 - quantile)),
        "quantile": quantile, "n_scenes": n, "seed": seed,
        "present_mean": float(present.mean()), "absent_mean": float(absent.mean()),
        "absent_penalised": float((absent <= np.quantile(present, quantile)).mean()),
        "present_rewarded": float((present >= np.quantile(absent, 1 - quantile)).mean()),
        "group_absent_penalised": float((z["group_absent"] <= np.quantile(z["group_present"], quantile)).mean()),
        "group_present_rewarded": float((z["group_present"] >= np.quantile(z["group_absent"], 1 - quantile)).mean()),
    }
    (Path(verifier_path) / CALIBRATION).write_text(json.dumps(cal, indent=2))
    return cal
