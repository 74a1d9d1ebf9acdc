"""Grounding reports: the object mentions of a generated text, each judged against the request's images by a
calibrated verifier (``decoding.verifier``), after generation.

    text -> ``MentionFinder`` (whole-word matches of the vocabulary's phrases and synonyms, longest first,
            CHAIR's matching (Rohrbach et al. 2018), with character offsets)
         -> each mentioned object's verifier score (z over the vocabulary, the best over the request's images)
         -> a verdict by the calibrated thresholds: ``suspect`` at or below ``low`` (where almost no present
            object scores), ``grounded`` at or above ``high`` (where almost no absent object scores),
            ``unsure`` between.

Counted per object (each once per text, as CHAIR_i counts a caption's objects), (suspect + unsure / 2) /
mentioned is an estimate of CHAIR_i that needs no labels: an object the verifier cannot decide on counts
as half a hallucination (suspect alone undercounts). What it can tell and what not (the verifier's own
errors; a FiSAO arm steered by the same verifier) is measured in docs/benchmarks.md ("Grounding estimate").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

WORD = re.compile(r"[^\W_]+")  # as reward_models.data._words: apostrophes and hyphens split words
VERDICTS = ("grounded", "unsure", "suspect")


@dataclass(frozen=True)
class Mention:
    object: str  # the vocabulary phrase (category) mentioned
    text: str  # the words as they appear in the text
    start: int  # character offsets into the text, [start, end)
    end: int


class MentionFinder:
    """Object mentions in text: whole-word, case-insensitive matches of each category's synonyms (the
    category's own phrase included), the longest first, so that "hot dog" is not also a "dog"."""

    def __init__(self, phrases: list[str], synonyms: dict[str, list[str]] | None = None):
        table: dict[tuple[str, ...], str] = {}
        for p in phrases:
            for s in [p, *((synonyms or {}).get(p, []))]:
                key = tuple(w.lower() for w in WORD.findall(s))
                if key:
                    table.setdefault(key, p)
        self.table = table
        self.longest = max((len(k) for k in table), default=0)

    def __call__(self, text: str) -> list[Mention]:
        """Mentions in order of appearance; offsets are Python string indices (code points) into ``text``."""
        words = list(WORD.finditer(text))
        low = [w.group().lower() for w in words]
        out, i = [], 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                name = self.table.get(tuple(low[i : i + n]))
                if name is not None:
                    start, end = words[i].start(), words[i + n - 1].end()
                    out.append(Mention(name, text[start:end], start, end))
                    i += n
                    break
            else:
                i += 1
        return out


def verdict(score: float, low: float, high: float) -> str:
    return "suspect" if score <= low else "grounded" if score >= high else "unsure"


def report(text: str, scores: dict[str, float], finder: MentionFinder, low: float, high: float) -> dict:
    """The ``grounding`` block of one generated text: every mention (phrase, offsets, score, verdict) and the
    counts, per mention and per distinct object (``objects``, ``suspect_objects``: what the metrics count).
    ``scores``: object -> verifier score for the request's images."""
    mentions = []
    for m in finder(text):
        s = float(scores[m.object])
        mentions.append({"object": m.object, "text": m.text, "start": m.start, "end": m.end, "score": round(s, 4),
                         "verdict": verdict(s, low, high)})
    per_object = {m["object"]: m["verdict"] for m in mentions}
    counts = {"mentions": len(mentions), **{v: sum(m["verdict"] == v for m in mentions) for v in VERDICTS},
              "objects": len(per_object), "suspect_objects": sum(v == "suspect" for v in per_object.values()),
              "unsure_objects": sum(v == "unsure" for v in per_object.values())}
    return {"mentions": mentions, "counts": counts}


class Judge:
    """A calibrated verifier used after generation: per request, its image scores (``scores``, once), then
    a report per generated text (``report``). ``verifier``: a ``decoding.verifier.Verifier`` with a
    calibration; its objects.json may carry ``synonyms`` (category -> words) for the mention matching."""

    def __init__(self, verifier):
        if not verifier.calibrated:
            raise ValueError(f"the grounding verifier at {verifier.path} has no calibration: run `vlm-steer train calibrate`")
        self.verifier = verifier
        self.low, self.high = float(verifier.calibration["low"]), float(verifier.calibration["high"])
        self.finder = MentionFinder(verifier.phrases, verifier.synonyms)

    @torch.inference_mode()
    def scores(self, images: list) -> dict[str, float]:
        """object -> z-score for a request's images (the best over them: an object shown in any image is
        grounded). Shape: one float per vocabulary phrase."""
        z = self.verifier.scores(images).amax(0).tolist()
        return dict(zip(self.verifier.phrases, z))

    @torch.inference_mode()
    def scores_batch(self, requests: list[list]) -> list[dict[str, float]]:
        """``scores`` for several requests in one verifier pass over all their images (concurrent requests
        judged together: one tower call instead of one per request)."""
        z = self.verifier.scores([im for images in requests for im in images])
        out, at = [], 0
        for images in requests:
            out.append(dict(zip(self.verifier.phrases, z[at : at + len(images)].amax(0).tolist())))
            at += len(images)
        return out

    def report(self, text: str, scores: dict[str, float]) -> dict:
        return report(text, scores, self.finder, self.low, self.high)
