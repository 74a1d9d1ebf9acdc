"""How the vllm engine puts TITA's reward model inside vLLM's model (no vllm import: read in the API process):
a fork of a LLaVA or LLaVA-NeXT target (``decoding.vllm.fork_model``), or a separate reward model of the
target's family that shares its processor (``decoding.vllm.paired_model``)."""

from __future__ import annotations

import json
from pathlib import Path

FORK_KEY = "vlm_steer_fork"  # the hf_config attribute carrying the fork's folder and layers
# a fork inside vLLM's model, per target family (model_type): (architecture name, model class)
FORK_ARCHES = {"llava": ("VlmSteerForkedLlava", "decoding.vllm.fork_model:ForkedLlava"),
               "llava_next": ("VlmSteerForkedLlavaNext", "decoding.vllm.fork_model:ForkedLlavaNext"),
               "qwen2_5_vl": ("VlmSteerForkedQwen2_5_VL", "decoding.vllm.fork_model:ForkedQwen2_5_VL"),
               "gemma3": ("VlmSteerForkedGemma3", "decoding.vllm.fork_model:ForkedGemma3")}
ARCH, MODEL_CLASS = FORK_ARCHES["llava"]
REWARD_KEY = "vlm_steer_reward"  # the hf_config attribute carrying a separate reward model's folder
# a separate reward model of the target's family inside vLLM's model, per family (model_type)
PAIR_ARCHES = {"llava": ("VlmSteerPairedLlava", "decoding.vllm.paired_model:PairedLlava"),
               "llava_next": ("VlmSteerPairedLlavaNext", "decoding.vllm.paired_model:PairedLlavaNext"),
               "qwen2_5_vl": ("VlmSteerPairedQwen2_5_VL", "decoding.vllm.paired_model:PairedQwen2_5_VL"),
               "gemma3": ("VlmSteerPairedGemma3", "decoding.vllm.paired_model:PairedGemma3")}
PAIR_ARCH, PAIR_CLASS = PAIR_ARCHES["llava"]
# the architectures whose model holds the reward model
ARCHES = (*(a for a, _ in FORK_ARCHES.values()), *(a for a, _ in PAIR_ARCHES.values()))
LIVE: list = []  # weak references to the models holding a reward model built in this process (vLLM's worker)


def live_model():
    """The model holding the reward model in this process (the one the steering processor's rows belong to)."""
    for ref in reversed(LIVE):
        model = ref()
        if model is not None:
            return model
    raise RuntimeError("no vLLM model holding the reward model in this process")


def _llama_llava(cfg: dict, families=("llava",)) -> bool:
    return cfg.get("model_type") in families and cfg.get("text_config", {}).get("model_type", "llama") == "llama"


def same_processor(model_path: str | Path, reward_path: str | Path) -> bool:
    """Whether the reward model turns every request into the target's prompt ids and pixels: the same
    processor (``decoding.methods.tita.same_inputs``), image token and image features per image (the config
    fields that set how many tokens an image becomes, in any of the four families)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoProcessor

    from decoding.methods.tita import same_inputs

    a, b = (SimpleNamespace(processor=AutoProcessor.from_pretrained(p), config=AutoConfig.from_pretrained(p))
            for p in (model_path, reward_path))
    keys = ("vision_feature_select_strategy", "vision_feature_layer", "image_grid_pinpoints", "mm_tokens_per_image")
    vision_keys = ("image_size", "patch_size", "spatial_merge_size", "temporal_patch_size")
    vision = lambda c: [getattr(c.vision_config, k, None) for k in vision_keys]  # noqa: E731
    return (same_inputs(a, b) and all(getattr(a.config, k, None) == getattr(b.config, k, None) for k in keys)
            and vision(a.config) == vision(b.config))


def reward_placement(model_path: str | Path, reward_path: str | Path, engine_args: dict | None = None) -> tuple[dict | None, str]:
    """Where the vllm engine runs TITA's reward model: (engine arguments that put it inside vLLM's model, or
    None, and a sentence for the start-up log saying where it runs and why). Inside: a fork of a LLaVA or
    LLaVA-NeXT target with a Llama decoder (``ForkedLlava``, ``ForkedLlavaNext``), or a separate reward model of
    the target's family (LLaVA with a Llama decoder, LLaVA-NeXT, Qwen2.5-VL, Gemma 3) that shares the target's
    processor (``paired_model``). Otherwise (a fork of another family; a reward model of another family, or
    with its own processor or vision settings; a quantized target, whose quantization vLLM would apply to the
    reward model's layers too) it runs in the steering processor as a model of its own."""
    worker = "runs in vLLM's worker as a second model (slower; its memory outside vLLM's budget): "
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    family = cfg.get("model_type")
    fork = (Path(reward_path) / "fork.json").is_file()
    if fork and not (family in ("qwen2_5_vl", "gemma3") or _llama_llava(cfg, ("llava", "llava_next"))):
        return None, worker + (f"the target is {family!r}, and LLaVA and LLaVA-NeXT targets with a Llama decoder, "
                               "Qwen2.5-VL and Gemma 3 targets hold a fork")
    if not fork and (family not in PAIR_ARCHES or (family == "llava" and not _llama_llava(cfg))):
        return None, worker + (f"the target is {family!r}, and LLaVA (Llama decoder), LLaVA-NeXT, Qwen2.5-VL and "
                               "Gemma 3 targets hold a separate reward model")
    if "quantization_config" in cfg or (engine_args or {}).get("quantization"):
        return None, worker + "the target is quantized, and vLLM would quantize the reward model's layers too"
    path = str(Path(reward_path).resolve())
    if fork:
        info = json.loads((Path(reward_path) / "fork.json").read_text())
        spec = {"path": path, "first_layer": info["first_layer"], "layers": info["layers"]}
        arch, cls = FORK_ARCHES[family]
        return ({"hf_overrides": {"architectures": [arch], FORK_KEY: spec}, "model_class_overrides": {arch: cls}},
                f"inside vLLM's model: a fork of the target's top {info['layers']} layers (decoding/vllm/fork_model.py)")
    rm = json.loads((Path(reward_path) / "config.json").read_text())
    if rm.get("model_type") != family or (family == "llava" and not _llama_llava(rm)):
        return None, worker + (f"it is {rm.get('model_type')!r}, and a separate reward model goes inside when it is "
                               f"of the target's family ({family!r}{', with a Llama decoder' if family == 'llava' else ''})")
    if not same_processor(model_path, reward_path):
        return None, worker + ("its processor, image size, patch size or vision feature settings differ from the "
                               "target's, so it cannot read the target's pixels and prompt ids")
    arch, cls = PAIR_ARCHES[family]
    return ({"hf_overrides": {"architectures": [arch], REWARD_KEY: {"path": path}}, "model_class_overrides": {arch: cls}},
            f"inside vLLM's model: a separate {family} reward model sharing the target's processor "
            "(decoding/vllm/paired_model.py)")


def in_model_overrides(model_path: str | Path, reward_path: str | Path | None) -> dict | None:
    """``reward_placement``'s engine arguments (None: no reward model, or one that runs in the worker)."""
    return None if reward_path is None else reward_placement(model_path, reward_path)[0]


def _meta_target(model_path: str | Path):
    """The target as transformers builds it, on the meta device (no weights read), and the key renamings
    transformers applies to its checkpoint's names."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import get_model_conversion_mapping

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    renames = [(src, dst) for r in get_model_conversion_mapping(model) if type(r).__name__ == "WeightRenaming"
               for src, dst in zip(r.source_patterns, r.target_patterns)]
    return model, renames


def file_fingerprint(model_path: str | Path, info: dict, target=None) -> str:
    """``decoding.fork.trunk_fingerprint`` read from the target's safetensors files, without loading the
    model: the check the vllm engine makes before vLLM loads anything. Checkpoint keys are mapped to
    transformers' state-dict names with transformers' own renamings (and a level such as ``vision_model``
    that the model's state dict lacks dropped)."""
    import re

    from safetensors import safe_open

    from decoding.fork import fingerprint, fork_prefixes

    model, renames = target or _meta_target(model_path)
    names = set(model.state_dict())
    forked = tuple(fork_prefixes(model, info["layers"])[0])
    tensors = []
    for f in sorted(Path(model_path).glob("*.safetensors")):
        handle = safe_open(f, "pt")
        for key in handle.keys():
            name = key
            for src, dst in renames:  # in transformers' order
                name = re.sub(src, dst, name)
            if name not in names:  # a level the model's state dict lacks (``vision_model``, ``model``)
                parts = name.split(".")
                name = next((c for c in (".".join(parts[:i] + parts[i + 1:]) for i in range(len(parts))) if c in names), name)
            if not name.startswith(forked):
                tensors.append((name, lambda handle=handle, key=key: handle.get_tensor(key)))
    return fingerprint(tensors)


def check_fork_files(model_path: str | Path, reward_path: str | Path) -> None:
    """Refuse a fork built for another target (``decoding.fork.check_trunk``: its checks and messages), from
    the files and a meta-device model: before any engine loads weights. Any family transformers builds."""
    from decoding.fork import check_trunk

    info = json.loads((Path(reward_path) / "fork.json").read_text())
    target = _meta_target(model_path)
    check_trunk(info, target[0], reward_path, trunk=lambda: file_fingerprint(model_path, info, target))


class InModelFork:
    """TITA's reward model when it is part of vLLM's model (``decoding.vllm.fork_model`` or
    ``paired_model``): vLLM owns its KV cache and runs its layers in the step; TITA reads its logits for batch
    rows (``in_model``)."""

    in_model = True

    def __init__(self, path: str | Path, vocab_size: int):
        self.path, self.vocab_size = str(path), vocab_size

    def logits(self, rows, candidates=None):
        """The fork's logits [n, V] (or [n, K] at ``candidates``) for batch rows ``rows`` [n] of this step."""
        return live_model().rm_logits(rows, candidates)

    @staticmethod
    def run_layers(on: bool) -> None:
        """Whether the next forward runs the reward model's layers: the steering processor turns them off for
        steps with no TITA row (``RewardInModel.fork_active``)."""
        live_model().fork_active = on

    @staticmethod
    def select(state, keep):  # no per-row state of its own: vLLM keeps the cache
        return None

    @staticmethod
    def merge(a, b):
        return None
