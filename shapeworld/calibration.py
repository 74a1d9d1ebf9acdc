"""The embedded verifier's calibration: ShapeWorld scenes of reserved seed 50 (half random, half bait),
exported as data sets and passed to the generic ``reward_models.calibrate``."""

from __future__ import annotations

import tempfile
from pathlib import Path

from reward_models.calibrate import calibrate
from shapeworld.export import export

CALIBRATION_SEED = 50


def calibrate_shapeworld(verifier_path: Path, n: int = 1000, seed: int = CALIBRATION_SEED, quantile: float = 0.02) -> dict:
    with tempfile.TemporaryDirectory(prefix="shapeworld-calibration-") as d:
        dirs = [export("random", n // 2, seed, Path(d) / "random"), export("bait", n - n // 2, seed, Path(d) / "bait")]
        return calibrate(verifier_path, dirs, quantile=quantile, meta={
            "n_scenes": n, "seed": seed, "data": f"shapeworld random+bait n={n} seed={seed}", "vocabulary": "shapeworld"})
