"""The embedded TITA reward model, built the way a user builds one for their own model: ShapeWorld scenes
exported in the field's formats (`vlm-steer data shapeworld`), then the generic trainer
(``reward_models.train_reward``) with the embedded VLM as target and the embedded, calibrated verifier as
the judge of the target's own answers: no ground-truth label reaches the preference pairs."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from reward_models.train_reward import RewardRecipe, train_reward
from shapeworld.export import export

# The committed reward model's recipe (README, "Measured"): a 3-layer copy of the 4-layer VLM, distilled on
# its own outputs, DPO on pairs the verifier judged.
EMBEDDED_RECIPE = RewardRecipe(pairs="verifier", init_layers=3)
DATA_SPLIT, DATA_IMAGES = "random", 4000  # unlabelled images of the pairs and the distillation


def train_embedded_reward(models: str | Path, seed: int = 1, recipe: RewardRecipe | None = None) -> Path:
    """Train ``models/reward`` for ``models/vlm`` with ``models/verifier`` on ShapeWorld scenes of ``seed``."""
    models = Path(models)
    recipe = replace(recipe or EMBEDDED_RECIPE, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        export(DATA_SPLIT, DATA_IMAGES, seed, tmp)
        return train_reward(models / "vlm", tmp, models / "reward", recipe, verifier=models / "verifier",
                            data_note=f"vlm-steer data shapeworld --split {DATA_SPLIT} --n {DATA_IMAGES} --seed {seed}")
