"""A separate TITA reward model inside vLLM's own model (the vllm engine; the fork's kind is ``fork_model``).

Two shapes of one idea: the target's vLLM class subclassed, the reward model's layers added as ordinary vLLM
layers (their attention layers declared to vLLM and numbered after the target's, so their KV cache lives in
vLLM's paged cache and memory profile: prefix caching, chunked prefill and preemption hold for them as for the
target's), the pair turning a request into the same prompt ids and pixels (one processor:
``fork_spec.same_processor``).

- ``PairedLlava`` (LLaVA-1.5 targets, the users' main case): the reward model's token embedding, Llama decoder,
  norm, head, vision tower and projector as layers of their own, so that where the two vision towers hold the
  same weights (a pair that froze the same CLIP) the tower runs once.
- ``PairedLlavaNext``, ``PairedQwen2_5_VL``, ``PairedGemma3`` (``_Paired``): the reward model is vLLM's own
  implementation of its architecture (the target's family), built as the submodule ``rm``: M-RoPE positions
  (Qwen2.5-VL), sliding-window layers and logit soft-capping (Gemma 3) come with it. Its vision tower runs
  beside the target's at each image's encoding.

Per step (vLLM's V1 model runner, vllm 0.32):
- ``embed_multimodal`` returns, per image, the target's image embeddings and the reward model's side by side,
  [tokens, D_target + D_reward]: vLLM's encoder cache keeps both halves and hands a chunk of prefill its slice.
  In a step without a TITA row the reward model's tower and projector do not run (a zero half); the vllm
  engine keys a TITA request's images apart in vLLM's caches, so it never reads such an entry.
- ``embed_input_ids`` merges the target's half into the target's input embeddings (what vLLM copies into its
  own buffer) and writes the reward model's, token embeddings and image half, into ``rm_embeds`` (a buffer of
  ``max_num_batched_tokens`` rows held by the model, so a captured CUDA graph reads a fixed address).
- ``forward`` runs the target, then the reward model's decoder over ``rm_embeds`` (compiled by vLLM like the
  target's, under the model tag ``vlm_steer_rm``) at the target's positions, and returns both final hidden
  states, [T, D_t + D_r].
- ``compute_logits`` returns the target's logits; TITA's processor reads the reward model's for its rows
  (``in_model.RewardInModel.rm_logits``). Steps with no TITA row skip the decoder and its embeddings.

Selected with ``hf_overrides={"architectures": [arch], REWARD_KEY: {"path": ...}}`` and
``model_class_overrides={arch: class}`` (``fork_spec.PAIR_ARCHES``, ``fork_spec.in_model_overrides``); the
reward model's checkpoint loads as vLLM's secondary weights (``DefaultModelLoader.Source``, as ``ultravox.py``
does).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.gemma3_mm import Gemma3ForConditionalGeneration
from vllm.model_executor.models.llava import (LlavaForConditionalGeneration, LlavaImageEmbeddingInputs,
                                              LlavaMultiModalProjector, init_vision_tower_for_llava)
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.utils import AutoWeightsLoader, _merge_multimodal_embeddings

from decoding.vllm.fork_spec import REWARD_KEY
from decoding.vllm.in_model import RewardDecoder, RewardInModel, load_stacked, number_after



def without_reward(embeddings: torch.Tensor, width: int) -> torch.Tensor:
    """An image's target embeddings [..., tokens, D_t] with a zero reward half [..., tokens, D_r]: what a step
    without a TITA row puts in vLLM's encoder cache. No TITA request reads such an entry: the vllm engine gives
    the images of TITA requests cache keys of their own (``decoding.vllm.engine.tita_image_key``)."""
    return torch.cat([embeddings, embeddings.new_zeros(*embeddings.shape[:-1], width)], -1)

class _Tower(nn.Module):
    """The reward model's vision tower and projector, under the names vLLM's LLaVA loader expects."""

    def __init__(self, config, quant_config):
        super().__init__()
        self.vision_tower = init_vision_tower_for_llava(config, quant_config, require_post_norm=False, prefix="rm_vision_tower")
        self.multi_modal_projector = LlavaMultiModalProjector(
            vision_hidden_size=config.vision_config.hidden_size, text_hidden_size=config.text_config.hidden_size,
            projector_hidden_act=config.projector_hidden_act or "gelu",
            multimodal_projector_bias=config.multimodal_projector_bias, quant_config=quant_config,
            prefix="rm_multi_modal_projector")


class PairedLlava(RewardInModel, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from transformers import AutoConfig
        from vllm.compilation.backends import set_model_tag

        spec = getattr(vllm_config.model_config.hf_config, REWARD_KEY)
        rm = AutoConfig.from_pretrained(spec["path"])
        text = rm.text_config
        self.rm_config = rm
        self.rm_width, self.rm_vocab = text.hidden_size, text.vocab_size
        self.rm_tower = _Tower(rm, vllm_config.quant_config)
        self.rm_shares_tower = False  # set at load: the two towers hold the same weights, so it runs once
        self.rm_embed = VocabParallelEmbedding(text.vocab_size, text.hidden_size, prefix="rm_embed")
        with set_model_tag("vlm_steer_rm"):
            self.rm_decoder = RewardDecoder(vllm_config=vllm_config, prefix="rm_decoder", config=text,
                                            layers=text.num_hidden_layers, first=self.config.text_config.num_hidden_layers)
        # transformers 5 keeps the flag on the LLaVA config, and vLLM copies it down to the text config
        tied = getattr(rm, "tie_word_embeddings", text.tie_word_embeddings)
        self.rm_head = self.rm_embed if tied else ParallelLMHead(text.vocab_size, text.hidden_size, prefix="rm_head")
        self.rm_vocab_processor = LogitsProcessor(text.vocab_size, scale=getattr(text, "logit_scale", 1.0))
        rows = vllm_config.scheduler_config.max_num_batched_tokens
        self.register_buffer("rm_embeds", torch.zeros(rows, text.hidden_size), persistent=False)
        self.secondary_weights = [DefaultModelLoader.Source(spec["path"], None, prefix="rm.")]
        self._register(vllm_config)

    # ------------------------------------------------------------ inputs

    def embed_multimodal(self, **kwargs: object):
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise ValueError("image embeddings cannot feed the reward model: send the image itself")
        features = self._process_image_pixels(image_input)  # [images, tokens, D_vision]
        ours = self.multi_modal_projector(features)
        if not self.fork_active:  # no TITA row: the reward model's half is never read (see ``without_reward``)
            return without_reward(ours, self.rm_width)
        theirs = self._reward_images(image_input, features)
        return torch.cat([ours, theirs.to(ours.dtype)], -1)

    def _reward_images(self, image_input, features: torch.Tensor) -> torch.Tensor:
        """The reward model's image embeddings [images, tokens, D_r]: its projector over the target's tower
        features where the towers are one, else over its own tower's."""
        self.rm_image_calls += 1
        if not self.rm_shares_tower:
            features = self._image_pixels_to_features(self.rm_tower.vision_tower, image_input["pixel_values"])
        return self.rm_tower.multi_modal_projector(features)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        ours, theirs = self._halves(multimodal_embeddings)
        out = super().embed_input_ids(input_ids, ours, is_multimodal=is_multimodal)
        if self.fork_active:  # the reward model's inputs for this step's forward
            rm = self._embed_text_input_ids(self._in_rm_vocab(input_ids), self.rm_embed, is_multimodal=is_multimodal)
            if theirs:
                rm = _merge_multimodal_embeddings(rm, theirs, is_multimodal)
            self.rm_embeds[: rm.shape[0]].copy_(rm)
        return out

    # ------------------------------------------------------------ step

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if not self.fork_active:  # no TITA row in this step: the reward model's half is never read
            return self._with_reward(hidden, None)
        self.fork_steps += 1
        if inputs_embeds is None:  # token ids only (no multimodal path this step)
            self.rm_embeds[: input_ids.shape[0]].copy_(self.rm_embed(self._in_rm_vocab(input_ids)))
        return self._with_reward(hidden, lambda: self.rm_decoder(positions, self.rm_embeds[: hidden.shape[0]]))

    # ------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        tower: list[tuple[str, torch.Tensor]] = []
        reward: set[str] = set()

        def target_only():  # the reward model's tensors load as they arrive (the tower's after the target's)
            for name, w in weights:
                if name.startswith("rm."):
                    reward.update(self._load_reward(params, name[3:], w, tower))
                else:
                    yield name, w

        loaded = super().load_weights(target_only())
        reward |= {f"rm_tower.{n}" for n in AutoWeightsLoader(self.rm_tower).load_weights(tower)}
        self._share_tower_if_equal()
        return loaded | reward

    def _load_reward(self, params: dict, name: str, w: torch.Tensor, tower: list) -> set[str]:
        """One tensor of the reward model's checkpoint (either of transformers' LLaVA layouts, mapped as vLLM
        maps the target's) into the reward modules; its vision tower's and projector's go to ``tower``."""
        out = set()
        for name, w in self.hf_to_vllm_mapper.apply([(name, w)]):
            if name.startswith(("vision_tower.", "multi_modal_projector.")):
                tower.append((name, w))
                continue
            if name == "language_model.lm_head.weight":
                if self.rm_head is self.rm_embed:
                    continue  # tied: the embedding is the head
                target = "rm_head.weight"
            elif name == "language_model.model.embed_tokens.weight":
                target = "rm_embed.weight"
            elif name == "language_model.model.norm.weight":
                target = "rm_decoder.norm.weight"
            elif name.startswith("language_model.model.layers."):
                target = "rm_decoder.layers." + name.removeprefix("language_model.model.layers.")
                if "rotary_emb" in target:
                    continue
            else:
                raise ValueError(f"unexpected tensor {name!r} in the reward model's checkpoint")
            out.add(load_stacked(params, target, w))
        return out

    def _share_tower_if_equal(self) -> None:
        """Whether the two vision towers hold the same weights (then the target's serves both and the copy's
        memory goes back); decided on every tensor-parallel rank alike (each compares its own shards)."""
        ours, theirs = self.vision_tower.state_dict(), self.rm_tower.vision_tower.state_dict()
        same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

        if get_tensor_model_parallel_world_size() > 1:
            import torch.distributed as dist

            flag = torch.tensor([int(same)], device=next(iter(ours.values())).device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=get_tp_group().device_group)
            same = bool(flag.item())
        self.rm_shares_tower = same
        if same:
            self.rm_tower.vision_tower = None


class _Paired(RewardInModel):
    """A separate reward model of the target's family inside vLLM's model: ``self.rm`` is vLLM's own class
    for the reward model's architecture, built from its config; the subclasses below name the family."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from transformers import AutoConfig
        from vllm.compilation.backends import set_model_tag
        from vllm.model_executor.model_loader.utils import get_model_architecture

        spec = getattr(vllm_config.model_config.hf_config, REWARD_KEY)
        rm = AutoConfig.from_pretrained(spec["path"])
        text = rm.get_text_config()
        tied = getattr(rm, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))
        sub = vllm_config.with_hf_config(rm, architectures=list(rm.architectures))
        # ``with_hf_config`` copies the target's tie flag into the reward model's text config: its own goes back
        sub.model_config.hf_config.get_text_config().tie_word_embeddings = tied
        cls, _ = get_model_architecture(sub.model_config)
        with set_model_tag("vlm_steer_rm"):
            self.rm = cls(vllm_config=sub, prefix="rm")
        # vLLM needs one distinct integer per attention layer name: the reward model's count on from the target's
        number_after(self.rm, vllm_config, self.config.get_text_config().num_hidden_layers)
        lm = self.rm.language_model
        self.rm_head, self.rm_vocab_processor = lm.lm_head, lm.logits_processor
        self.rm_width, self.rm_vocab = text.hidden_size, text.vocab_size
        rows = vllm_config.scheduler_config.max_num_batched_tokens
        self.register_buffer("rm_embeds", torch.zeros(rows, text.hidden_size), persistent=False)
        self.secondary_weights = [DefaultModelLoader.Source(spec["path"], None, prefix="rm.")]
        self._register(vllm_config)

    def embed_multimodal(self, **kwargs: object):
        ours = super().embed_multimodal(**kwargs)
        if ours is None or not len(ours):
            return ours
        if not self.fork_active:  # no TITA row: the reward model's tower does not run (see ``without_reward``)
            return [without_reward(a, self.rm_width) for a in ours]
        theirs = self._reward_images(**kwargs)
        return [torch.cat([a, b.to(a.dtype)], -1) for a, b in zip(ours, theirs, strict=True)]

    def _reward_images(self, **kwargs: object):
        """The reward model's image embeddings, per image [tokens, D_r] (its own tower and projector)."""
        self.rm_image_calls += 1
        return self.rm.embed_multimodal(**kwargs)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        ours, theirs = self._halves(multimodal_embeddings)
        out = super().embed_input_ids(input_ids, ours, is_multimodal=is_multimodal, **kwargs)
        if self.fork_active:  # the reward model's inputs for this step's forward
            rm = self.rm.embed_input_ids(self._in_rm_vocab(input_ids), theirs, is_multimodal=is_multimodal, **kwargs)
            self.rm_embeds[: rm.shape[0]].copy_(rm)
        return out

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if not self.fork_active:  # no TITA row in this step: the reward model's half is never read
            return self._with_reward(hidden, None)
        self.fork_steps += 1
        t = hidden.shape[0]
        if inputs_embeds is None:  # token ids only (no multimodal path this step)
            self.rm_embeds[:t].copy_(self.rm.embed_input_ids(self._in_rm_vocab(input_ids)))
        return self._with_reward(hidden, lambda: self.rm(None, positions, None, inputs_embeds=self.rm_embeds[:t]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        reward: list[tuple[str, torch.Tensor]] = []
        loaded = super().load_weights(self._target_weights(weights, reward))
        return loaded | {f"rm.{n}" for n in self.rm.load_weights(iter(reward))}


class PairedLlavaNext(_Paired, LlavaNextForConditionalGeneration):
    """A separate LLaVA-NeXT reward model inside vLLM's LLaVA-NeXT model."""


class PairedQwen2_5_VL(_Paired, Qwen2_5_VLForConditionalGeneration):
    """A separate Qwen2.5-VL reward model inside vLLM's Qwen2.5-VL model (M-RoPE positions shared)."""


class PairedGemma3(_Paired, Gemma3ForConditionalGeneration):
    """A separate Gemma 3 reward model inside vLLM's Gemma 3 model."""
