"""Calibrate the FiSAO verifier's thresholds on scenes with ground truth (reserved seeds).

``low`` is the ``quantile`` of correct (present) objects' per-image z-scores: almost no correct object
scores below it, so a phrase below it is penalised as a likely hallucination. ``high`` is the
``1 - quantile`` of absent objects' z-scores: almost no absent object scores above it, so a phrase
above it earns a bonus. Written to ``calibration.json`` beside the verifier.
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


def present_absent_scores(verifier: Verifier, n: int, seed: int, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    present, absent = [], []
    index = {p: k for k, p in enumerate(verifier.phrases)}
    scenes = make_scenes("random", n // 2, seed) + make_scenes("bait", n - n // 2, seed)
    for i in tqdm(range(0, len(scenes), batch), desc="verifier scores", leave=False):
        chunk = scenes[i : i + batch]
        z = verifier.scores([s.image() for s in chunk]).numpy()
        for row, s in zip(z, chunk):
            mask = np.zeros(len(row), dtype=bool)
            mask[[index[phrase(o)] for o in s.objects]] = True
            present.append(row[mask])
            absent.append(row[~mask])
    return np.concatenate(present), np.concatenate(absent)


def calibrate(verifier_path: Path, n: int = 1000, seed: int = CALIBRATION_SEED, quantile: float = 0.02) -> dict:
    write_object_vocabulary(verifier_path)
    v = Verifier(verifier_path)
    present, absent = present_absent_scores(v, n, seed)
    cal = {
        "low": float(np.quantile(present, quantile)),
        "high": float(np.quantile(absent, 1 - quantile)),
        "quantile": quantile, "n_scenes": n, "seed": seed,
        "present_mean": float(present.mean()), "absent_mean": float(absent.mean()),
        "absent_penalised": float((absent <= np.quantile(present, quantile)).mean()),
        "present_rewarded": float((present >= np.quantile(absent, 1 - quantile)).mean()),
    }
    (Path(verifier_path) / CALIBRATION).write_text(json.dumps(cal, indent=2))
    return cal
