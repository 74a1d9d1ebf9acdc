"""Scenes as training tensors: rendered pixels, per-patch object labels, multi-hot object sets."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from shapeworld.world import IMAGE_SIZE, OBJECTS, Scene, label_map, render


def render_all(scenes: list[Scene], desc: str = "render") -> np.ndarray:
    """uint8 [N, 64, 64, 3]."""
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, s in enumerate(tqdm(scenes, desc=desc, leave=False, mininterval=2)):
        out[i] = np.asarray(render(s))
    return out


def patch_labels(scenes: list[Scene], patch: int) -> np.ndarray:
    """int64 [N, P]: the object covering most of each patch (0 = background, 1 + OBJECTS index)."""
    g = IMAGE_SIZE // patch
    out = np.zeros((len(scenes), g * g), dtype=np.int64)
    for i, s in enumerate(scenes):
        lab = label_map(s).reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
        fg = (lab > 0).mean(1)
        mode = np.where(lab.max(1) > 0, lab.max(1), 0)  # objects never overlap, so a patch has one id
        out[i] = np.where(fg >= 0.2, mode, 0)
    return out


def multi_hot(scenes: list[Scene]) -> np.ndarray:
    """float32 [N, |OBJECTS|]."""
    out = np.zeros((len(scenes), len(OBJECTS)), dtype=np.float32)
    for i, s in enumerate(scenes):
        for o in s.objects:
            out[i, OBJECTS.index(o)] = 1.0
    return out
