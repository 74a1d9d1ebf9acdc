"""Hallucination metrics over any object vocabulary: CHAIR (Rohrbach et al. 2018) and object recall for
captions, POPE's scores (Li et al. 2023) for yes/no answers."""

from __future__ import annotations

import numpy as np

from collections.abc import Hashable, Iterable


def chair(mentioned: list[Iterable[Hashable]], truth: list[Iterable[Hashable]]) -> dict[str, float]:
    """CHAIR_i = hallucinated objects / mentioned objects, CHAIR_s = captions with a hallucination /
    captions, recall = mentioned true objects / true objects. Objects are counted once per caption
    (as in CHAIR, which works on each caption's set of mentioned objects)."""
    n_mentioned = n_halluc = n_bad_captions = n_true = n_found = 0
    for said, real in zip(mentioned, truth, strict=True):
        said_set, real_set = set(said), set(real)
        bad = said_set - real_set
        n_mentioned += len(said_set)
        n_halluc += len(bad)
        n_bad_captions += bool(bad)
        n_true += len(real_set)
        n_found += len(said_set & real_set)
    return {
        "chair_i": n_halluc / n_mentioned if n_mentioned else 0.0,
        "chair_s": n_bad_captions / len(truth) if truth else 0.0,
        "recall": n_found / n_true if n_true else 0.0,
    }


def binary_scores(predicted_yes: list[bool], truth_yes: list[bool]) -> dict[str, float]:
    """POPE's numbers: accuracy, precision, recall, F1 (positive = 'yes') and the share of yes answers."""
    pairs = list(zip(predicted_yes, truth_yes, strict=True))
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    fn = sum(t and not p for p, t in pairs)
    tn = sum(not p and not t for p, t in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
    }


def f1_difference_interval(a_yes: list[bool], b_yes: list[bool], truth_yes: list[bool], draws: int = 2000,
                           seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Paired bootstrap of F1(a) - F1(b) on the same questions: questions are resampled with replacement,
    both methods' answers to a question stay together (Efron & Tibshirani 1993, percentile interval).
    Returns ``{"diff", "lo", "hi"}`` (F1 points, the interval at ``level``)."""
    a, b, t = (np.asarray(x, dtype=bool) for x in (a_yes, b_yes, truth_yes))
    if not (len(a) == len(b) == len(t)) or not len(t):
        raise ValueError("the paired bootstrap needs both methods' answers to the same, non-empty questions")
    idx = np.random.default_rng(seed).integers(0, len(t), size=(draws, len(t)))

    def f1(pred, truth):  # per draw: 2 tp / (2 tp + fp + fn)
        tp = (pred & truth).sum(-1)
        wrong = (pred != truth).sum(-1)
        return np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0)

    diffs = f1(a[idx], t[idx]) - f1(b[idx], t[idx])
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(f1(a, t) - f1(b, t)), "lo": float(lo), "hi": float(hi)}


def answer_is_yes(text: str) -> bool | None:
    """True for an answer that starts with yes, False for no, None otherwise (POPE's parsing)."""
    words = text.strip().lower().split()
    if not words:
        return None
    first = words[0].strip(".,!?")
    return True if first == "yes" else False if first == "no" else None
