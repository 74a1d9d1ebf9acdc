"""How the vllm engine selects ``decoding.vllm.fork_model`` (no vllm import: read in the API process)."""

from __future__ import annotations

import json
from pathlib import Path

ARCH = "VlmSteerForkedLlava"
FORK_KEY = "vlm_steer_fork"  # the hf_config attribute carrying the fork's folder and layers
MODEL_CLASS = "decoding.vllm.fork_model:ForkedLlava"
LIVE: list = []  # weak references to the ForkedLlava models built in this process (vLLM's worker)


def live_model():
    """The ``ForkedLlava`` of this process (the one the steering processor's rows belong to)."""
    for ref in reversed(LIVE):
        model = ref()
        if model is not None:
            return model
    raise RuntimeError("no vLLM model holding the forked reward model in this process")


def in_model_overrides(model_path: str | Path, reward_path: str | Path | None) -> dict | None:
    """Engine arguments that put a forked reward model inside vLLM's model, or None where the pair is not
    of a kind ``ForkedLlava`` serves (a separate reward model; a fork of another family than LLaVA with a
    Llama decoder): those run in the worker as before."""
    if reward_path is None or not (Path(reward_path) / "fork.json").is_file():
        return None
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    if cfg.get("model_type") != "llava" or cfg.get("text_config", {}).get("model_type", "llama") != "llama":
        return None
    info = json.loads((Path(reward_path) / "fork.json").read_text())
    spec = {"path": str(Path(reward_path).resolve()), "first_layer": info["first_layer"], "layers": info["layers"]}
    return {"hf_overrides": {"architectures": [ARCH], FORK_KEY: spec}, "model_class_overrides": {ARCH: MODEL_CLASS}}


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
    """TITA's reward model when it is part of vLLM's model (``decoding.vllm.fork_model``): vLLM owns its KV
    cache and runs its layers in the step; TITA reads its logits for batch rows (``in_model``)."""

    in_model = True

    def __init__(self, path: str | Path, vocab_size: int):
        self.path, self.vocab_size = str(path), vocab_size

    def logits(self, rows, candidates=None):
        """The fork's logits [n, V] (or [n, K] at ``candidates``) for batch rows ``rows`` [n] of this step."""
        return live_model().rm_logits(rows, candidates)

    @staticmethod
    def run_layers(on: bool) -> None:
        """Whether the next forward runs the fork's layers: the steering processor turns them off for steps
        with no TITA row (``ForkedLlava.fork_active``)."""
        live_model().fork_active = on

    @staticmethod
    def select(state, keep):  # no per-row state of its own: vLLM keeps the cache
        return None

    @staticmethod
    def merge(a, b):
        return None
