"""Train the verifier: a tiny CLIPModel whose vision tower becomes the VLM's (frozen) vision tower.

Losses: a sigmoid (SigLIP-style) contrastive loss between images and every object phrase
("a red circle") with the scene's exact object set as positives, the usual CLIP InfoNCE loss between
images and their captions, and a per-patch grounding loss on the features LLaVA reads (the
penultimate layer), so colour-shape binding survives in the patch tokens. The grounding head is
discarded after training; what is saved is a plain CLIPModel.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import trange
from transformers import CLIPModel

from shapeworld.data import multi_hot, patch_labels, render_all
from shapeworld.models import (
    MODELS_DIR, VisionShape, build_tokenizer, count_parameters, pixels_to_tensor, save_verifier,
    verifier_config,
)
from shapeworld.text import caption
from shapeworld.world import OBJECTS, make_scenes, phrase
from shapeworld.train_utils import optimizer_step


@dataclass
class VerifierTrainConfig:
    seed: int = 0
    scenes: int = 20000
    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.05
    dense_weight: float = 1.0
    caption_weight: float = 0.5
    out: Path = MODELS_DIR / "verifier"
    hidden: int = VisionShape.hidden  # the towers' width and the vision tower's depth: the embedded VLM's
    layers: int = VisionShape.layers  # own (its frozen tower); a judge of grounding may be larger


def object_phrases() -> list[str]:
    return [f"a {phrase(o)}" for o in OBJECTS]


def lr_at(step: int, cfg) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + np.cos(np.pi * t))


def encode_text(model: CLIPModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model.text_model(input_ids=ids, attention_mask=mask)
    return F.normalize(model.text_projection(out.pooler_output), dim=-1)


def train_verifier(cfg: VerifierTrainConfig) -> CLIPModel:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tok = build_tokenizer(for_clip_text=True)
    model = CLIPModel(verifier_config(len(tok), VisionShape(hidden=cfg.hidden, layers=cfg.layers)))
    grid = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    dense_head = torch.nn.Linear(model.config.vision_config.hidden_size, len(OBJECTS) + 1)
    sig_bias = torch.nn.Parameter(torch.tensor(-5.0))
    params = [*model.parameters(), *dense_head.parameters(), sig_bias]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    print(f"verifier: {count_parameters(model) / 1e6:.2f} M parameters")

    # Unbiased scenes: the verifier, like CLIP, is pre-trained on broad data, not on the VLM's
    # instruction data with its planted co-occurrence.
    scenes = make_scenes("random", cfg.scenes, cfg.seed)
    pixels = render_all(scenes, "render verifier scenes")
    labels = torch.from_numpy(patch_labels(scenes, model.config.vision_config.patch_size))
    targets = torch.from_numpy(multi_hot(scenes))
    captions = [caption(s.objects) for s in scenes]
    phr = tok(object_phrases(), return_tensors="pt", padding=True)

    model.train()
    t0 = time.time()
    bar = trange(cfg.steps, desc="train verifier")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx = rng.choice(len(scenes), size=cfg.batch, replace=False)
        px = pixels_to_tensor(pixels[idx])
        vis = model.vision_model(pixel_values=px, output_hidden_states=True)
        img = F.normalize(model.visual_projection(vis.pooler_output), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)

        obj_txt = encode_text(model, phr.input_ids, phr.attention_mask)
        obj_logits = scale * img @ obj_txt.T + sig_bias
        loss_obj = F.binary_cross_entropy_with_logits(obj_logits, targets[idx], reduction="sum") / cfg.batch

        cap = tok([captions[i] for i in idx], return_tensors="pt", padding=True)
        cap_txt = encode_text(model, cap.input_ids, cap.attention_mask)
        cl = scale * img @ cap_txt.T
        ar = torch.arange(cfg.batch)
        loss_cap = (F.cross_entropy(cl, ar) + F.cross_entropy(cl.T, ar)) / 2

        patches = vis.hidden_states[-2][:, 1:]
        assert patches.shape[1] == grid
        loss_dense = F.cross_entropy(dense_head(patches).flatten(0, 1), labels[idx].flatten())

        loss = loss_obj + cfg.caption_weight * loss_cap + cfg.dense_weight * loss_dense
        optimizer_step(opt, loss, params)
        if step % 20 == 0:
            bar.set_postfix(obj=f"{loss_obj.item():.3f}", cap=f"{loss_cap.item():.3f}", dense=f"{loss_dense.item():.3f}")

    model.eval()
    meta = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "train_seconds": round(time.time() - t0, 1),
            "sigmoid_bias": float(sig_bias.detach())}
    save_verifier(model, cfg.out, meta)
    print(f"saved verifier to {cfg.out} ({meta['train_seconds']} s)")
    return model
