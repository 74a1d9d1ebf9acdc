"""Calibrate the FiSAO verifier's thresholds on labelled images of any data set (``reward_models.data``),
held out from evaluation.

``low`` is the ``quantile`` of correct (present) objects' per-image z-scores: almost no correct object
scores below it, so a phrase below it is penalised as a likely hallucination. ``high`` is the
``1 - quantile`` of absent objects' z-scores: almost no absent object scores above it, so a phrase
above it earns a bonus. ``group_low``/``group_high`` are the same quantiles for the best score among
the phrases that share a first word (present: some object with that word is in the image). Written to
``calibration.json`` beside the verifier, with the vocabulary (``objects.json``) it was calibrated for.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from reward_models.data import DataError, DataSet, Vocabulary
from decoding.verifier import CALIBRATION, OBJECTS, Verifier


def first_word_groups(phrases: list[str]) -> np.ndarray:
    """[n_groups, n_phrases] bool: the phrases of each first word."""
    words = sorted({p.split()[0] for p in phrases})
    return np.array([[p.split()[0] == w for p in phrases] for w in words])


def present_absent_scores(verifier: Verifier, data: list[DataSet], batch: int = 128) -> dict[str, np.ndarray]:
    """Per-image z-scores of present and absent phrases, and of first-word groups (their best score)."""
    present, absent, g_present, g_absent = [], [], [], []
    index = {p: k for k, p in enumerate(verifier.phrases)}
    groups = first_word_groups(verifier.phrases)
    items = [(d, i) for d in data for i in d.image_ids]
    for s in tqdm(range(0, len(items), batch), desc="verifier scores", leave=False):
        chunk = items[s : s + batch]
        z = verifier.scores([d.image(i) for d, i in chunk]).numpy()
        for row, (d, i) in zip(z, chunk):
            mask = np.zeros(len(row), dtype=bool)
            mask[[index[o] for o in d.objects[i] if o in index]] = True
            present.append(row[mask])
            absent.append(row[~mask])
            best = np.where(groups, row[None], -np.inf).max(1)
            hit = (groups & mask[None]).any(1)
            g_present.append(best[hit])
            g_absent.append(best[~hit])
    return {k: np.concatenate(v) for k, v in
            (("present", present), ("absent", absent), ("group_present", g_present), ("group_absent", g_absent))}


def calibrate(verifier_path: Path, data_dirs: list[str | Path], vocabulary: str | Path | None = None,
              quantile: float = 0.02, meta: dict | None = None) -> dict:
    """Thresholds for the verifier at ``verifier_path`` from the labelled images of ``data_dirs``; the
    vocabulary (a ``vocabulary.json``; default: the first data set's) becomes the verifier's ``objects.json``."""
    data = [DataSet.load(d) for d in data_dirs]
    vocab = Vocabulary.load(vocabulary) if vocabulary else data[0].vocabulary
    labelled = {o for d in data for objs in d.objects.values() for o in objs}
    if not labelled & set(vocab.names):
        raise DataError(f"no category of the vocabulary ({len(vocab.names)} phrases) is labelled in the data sets "
                        f"{[str(d.root) for d in data]}: nothing to calibrate on")
    with tempfile.TemporaryDirectory() as tmp:  # the verifier's files change only once calibration succeeded
        (Path(tmp) / OBJECTS).write_text(json.dumps(vocab.verifier_spec(), indent=2))
        v = Verifier(verifier_path, vocabulary=Path(tmp) / OBJECTS, calibration=None)
        z = present_absent_scores(v, data)
    present, absent = z["present"], z["absent"]
    if not len(present) or not len(absent) or not len(z["group_present"]) or not len(z["group_absent"]):
        raise DataError("the data sets need images where vocabulary objects are present and absent")
    cal = {
        "low": float(np.quantile(present, quantile)),
        "high": float(np.quantile(absent, 1 - quantile)),
        "group_low": float(np.quantile(z["group_present"], quantile)),
        "group_high": float(np.quantile(z["group_absent"], 1 - quantile)),
        "quantile": quantile, "n_images": sum(len(d.image_ids) for d in data),
        "data": [str(d.root) for d in data], "vocabulary": str(vocabulary) if vocabulary else "the data set's",
        **(meta or {}),
        "present_mean": float(present.mean()), "absent_mean": float(absent.mean()),
        "absent_penalised": float((absent <= np.quantile(present, quantile)).mean()),
        "present_rewarded": float((present >= np.quantile(absent, 1 - quantile)).mean()),
        "group_absent_penalised": float((z["group_absent"] <= np.quantile(z["group_present"], quantile)).mean()),
        "group_present_rewarded": float((z["group_present"] >= np.quantile(z["group_absent"], 1 - quantile)).mean()),
    }
    (Path(verifier_path) / OBJECTS).write_text(json.dumps(vocab.verifier_spec(), indent=2))
    (Path(verifier_path) / CALIBRATION).write_text(json.dumps(cal, indent=2))
    return cal
