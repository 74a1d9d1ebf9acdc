"""The quality benchmark on ShapeWorld scenes: each split is exported as a data set in the field's formats
(``shapeworld.export``) and scored by the generic benchmark (``bench.quality``), so the generic
path is the tested path."""

from __future__ import annotations

import tempfile

from reward_models.data import DataSet
from bench.quality import format_table, plot_quality, plot_sweep, write_json  # noqa: F401 (re-exported)
from bench.quality import run_quality as run_on_data
from shapeworld.export import export

# Seeds the embedded models were trained or calibrated on; evaluation must use others.
RESERVED_SEEDS = frozenset(range(0, 100)) | {500}


def run_quality(engine, split: str, n: int, seed: int, methods: list[str], strengths: dict | None = None,
                batch: int = 32, sweep: tuple[str, list[float]] | None = None, captions: str = "text") -> dict:
    """``bench.quality.run_quality`` on ``n`` scenes of a split (exported to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix=f"shapeworld-{split}-") as d:
        data = DataSet.load(export(split, n, seed, d))
        rep = run_on_data(engine, data, methods, strengths, batch, sweep, meta={"split": split, "seed": seed},
                          captions=captions)
    rep["data"] = f"shapeworld:{split}:n={n}:seed={seed}"
    return rep
