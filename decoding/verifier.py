"""The FiSAO verifier: an image-text dual encoder (CLIP, SigLIP, SigLIP2: any model ``transformers``'
``AutoModel`` loads with ``get_image_features``/``get_text_features``) scoring object phrases.

Three pieces, each a file a user can bring or build:
- the dual encoder, a hub-shaped folder (config, weights, processor). When the VLM's own vision tower has
  a paired text tower (LLaVA-1.5's CLIP) this is FiSAO's "own vision encoder"; otherwise any dual encoder.
- the object vocabulary, ``objects.json`` (``{"phrases": [...], "template": "a {}", "synonyms": {phrase:
  [words that mention it]}}``, synonyms optional: what grounding reports match), beside the weights by
  default (``vocabulary=`` to name another file);
- the calibration, ``calibration.json`` (thresholds ``low``/``high`` and ``group_low``/``group_high``), beside
  the weights by default (``calibration=``), written by ``vlm-steer train calibrate``. Without it the
  verifier can score but not reward: FiSAO is not offered.

Per image, once: the cosine between the image embedding and every phrase (text embeddings cached at
start-up), normalised per image (z-scores over the vocabulary), turned into rewards by the calibrated
thresholds: +1 above ``high`` (where correct objects score), -1 below ``low`` (where hallucinated ones
score), 0 between. A token that only starts phrases (the colour word of "red circle") is judged by the
best score among the phrases it starts, against thresholds calibrated for that maximum
(``group_low``/``group_high``): a maximum over several absent phrases runs higher than one absent
phrase's score.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor

CALIBRATION = "calibration.json"
OBJECTS = "objects.json"


def _features(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns the projected embeds there


class Verifier:
    def __init__(self, path: str | Path, device: str = "cpu", vocabulary: str | Path | None = None,
                 calibration: str | Path | None = None, weights: bool = True, dtype: torch.dtype | str = torch.float32):
        """``weights=False``: the vocabulary and calibration only (what a process that only routes
        requests needs to know), no model. ``dtype``: the weights' (bfloat16 beside a bfloat16 VLM on a GPU:
        half the memory of float32; the scores are z-normalised cosines, compared with the calibration's
        thresholds in float32)."""
        self.path = Path(path)
        self.device = torch.device(device)
        self._files(vocabulary, calibration)
        if not weights:
            self.model = None
            return
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = AutoModel.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ValueError(f"the verifier at {self.path} is a {type(self.model).__name__}, not an image-text dual "
                             "encoder (CLIP, SigLIP, ...)")
        self.processor = AutoProcessor.from_pretrained(self.path)
        # CLIP pools its tower's output and projects it: a VLM with the same tower can hand over its pooled output
        self.pools_like_clip = hasattr(self.model, "visual_projection") and hasattr(self.model, "vision_model")
        siglip = "siglip" in self.model.config.model_type  # trained on max-length padded text
        pad = ({"padding": "max_length", "max_length": self.model.config.text_config.max_position_embeddings}
               if siglip else {"padding": True})
        with torch.inference_mode():
            t = self.processor.tokenizer([self.template.format(p) for p in self.phrases], return_tensors="pt",
                                         truncation=True, **pad)
            self.text = F.normalize(_features(self.model.get_text_features(**t.to(self.device))).float(), dim=-1)

    def _files(self, vocabulary, calibration) -> None:
        self.vocabulary_path = Path(vocabulary) if vocabulary else self.path / OBJECTS
        if not self.vocabulary_path.exists():
            raise FileNotFoundError(f"no object vocabulary for the verifier at {self.path}: {self.vocabulary_path} "
                                    'does not exist (a JSON file {"phrases": [...], "template": "a {}"})')
        spec = json.loads(self.vocabulary_path.read_text())
        self.phrases: list[str] = spec["phrases"]
        self.template: str = spec.get("template", "{}")
        self.synonyms: dict[str, list[str]] = spec.get("synonyms", {})  # phrase -> the words that mention it
        self.calibration_path = Path(calibration) if calibration else self.path / CALIBRATION
        if calibration and not self.calibration_path.exists():
            raise FileNotFoundError(f"verifier calibration {self.calibration_path} does not exist")
        self.calibration = json.loads(self.calibration_path.read_text()) if self.calibration_path.exists() else None

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @torch.inference_mode()
    def scores_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """[n_images, n_phrases] from the vision tower's pooled outputs [n_images, hidden]."""
        proj = self.model.visual_projection
        img = F.normalize(proj(pooled.to(self.device, proj.weight.dtype)).float(), dim=-1)
        return self._z(img @ self.text.T)

    @torch.inference_mode()
    def scores(self, images: list[Image.Image]) -> torch.Tensor:
        """[n_images, n_phrases] cosine scores, z-normalised per image."""
        px = self.processor.image_processor(images=images, return_tensors="pt").to(self.device, self.model.dtype)
        img = F.normalize(_features(self.model.get_image_features(**px)).float(), dim=-1)
        return self._z(img @ self.text.T)

    @staticmethod
    def _z(s: torch.Tensor) -> torch.Tensor:
        return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-6)

    def reward(self, z: torch.Tensor, group: bool | torch.Tensor = False) -> torch.Tensor:
        """Scores to rewards in {-1, 0, +1}: phrase thresholds, or (where ``group``) the thresholds for
        the best score of a group of phrases sharing a first word."""
        if self.calibration is None:
            raise RuntimeError(f"verifier at {self.path} has no {CALIBRATION}: run `vlm-steer train calibrate`")
        c = self.calibration
        group = torch.as_tensor(group)
        high = torch.where(group, c.get("group_high", c["high"]), c["high"])
        low = torch.where(group, c.get("group_low", c["low"]), c["low"])
        return (z >= high).float() - (z <= low).float()

    def rewards(self, images: list[Image.Image]) -> torch.Tensor:
        """[n_images, n_phrases] phrase rewards in {-1, 0, +1}."""
        return self.reward(self.scores(images))
