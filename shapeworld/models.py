"""Shapes, configs, processors and saving of the embedded ShapeWorld models (llava-hf layout)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from reward_models.checkpoints import WEIGHTS as _WEIGHTS, to_llava_hf_keys
from shapeworld.tokenizer import BOS, EOS, IMAGE, PAD, build_tokenizer
from shapeworld.world import IMAGE_SIZE

MODELS_DIR = Path(__file__).resolve().parent.parent / "models" / "shapeworld"
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class VisionShape:
    hidden: int = 128
    layers: int = 4
    heads: int = 2
    patch: int = 8


@dataclass(frozen=True)
class LMShape:
    hidden: int = 128
    layers: int = 4
    heads: int = 2  # head_dim 64: vLLM's CPU attention accepts 32/64/128 only
    intermediate: int = 512


def image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        resample=3,
    )


def pixels_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] at the model's size -> normalised [N, 3, H, W], exactly as the processor does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def vision_config(shape: VisionShape = VisionShape()) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=shape.hidden,
        intermediate_size=4 * shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        image_size=IMAGE_SIZE,
        patch_size=shape.patch,
        projection_dim=shape.hidden,
        hidden_act="quick_gelu",
    )


def verifier_config(vocab_size: int, shape: VisionShape = VisionShape()) -> CLIPConfig:
    tok = build_tokenizer(for_clip_text=True)
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=4 * shape.hidden,
        num_hidden_layers=2,
        num_attention_heads=shape.heads,
        max_position_embeddings=32,
        projection_dim=shape.hidden,
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        bos_token_id=tok.convert_tokens_to_ids(BOS),
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        hidden_act="quick_gelu",
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision_config(shape).to_dict(), projection_dim=shape.hidden
    )


def vlm_config(vision: CLIPVisionConfig, lm: LMShape = LMShape()) -> LlavaConfig:
    tok = build_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=lm.hidden,
        intermediate_size=lm.intermediate,
        num_hidden_layers=lm.layers,
        num_attention_heads=lm.heads,
        num_key_value_heads=lm.heads,
        head_dim=lm.hidden // lm.heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        pad_token_id=tok.pad_token_id,
    )


def llava_processor() -> LlavaProcessor:
    tok = build_tokenizer()
    vc = vision_config()
    return LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tok,
        patch_size=vc.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=tok.chat_template,
        image_token=IMAGE,
    )


def clip_processor() -> CLIPProcessor:
    return CLIPProcessor(image_processor=image_processor(), tokenizer=build_tokenizer(for_clip_text=True))


# ---------------------------------------------------------------- saving in the llava-hf layout



def save_vlm(model: LlavaForConditionalGeneration, path: Path, meta: dict | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # save_pretrained(model) would record it; we save the config on its own (the weights are rewritten
    # below), and without ``architectures`` vLLM resolves the folder to a pooling LlavaModel
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    llava_processor().save_pretrained(path)
    save_file(to_llava_hf_keys(model.state_dict()), path / _WEIGHTS, metadata={"format": "pt"})
    if meta:
        (path / "training.json").write_text(json.dumps(meta, indent=2, default=str))


def save_verifier(model: CLIPModel, path: Path, meta: dict | None = None) -> None:
    path = Path(path)
    model.save_pretrained(path)
    clip_processor().save_pretrained(path)
    if meta:
        (path / "training.json").write_text(json.dumps(meta, indent=2, default=str))


def load_vision_tower_state(verifier: CLIPModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in verifier.vision_model.state_dict().items()}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shapes_dict(vision: VisionShape, lm: LMShape) -> dict:
    return {"vision": asdict(vision), "lm": asdict(lm)}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / _WEIGHTS)
