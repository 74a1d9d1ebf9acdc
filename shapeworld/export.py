"""ShapeWorld as a data set in the field's formats (`vlm-steer data shapeworld`): scenes as PNG images,
their objects as COCO instances, their true captions as COCO captions, POPE question files for the three
samplings, the world's vocabulary and caption prompt (``reward_models.data`` reads it back)."""

from __future__ import annotations

from pathlib import Path

from reward_models.data import Vocabulary, write_dataset
from shapeworld.pope import SAMPLINGS, questions_for
from shapeworld.text import CAPTION_PROMPT, QUESTION, caption, question
from shapeworld.world import OBJECTS, make_scenes, phrase


def vocabulary() -> Vocabulary:
    """The 36 (colour, shape) phrases; a verifier scores "a red circle"."""
    return Vocabulary.from_names([phrase(o) for o in OBJECTS], template="a {}")


def export(split: str, n: int, seed: int, out: str | Path) -> Path:
    scenes = make_scenes(split, n, seed)
    files = [f"{split}_{seed}_{s.index:05d}.png" for s in scenes]
    pope = {name: [{"image": files[k], "text": question(q.obj), "label": q.answer}
                   for k, s in enumerate(scenes) for q in questions_for(s, name)] for name in SAMPLINGS}
    return write_dataset(out, [(f, s.image()) for f, s in zip(files, scenes)], [[phrase(o) for o in s.objects] for s in scenes],
                         [[caption(s.objects)] for s in scenes], vocabulary(), pope, prompts={"caption": CAPTION_PROMPT, "question": QUESTION})
