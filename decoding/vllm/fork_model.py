"""A forked TITA reward model inside vLLM's own model (the vllm engine; ``decoding.fork`` for the format).

``ForkedLlava`` subclasses vLLM's ``LlavaForConditionalGeneration`` and adds the fork's k decoder layers,
final norm and output head as ordinary vLLM layers: their attention layers are declared to vLLM, so their
KV cache lives in vLLM's paged cache and its memory profile (prefix caching, chunked prefill and preemption
hold for them as for the target's layers), and they read the target's own hidden state entering layer
``first`` (vLLM's auxiliary hidden states, as EAGLE-3 reads them). The target's vision tower runs once.

Per step (vLLM's V1 model runner): ``forward`` returns the target's final hidden states and the fork's side
by side, [T, 2D]; the runner picks the rows it samples from; ``compute_logits`` returns the target's logits
[n, V] and keeps the fork's final-normed hidden states [n, D] for the steering logits processor, whose row i
is row i of ``compute_logits`` (``decoding.vllm_steering``). The processor then runs the fork's head over
the rows that steer with TITA only, over the target's top candidates (``InModelFork``).

Selected with ``hf_overrides={"architectures": [ARCH], FORK_KEY: {...}}`` and
``model_class_overrides={ARCH: "decoding.vllm.fork_model:ForkedLlava"}`` (``decoding.vllm_engine``); the
fork's weights load as vLLM's secondary weights (``DefaultModelLoader.Source``, as ``ultravox.py`` does).
Llama-decoder LLaVA targets only; other families run the fork as a whole second model in the worker.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.llava import LlavaForConditionalGeneration

from decoding.fork import head_rows
from decoding.vllm.fork_spec import FORK_KEY, LIVE

# the checkpoint's separate projections -> vLLM's stacked ones: (stacked name, checkpoint name, shard)
_STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
            ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))


class ForkedLlava(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        spec = getattr(vllm_config.model_config.hf_config, FORK_KEY)
        text = vllm_config.model_config.hf_config.text_config
        self.fork_first, self.fork_k = int(spec["first_layer"]), int(spec["layers"])
        n = text.num_hidden_layers
        # the hidden state entering layer ``first`` (hidden + residual), returned beside the final one
        self.language_model.model.aux_hidden_state_layers = (self.fork_first,)
        sub = vllm_config.with_hf_config(text, architectures=["LlamaForCausalLM"])
        # attention layer names must be unique and hold one integer: the fork's are numbered after the target's
        self.rm_layers = nn.ModuleList(LlamaDecoderLayer(vllm_config=sub, config=text, prefix=f"{prefix}rm_layers.{n + j}")
                                       for j in range(self.fork_k))
        self.rm_norm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.rm_head = ParallelLMHead(text.vocab_size, text.hidden_size, prefix=f"{prefix}rm_head")
        self.secondary_weights = [DefaultModelLoader.Source(spec["path"], None, prefix="rm.",
                                                            allow_patterns_overrides=["fork.safetensors"])]
        self.rm_hidden: torch.Tensor | None = None  # [n, D] of the last compute_logits
        # whether this step runs the fork's layers: set by the steering processor before each forward (vLLM's
        # V1 runner calls the logits processors' ``update_state`` before the model), off when no row of the
        # step steers with TITA. Blocks computed with the fork off lack its KV: the vllm engine gives TITA
        # requests their own ``cache_salt`` so prefix caching never hands them such blocks.
        self.fork_active = True
        self.fork_steps = 0  # forward passes that ran the fork's layers (read by tests)
        LIVE.append(weakref.ref(self))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        hidden, aux = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if not self.fork_active:  # no TITA row in this step: the fork's half is never read
            return torch.cat([hidden, torch.zeros_like(hidden)], -1)
        self.fork_steps += 1
        h, residual = aux[0], None
        for layer in self.rm_layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.rm_norm(h, residual)
        return torch.cat([hidden, h], -1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        d = hidden_states.shape[-1] // 2
        self.rm_hidden = hidden_states[:, d:]
        return super().compute_logits(hidden_states[:, :d])

    def rm_logits(self, rows: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """The fork's logits for rows (indices into the last ``compute_logits``): [n, V], or [n, K] at the
        ``candidates`` [n, K] token ids only (the head then costs K of its rows)."""
        h = self.rm_hidden[rows]
        if candidates is not None and self.rm_head.weight.shape[0] >= self.config.text_config.vocab_size:
            return head_rows(self.rm_head.weight, h, candidates)  # an unsharded head (no tensor parallelism)
        logits = self.language_model.logits_processor(self.rm_head, h)
        return logits.float() if candidates is None else logits.float().gather(-1, candidates)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        fork: list[tuple[str, torch.Tensor]] = []

        def target_only():
            for name, w in weights:
                if name.startswith("rm."):
                    fork.append((name[3:], w))
                else:
                    yield name, w

        loaded = super().load_weights(target_only())
        return loaded | self._load_fork(fork)

    def _load_fork(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, w in weights:
            if name == "lm_head.weight":
                target, shard = "rm_head.weight", None
            elif name.endswith("language_model.norm.weight"):
                target, shard = "rm_norm.weight", None
            else:
                layer, rest = name.split(".layers.", 1)[1].split(".", 1)
                j = int(layer) - self.fork_first
                if not 0 <= j < self.fork_k:
                    raise ValueError(f"fork tensor {name} is not one of layers {self.fork_first}..{self.fork_first + self.fork_k - 1}")
                shard = None
                for stacked, single, s in _STACKED:
                    if f".{single}." in f".{rest}":
                        rest, shard = rest.replace(single, stacked), s
                        break
                target = f"rm_layers.{j}.{rest}"
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, w) if shard is None else loader(param, w, shard)
            loaded.add(target)
        return loaded
