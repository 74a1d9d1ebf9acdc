"""The FiSAO verifier: the VLM's own CLIP (vision tower + paired text tower) scoring object phrases.

Per image, once: the cosine between the image embedding and every phrase of an object vocabulary
(text embeddings cached at start-up), normalised per image (z-scores over the vocabulary), turned into
rewards by two thresholds calibrated on data with ground truth (``calibration.json`` beside the
weights): +1 above ``high`` (where correct objects score), -1 below ``low`` (where hallucinated ones
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
from transformers import AutoProcessor, CLIPModel

CALIBRATION = "calibration.json"
OBJECTS = "objects.json"


class Verifier:
    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(self.path).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(self.path)
        spec = json.loads((self.path / OBJECTS).read_text())
        self.phrases: list[str] = spec["phrases"]
        self.template: str = spec.get("template", "{}")
        cal = self.path / CALIBRATION
        self.calibration = json.loads(cal.read_text()) if cal.exists() else None
        with torch.inference_mode():
            t = self.processor.tokenizer([self.template.format(p) for p in self.phrases], return_tensors="pt", padding=True)
            out = self.model.text_model(input_ids=t.input_ids.to(self.device), attention_mask=t.attention_mask.to(self.device))
            self.text = F.normalize(self.model.text_projection(out.pooler_output), dim=-1)

    @torch.inference_mode()
    def scores_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """[n_images, n_phrases] from the vision tower's pooled outputs [n_images, hidden]."""
        proj = self.model.visual_projection
        img = F.normalize(proj(pooled.to(self.device, proj.weight.dtype)), dim=-1)
        s = img @ self.text.T
        return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-6)

    @torch.inference_mode()
    def scores(self, images: list[Image.Image]) -> torch.Tensor:
        """[n_images, n_phrases] cosine scores, z-normalised per image."""
        px = self.processor.image_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return self.scores_from_pooled(self.model.vision_model(pixel_values=px).pooler_output)

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
