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
from vllm.model_executor.layers.layernorm import RMSNorm
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


@support_torch_compile(dynamic_arg_dims={"positions": 0, "inputs_embeds": 0})
class RewardDecoder(nn.Module):
    """Llama decoder layers and a final norm, compiled by vLLM like the target's own decoder (construct it under
    ``vllm.compilation.backends.set_model_tag``): [T, D] inputs (a separate reward model's input embeddings,
    or the target's hidden state entering the fork's first layer) -> [T, D] final-normed hidden states. Its
    attention layers are named ``rm_layers.{first + j}`` (vLLM needs one distinct integer per attention layer
    name: ``first`` is the target's layer count)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", config=None, layers: int = 1, first: int = 0):
        super().__init__()
        sub = vllm_config.with_hf_config(config, architectures=["LlamaForCausalLM"])
        self.layers = nn.ModuleList(LlamaDecoderLayer(vllm_config=sub, config=config, prefix=f"rm_layers.{first + j}")
                                    for j in range(layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

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
        LIVE.append(weakref.ref(self))

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
        n = self.config.text_config.vocab_size
        if candidates is not None and self.rm_vocab >= n and get_tensor_model_parallel_world_size() == 1:
            return head_rows(self.rm_head.weight, h, candidates)  # a whole head holding every candidate's row
        logits = target_rows(self.rm_vocab_processor(self.rm_head, h).float(), n)
        return logits if candidates is None else logits.gather(-1, candidates)
