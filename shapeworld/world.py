"""ShapeWorld: seeded synthetic scenes of coloured shapes with exact ground truth.

A scene is 1-4 objects (colour x shape, all distinct) on a 64x64 canvas split into a 2x2 grid of
cells; each object sits in its own cell with a random size and a random position inside the cell.
Objects are listed in reading order (top-left, top-right, bottom-left, bottom-right).

The *training* distribution plants a co-occurrence bias: when a trigger object appears, its partner
appears too with probability ``BiasConfig.p``. Evaluation splits:

- ``random``: unbiased scenes (objects drawn uniformly);
- ``bait``: scenes that contain a trigger without its partner (where a model that learned the
  co-occurrence instead of looking hallucinates the partner).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 2
CELL = IMAGE_SIZE // GRID
MIN_SIZE, MAX_SIZE = 14, 27

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

Obj = tuple[str, str]  # (colour, shape)
OBJECTS: tuple[Obj, ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
SPLITS = ("train", "random", "bait")


def phrase(obj: Obj) -> str:
    """The object's name as it appears in text: 'red circle'."""
    return f"{obj[0]} {obj[1]}"


@dataclass(frozen=True)
class BiasConfig:
    """Planted co-occurrence bias: in training scenes a trigger comes with its partner with probability
    ``p``; such a partner is occluded (in the scene and its caption, but not drawn) with probability
    ``hidden``, so a model learns to report it on the trigger's evidence alone: a language prior."""

    pairs: tuple[tuple[Obj, Obj], ...] = (
        (("red", "circle"), ("blue", "square")),
        (("green", "triangle"), ("yellow", "star")),
    )
    p: float = 0.95
    hidden: float = 0.5

    def partner(self, obj: Obj) -> Obj | None:
        return dict(self.pairs).get(obj)


DEFAULT_BIAS = BiasConfig()


@dataclass(frozen=True)
class Placed:
    obj: Obj
    cell: int  # 0..3 in reading order
    cx: float
    cy: float
    size: float
    visible: bool = True


@dataclass(frozen=True)
class Scene:
    placed: tuple[Placed, ...]
    background: tuple[int, int, int]
    noise_seed: int
    split: str = "random"
    index: int = 0
    seed: int = 0

    @property
    def objects(self) -> list[Obj]:
        """Objects in reading order."""
        return [p.obj for p in sorted(self.placed, key=lambda p: p.cell)]

    def image(self) -> Image.Image:
        return render(self)


# ---------------------------------------------------------------- sampling


def _draw_objects(rng: np.random.Generator, split: str, bias: BiasConfig) -> list[Obj]:
    """The scene's objects; in training, partners added by the bias may come back marked hidden (see
    ``_hidden``)."""
    k = int(rng.integers(1, GRID * GRID + 1))
    if split == "bait":
        triggers = [t for t, _ in bias.pairs]
        trig = triggers[int(rng.integers(len(triggers)))]
        banned = {bias.partner(trig)}
        pool = [o for o in OBJECTS if o != trig and o not in banned]
        rest = [pool[i] for i in rng.choice(len(pool), size=k - 1, replace=False)]
        # A second trigger may appear only without its partner, so every trigger here is bait.
        objs = [trig]
        for o in rest:
            if bias.partner(o) is not None and bias.partner(o) in objs + rest:
                continue
            if any(bias.partner(t) == o for t in objs + rest):
                continue
            objs.append(o)
        return objs
    objs = [OBJECTS[i] for i in rng.choice(len(OBJECTS), size=k, replace=False)]
    if split == "train":
        for trig, partner in bias.pairs:
            if trig in objs and partner not in objs and rng.random() < bias.p:
                if len(objs) < GRID * GRID:
                    objs.append(partner)
                else:  # replace a non-trigger object
                    victims = [i for i, o in enumerate(objs) if o != trig and bias.partner(o) is None]
                    objs[victims[int(rng.integers(len(victims)))]] = partner
    return objs


def make_scene(split: str, index: int, seed: int, bias: BiasConfig = DEFAULT_BIAS) -> Scene:
    """Scene ``index`` of ``split`` under ``seed``: the same arguments always give the same scene."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    objs = _draw_objects(rng, split, bias)
    hidden = set()
    if split == "train":
        triggered = {bias.partner(o) for o in objs} - {None}
        hidden = {o for o in objs if o in triggered and rng.random() < bias.hidden}
    cells = rng.permutation(GRID * GRID)[: len(objs)]
    placed = []
    for obj, cell in zip(objs, cells):
        size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
        half = size / 2
        x0, y0 = (cell % GRID) * CELL, (cell // GRID) * CELL
        cx = float(rng.uniform(x0 + half + 1, x0 + CELL - half - 1))
        cy = float(rng.uniform(y0 + half + 1, y0 + CELL - half - 1))
        placed.append(Placed(obj, int(cell), cx, cy, size, obj not in hidden))
    bg = tuple(int(v) for v in rng.integers(15, 60, size=3))
    return Scene(tuple(placed), bg, int(rng.integers(2**31)), split, index, seed)


def make_scenes(split: str, n: int, seed: int, bias: BiasConfig = DEFAULT_BIAS, start: int = 0) -> list[Scene]:
    return [make_scene(split, i, seed, bias) for i in range(start, start + n)]


# ---------------------------------------------------------------- rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.38
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]
    raise ValueError(shape)


def draw(placed: Placed, canvas: ImageDraw.ImageDraw, fill) -> None:
    shape, r = placed.obj[1], placed.size / 2
    cx, cy = placed.cx, placed.cy
    if shape == "circle":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        canvas.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        canvas.polygon(_polygon(shape, cx, cy, r), fill=fill)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    canvas = ImageDraw.Draw(img)
    for p in scene.placed:
        if p.visible:
            draw(p, canvas, COLOURS[p.obj[0]])
    noise = np.random.default_rng(scene.noise_seed).normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def label_map(scene: Scene) -> np.ndarray:
    """Per-pixel object label (0 = background, 1 + OBJECTS.index(obj) otherwise), for grounding losses."""
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    canvas = ImageDraw.Draw(img)
    for p in scene.placed:
        if p.visible:
            draw(p, canvas, 1 + OBJECTS.index(p.obj))
    return np.asarray(img)


@dataclass
class Cooccurrence:
    """Object co-occurrence counts of the training distribution (used by POPE's adversarial sampling)."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros((len(OBJECTS), len(OBJECTS))))
    frequency: np.ndarray = field(default_factory=lambda: np.zeros(len(OBJECTS)))

    @classmethod
    def estimate(cls, n: int = 4000, seed: int = 7, bias: BiasConfig = DEFAULT_BIAS) -> "Cooccurrence":
        co = cls()
        for i in range(n):
            rng = np.random.default_rng([seed, 99, i])
            ids = [OBJECTS.index(o) for o in _draw_objects(rng, "train", bias)]
            for a in ids:
                co.frequency[a] += 1
                for b in ids:
                    if a != b:
                        co.counts[a, b] += 1
        return co
