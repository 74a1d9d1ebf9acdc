"""Saving a VLM checkpoint in its family's hub layout, the one llava-hf / Gemma 3 checkpoints and vLLM's
loader read (transformers 5 writes LLaVA's vision tower as ``vision_tower.embeddings...``; vLLM expects
``vision_tower.vision_model.embeddings...`` and refuses the folder otherwise)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHTS = "model.safetensors"
HUB_LAYOUT_FAMILIES = ("llava", "llava_next", "gemma3")


def to_llava_hf_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as llava-hf checkpoints (and vLLM's loader) have them: ``vision_tower.vision_model.*``,
    ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("model.")
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k.removeprefix("vision_tower.")
        elif k.startswith("language_model."):
            k = "language_model.model." + k.removeprefix("language_model.")
        elif k.startswith("lm_head."):
            k = "language_model." + k
        out[k] = v.contiguous()
    return out


def save_checkpoint(model, processor, path: str | Path) -> Path:
    """``save_pretrained`` of the model and its processor, the weights rewritten to the hub layout for the
    families whose hub checkpoints differ from what transformers 5 writes (``HUB_LAYOUT_FAMILIES``);
    transformers loads either layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # without it vLLM resolves LLaVA to a pooling model
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if model.config.model_type in HUB_LAYOUT_FAMILIES:
        state = to_llava_hf_keys(model.state_dict())
        if model.config.get_text_config().tie_word_embeddings:  # tied: the hub files hold the embedding once
            state.pop("language_model.lm_head.weight", None)
        for f in path.glob("model*.safetensors*"):  # save_pretrained may have sharded
            f.unlink()
        save_file(state, path / WEIGHTS, metadata={"format": "pt"})
    return path
