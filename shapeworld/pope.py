"""POPE-style yes/no question sets (Li et al. 2023): per scene, its present objects as positives and as
many absent objects as negatives, drawn three ways: ``random`` (uniform), ``popular`` (the most
frequent objects of the training distribution) and ``adversarial`` (the objects that co-occur most
with the present ones in training: the planted partners first)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from shapeworld.world import OBJECTS, Cooccurrence, Obj, Scene

SAMPLINGS = ("random", "popular", "adversarial")
MAX_POSITIVES = 3


@dataclass(frozen=True)
class PopeQuestion:
    scene_index: int
    obj: Obj
    answer: bool  # True: the object is in the scene


@lru_cache(maxsize=1)
def training_statistics() -> Cooccurrence:
    return Cooccurrence.estimate()


def questions_for(scene: Scene, sampling: str, stats: Cooccurrence | None = None) -> list[PopeQuestion]:
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown POPE sampling {sampling!r}")
    stats = stats or training_statistics()
    rng = np.random.default_rng([scene.seed, scene.index, SAMPLINGS.index(sampling), 17])
    present = scene.objects
    positives = [present[i] for i in sorted(rng.permutation(len(present))[:MAX_POSITIVES])]
    absent = [i for i in range(len(OBJECTS)) if OBJECTS[i] not in present]
    k = len(positives)
    if sampling == "random":
        chosen = list(rng.choice(absent, size=k, replace=False))
    else:
        if sampling == "popular":
            score = stats.frequency[absent]
        else:
            rows = [OBJECTS.index(o) for o in present]
            score = stats.counts[np.ix_(rows, absent)].sum(0)
        jitter = rng.random(len(absent)) * 1e-6  # break ties at random, deterministically
        chosen = [absent[j] for j in np.argsort(-(score + jitter))[:k]]
    return [PopeQuestion(scene.index, o, True) for o in positives] + [
        PopeQuestion(scene.index, OBJECTS[i], False) for i in chosen
    ]
