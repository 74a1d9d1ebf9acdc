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

# The committed reward model's recipe (docs/benchmarks.md, "The forked reward model"): a fork of the VLM's top
# 2 of 4 layers, final norm and head (decoding.fork: it reads the VLM's own hidden states, so TITA costs 2
# layers and a head per step instead of a second model); DPO on pairs the verifier judged among the VLM's own
# candidates, captions (greedy, augmented view, samples, FiSAO-steered) and yes/no answers (2 questions per
# image, balanced), with a KL anchor (weight 1) to the VLM's own answers to a question per image. Tuning seed
# 60, n=150 (none: bait CHAIR_i 0.248, POPE F1 random split 0.922 / bait adversarial 0.770): captions only
# at lr 3e-4 0.106 with POPE -0.03 to -0.06; + yes/no pairs 0.099, bait adversarial +0.058 but random split
# -0.03 to -0.06; captions + anchor 0.101, POPE within 0.006; yes/no pairs + anchor 0.103, every POPE file
# -0.00 to +0.04 (this recipe).
EMBEDDED_RECIPE = RewardRecipe(pairs="verifier", fork_layers=2, images=2000, distill_images=0, dpo_lr=3e-4,
                               dpo_steps=300, questions=2, anchor=1.0)
DATA_SPLIT, DATA_IMAGES = "random", 4000  # unlabelled images of the pairs and the distillation


def train_embedded_reward(models: str | Path, seed: int = 1, recipe: RewardRecipe | None = None) -> Path:
    """Train ``models/reward`` for ``models/vlm`` with ``models/verifier`` on ShapeWorld scenes of ``seed``."""
    models = Path(models)
    recipe = replace(recipe or EMBEDDED_RECIPE, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        export(DATA_SPLIT, DATA_IMAGES, seed, tmp)
        return train_reward(models / "vlm", tmp, models / "reward", recipe, verifier=models / "verifier",
                            data_note=f"vlm-steer data shapeworld --split {DATA_SPLIT} --n {DATA_IMAGES} --seed {seed}")
