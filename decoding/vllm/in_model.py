"""What every vLLM model that holds TITA's reward model shares (``fork_model.ForkedLlava``, a fork of the
target's top layers; ``paired_model.PairedLlava``, a separate reward model): the per-step switch, the split of
the forward's output into the target's and the reward model's final hidden states, and the reward model's
logits for the rows that steer.

Contract with vLLM's V1 model runner (vllm 0.32, ``gpu_model_runner.execute_model``): the logits processors'
``update_state`` runs before the forward of the same step (so ``fork_active`` can be set for it), the forward
returns [T, D_target + D_reward], and row i of ``compute_logits`` is row i of the logits processor.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.models.llama import LlamaDecoderLayer

from decoding.fork import head_rows
from decoding.methods.tita import target_rows
from decoding.vllm.fork_spec import LIVE

# the checkpoint's separate projections -> vLLM's stacked ones: (stacked name, checkpoint name, shard)
STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))


def load_stacked(params: dict, target: str, w: torch.Tensor) -> str:
    """Load checkpoint tensor ``w`` into ``params`` under ``target`` (a name in the checkpoint's spelling, e.g.
    ``rm_layers.0.self_attn.q_proj.weight``), through vLLM's stacked projections where vLLM stacks them;
    returns the parameter's name."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    shard = None
    for stacked, single, s in STACKED:
        if f".{single}." in f".{target}":
            target, shard = target.replace(single, stacked), s
            break
    param = params[target]
    loader = getattr(param, "weight_loader", default_weight_loader)
    loader(param, w) if shard is None else loader(param, w, shard)
    return target


def number_after(module: nn.Module, vllm_config: VllmConfig, offset: int) -> list[str]:
    """Rename the attention layers of ``module`` (built with its own numbering, e.g. ``rm.language_model.model.
    layers.0.self_attn.attn``) so that their one integer counts on from ``offset`` (the target's layer count):
    vLLM binds KV caches by that integer (``vllm.v1.worker.utils.bind_kv_cache``), and two layers sharing it
    are refused on CUDA. Call before the KV cache is allocated; returns the new names."""
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    context = vllm_config.compilation_config.static_forward_context
    names = []
    for layer in module.modules():
        if isinstance(layer, AttentionLayerBase) and getattr(layer, "layer_name", None) in context:
            parts = layer.layer_name.split(".")
            (i,) = [j for j, part in enumerate(parts) if part.isdigit()]
            parts[i] = str(int(parts[i]) + offset)
            new = ".".join(parts)
            if new in context:
                raise ValueError(f"attention layer {new} exists twice")
            context[new] = context.pop(layer.layer_name)
            layer.layer_name = new
            names.append(new)
    return names


def decoder_layer(vllm_config: VllmConfig, config, prefix: str) -> nn.Module:
    """vLLM's own decoder layer for a text config: Gemma 3's for Gemma 3 text configs, Qwen2's (biased q/k/v
    projections, M-RoPE when the config's rope parameters carry an ``mrope_section``) for Qwen2 and Qwen2.5-VL
    text configs, else Llama's."""
    if config.model_type == "gemma3_text":  # sliding or global by ``config.layer_types`` at the prefix's index
        from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer

        return Gemma3DecoderLayer(config=config, cache_config=vllm_config.cache_config,
                                  quant_config=vllm_config.quant_config, prefix=prefix)
    if config.model_type in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text"):
        from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer

        return Qwen2DecoderLayer(config=config, cache_config=vllm_config.cache_config,
                                 quant_config=vllm_config.quant_config, prefix=prefix)
    sub = vllm_config.with_hf_config(config, architectures=["LlamaForCausalLM"])
    return LlamaDecoderLayer(vllm_config=sub, config=config, prefix=prefix)


@support_torch_compile(dynamic_arg_dims={"positions": -1, "inputs_embeds": 0})
class RewardDecoder(nn.Module):
    """Decoder layers of the config's family (``decoder_layer``) and a final norm, compiled by vLLM like the
    target's own decoder (construct it under ``vllm.compilation.backends.set_model_tag``): [T, D] inputs (a
    separate reward model's input embeddings, or the target's hidden state entering the fork's first layer) and
    positions [T] (or [3, T], M-RoPE) -> [T, D] final-normed hidden states. Its attention layers are named
    ``rm_layers.{first + j}`` (vLLM needs one distinct integer per attention layer name: ``first`` is the
    target's layer count)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", config=None, layers: int = 1, first: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(decoder_layer(vllm_config, config, f"rm_layers.{first + j}") for j in range(layers))
        norm = GemmaRMSNorm if config.model_type == "gemma3_text" else RMSNorm  # Gemma scales by 1 + w
        self.norm = norm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        h, residual = inputs_embeds, None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.norm(h, residual)
        return h


class RewardInModel:
    """Mixin over vLLM's ``LlavaForConditionalGeneration``: ``rm_width`` (D_reward), ``rm_vocab`` (the reward
    head's rows in its config, before vLLM pads them), ``rm_head`` and ``rm_vocab_processor`` are set by the
    subclass, which runs its reward layers in ``forward`` when ``fork_active``."""

    rm_width: int
    rm_vocab: int

    def _register(self, vllm_config) -> None:
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1 or getattr(parallel, "use_ubatching", False):
            # a stage that is not the last returns intermediate tensors, not hidden states; micro-batches would
            # each need their own slice of the reward model's inputs
            raise ValueError("a reward model inside vLLM's model runs without pipeline parallelism and micro-batching "
                             "(use tensor parallelism)")
        self.rm_hidden: torch.Tensor | None = None  # [n, D_reward] of the last compute_logits
        # whether this step runs the reward model's layers: set by the steering processor before each forward
        # (vLLM's V1 runner calls the logits processors' ``update_state`` before the model), off when no row
        # of the step steers with TITA. Blocks computed with it off lack the reward model's KV: the vllm engine
        # gives TITA requests their own ``cache_salt`` so prefix caching never hands them such blocks.
        self.fork_active = True
        self.fork_steps = 0  # forward passes that ran the reward model's layers (read by tests)
        self.rm_image_calls = 0  # image encodings that ran a separate reward model's tower or projector (tests)
        LIVE.append(weakref.ref(self))

    def _in_rm_vocab(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids past the reward model's rows (a target head padded past the tokenizer, whose padding only
        a random-weight target picks) read its last row, as the transformers engine's TITA does."""
        return input_ids.clamp_max(self.rm_vocab - 1)

    def _halves(self, multimodal_embeddings):
        """Per image, the target's half [..., :D_t] and the reward model's [..., D_t:] of the side-by-side image
        embeddings (``embed_multimodal``): two lists, or (None, None) where the step has none."""
        if multimodal_embeddings is None or not len(multimodal_embeddings):
            return None, None
        d = self.config.get_text_config().hidden_size
        return [e[..., :d] for e in multimodal_embeddings], [e[..., d:] for e in multimodal_embeddings]

    @staticmethod
    def _target_weights(weights, reward: list):
        """The target's tensors of vLLM's weight stream; the reward model's (prefix ``rm.``, its secondary
        weights) go to ``reward`` without the prefix."""
        for name, w in weights:
            if name.startswith("rm."):
                reward.append((name[3:], w))
            else:
                yield name, w

    def _with_reward(self, hidden: torch.Tensor, decode=None) -> torch.Tensor:
        """The forward's output [T, D_target + D_reward]: ``hidden`` beside ``decode()`` (the reward decoder's
        final hidden states), or zeros in a step without TITA. ``hidden`` is copied into the output before the
        reward decoder runs: under piecewise CUDA graphs the target's last graph hands its output memory back
        to the shared pool, where the reward decoder's graphs may write (vLLM's gemma3n clones for the same
        reason)."""
        d = hidden.shape[-1]
        out = hidden.new_empty(hidden.shape[0], d + self.rm_width) if decode else hidden.new_zeros(hidden.shape[0], d + self.rm_width)
        out[:, :d] = hidden
        if decode:
            out[:, d:] = decode()
        return out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        d = hidden_states.shape[-1] - self.rm_width
        self.rm_hidden = hidden_states[:, d:]
        return super().compute_logits(hidden_states[:, :d])

    def rm_logits(self, rows: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """The reward model's logits for rows (indices into the last ``compute_logits``): [n, V] over the
        target's V output rows (``decoding.methods.tita.target_rows``), or [n, K] at the ``candidates`` [n, K]
        token ids only (the head then costs K of its rows)."""
        from vllm.distributed import get_tensor_model_parallel_world_size

        h = self.rm_hidden[rows]
        n = self.config.get_text_config().vocab_size
        proc = self.rm_vocab_processor
        plain = proc.soft_cap is None and proc.scale == 1.0  # the head's product is the logit (not Gemma 2's cap)
        if candidates is not None and plain and self.rm_vocab >= n and get_tensor_model_parallel_world_size() == 1:
            return head_rows(self.rm_head.weight, h, candidates)  # a whole head holding every candidate's row
        logits = target_rows(self.rm_vocab_processor(self.rm_head, h).float(), n)
        return logits if candidates is None else logits.gather(-1, candidates)
