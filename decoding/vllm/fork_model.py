"""A forked TITA reward model inside vLLM's own model (the vllm engine; ``decoding.fork`` for the format).

``ForkedLlava`` (``ForkedLlavaNext``) subclasses vLLM's ``LlavaForConditionalGeneration``
(``LlavaNextForConditionalGeneration``: the same Llama decoder behind any-resolution image features) and adds
the fork's k decoder layers,
final norm (``in_model.RewardDecoder``, compiled by vLLM like the target's decoder) and output head as
ordinary vLLM layers: their attention layers are declared to vLLM, so their
KV cache lives in vLLM's paged cache and its memory profile (prefix caching, chunked prefill and preemption
hold for them as for the target's layers), and they read the target's own hidden state entering layer
``first`` (vLLM's auxiliary hidden states, as EAGLE-3 reads them). The target's vision tower runs once.
``ForkedQwen2_5_VL`` does the same over vLLM's Qwen2.5-VL model (Qwen2 decoder layers, M-RoPE positions),
``ForkedGemma3`` over vLLM's Gemma 3 model, whose decoder returns no auxiliary hidden states: its layer
``first`` writes its input into a buffer the fork reads (``tap``).

Per step (vLLM's V1 model runner): ``forward`` returns the target's final hidden states and the fork's side
by side, [T, 2D]; the runner picks the rows it samples from; ``compute_logits`` returns the target's logits
[n, V] and keeps the fork's final-normed hidden states [n, D] for the steering logits processor, whose row i
is row i of ``compute_logits`` (``decoding.vllm.steering``). The processor then runs the fork's head over
the rows that steer with TITA only, over the target's top candidates (``InModelFork``).

Selected with ``hf_overrides={"architectures": [arch], FORK_KEY: {...}}`` and
``model_class_overrides={arch: "decoding.vllm.fork_model:ForkedLlava"}`` (``fork_spec.FORK_ARCHES`` per target
family); the fork's weights load as vLLM's secondary weights (``DefaultModelLoader.Source``, as ``ultravox.py``
does). Llama-decoder LLaVA and LLaVA-NeXT targets, Qwen2.5-VL and Gemma 3; other targets run the fork as a whole
second model in the worker.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from torch import nn
from vllm.model_executor.models.gemma3_mm import Gemma3ForConditionalGeneration
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from decoding.vllm.fork_spec import FORK_KEY
from decoding.vllm.in_model import RewardDecoder, RewardInModel, load_stacked


class _Fork(RewardInModel):
    """The fork's layers over a vLLM VLM whose ``language_model.model`` returns auxiliary hidden states (vLLM's
    Llama and Qwen2 decoders) and whose ``forward`` returns that output (the subclasses below name the family)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        spec = getattr(vllm_config.model_config.hf_config, FORK_KEY)
        text = vllm_config.model_config.hf_config.get_text_config()
        self.fork_first, self.fork_k = int(spec["first_layer"]), int(spec["layers"])
        n = text.num_hidden_layers
        # the hidden state entering layer ``first`` (hidden + residual), returned beside the final one
        self._tap_first_layer(vllm_config)
        from vllm.compilation.backends import set_model_tag

        # attention layer names must be unique and hold one integer: the fork's are numbered after the target's;
        # a layer's kind (sliding or global attention, Gemma 3) is read at that number: the fork's layer j is of
        # the kind of the target's layer first + j
        fork_text = copy.deepcopy(text)
        if getattr(text, "layer_types", None):
            fork_text.layer_types = [*text.layer_types, *text.layer_types[self.fork_first:self.fork_first + self.fork_k]]
        with set_model_tag("vlm_steer_fork"):
            self.rm_decoder = RewardDecoder(vllm_config=vllm_config, prefix="rm_decoder", config=fork_text,
                                            layers=self.fork_k, first=n)
        self.rm_head = ParallelLMHead(text.vocab_size, text.hidden_size, prefix=f"{prefix}rm_head")
        self.rm_vocab_processor = self.language_model.logits_processor  # the fork's head has the target's rows
        self.rm_width, self.rm_vocab = text.hidden_size, text.vocab_size
        self.secondary_weights = [DefaultModelLoader.Source(spec["path"], None, prefix="rm.",
                                                            allow_patterns_overrides=["fork.safetensors"])]
        self._register(vllm_config)

    def _tap_first_layer(self, vllm_config) -> None:
        """vLLM's Llama and Qwen2 decoders return the hidden state entering a layer as an auxiliary output."""
        self.language_model.model.aux_hidden_state_layers = (self.fork_first,)

    def _fork_input(self, out):
        """(the target's final hidden states [T, D], the hidden state entering layer ``first`` [T, D])."""
        hidden, aux = out
        return hidden, aux[0]

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        hidden, entering = self._fork_input(super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs))
        if not self.fork_active:  # no TITA row in this step: the fork's half is never read
            return self._with_reward(hidden, None)
        self.fork_steps += 1
        return self._with_reward(hidden, lambda: self.rm_decoder(positions, entering))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        fork: list[tuple[str, torch.Tensor]] = []
        loaded = super().load_weights(self._target_weights(weights, fork))
        return loaded | self._load_fork(fork)

    def _load_fork(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, w in weights:
            if name == "lm_head.weight":
                target = "rm_head.weight"
            elif name.endswith("language_model.norm.weight"):
                target = "rm_decoder.norm.weight"
            else:
                layer, rest = name.split(".layers.", 1)[1].split(".", 1)
                j = int(layer) - self.fork_first
                if not 0 <= j < self.fork_k:
                    raise ValueError(f"fork tensor {name} is not one of layers {self.fork_first}..{self.fork_first + self.fork_k - 1}")
                target = f"rm_decoder.layers.{j}.{rest}"
            loaded.add(load_stacked(params, target, w))
        return loaded


class ForkedLlava(_Fork, LlavaForConditionalGeneration):
    """A fork inside vLLM's LLaVA-1.5 model."""


class ForkedLlavaNext(_Fork, LlavaNextForConditionalGeneration):
    """A fork inside vLLM's LLaVA-NeXT model."""


class ForkedQwen2_5_VL(_Fork, Qwen2_5_VLForConditionalGeneration):
    """A fork inside vLLM's Qwen2.5-VL model (Qwen2 decoder layers at the target's M-RoPE positions)."""



def tap(layer: nn.Module, rows: int, width: int) -> None:
    """Make a decoder layer first write the hidden state entering it (hidden + residual) into a buffer of its
    own, ``fork_entering`` [rows, D] at a fixed address (a captured CUDA graph writes it too), then run as
    before. For decoders that return no auxiliary hidden states (vLLM's Gemma 3). The layer keeps its name and
    parameters (the checkpoint loads as before); the buffer is not saved."""
    layer.register_buffer("fork_entering", torch.zeros(rows, width), persistent=False)
    run = layer.forward

    def forward(positions, hidden_states, residual, **kwargs):
        entering = hidden_states if residual is None else hidden_states + residual
        layer.fork_entering[: entering.shape[0]].copy_(entering)
        return run(positions, hidden_states, residual, **kwargs)

    layer.forward = forward


class ForkedGemma3(_Fork, Gemma3ForConditionalGeneration):
    """A fork inside vLLM's Gemma 3 model: its decoder returns no auxiliary hidden states, so the target's layer
    ``first`` writes its input into a buffer the fork reads (``tap``); the fork's layers are Gemma 3's, each
    sliding or global as the target's layer it copies."""

    def _tap_first_layer(self, vllm_config) -> None:
        text = vllm_config.model_config.hf_config.get_text_config()
        tap(self.language_model.model.layers[self.fork_first], vllm_config.scheduler_config.max_num_batched_tokens,
            text.hidden_size)

    def _fork_input(self, out):  # the buffer as the layer holds it now (a move to a device replaces it)
        return out, self.language_model.model.layers[self.fork_first].fork_entering[: out.shape[0]]
