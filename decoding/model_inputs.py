"""What a VLM family's forward takes beside the prompt ids, and how rows are batched for one prefill.

A processor returns, with ``input_ids``, the tensors its family's forward needs: ``pixel_values`` (in the
family's layout), ``image_sizes`` (LLaVA-NeXT), ``image_grid_thw`` and ``mm_token_type_ids`` (Qwen2-VL
family), ``token_type_ids`` (Gemma 3), ``pixel_attention_mask`` (Idefics3), ... A row keeps all of them
(``row_inputs``); ``batch_inputs`` batches rows as the processor batches several prompts: per-token
tensors are left-padded like the ids, image tensors are concatenated along their first dimension (how
every family's forward takes several images). Rows whose image tensors cannot be concatenated (LLaVA-NeXT
images with different numbers of crops) go to separate prefill groups (``prefill_groups``) rather than
being padded in a family-specific way.

Positions: most families take 1-D positions (``cumsum(mask) - 1`` under left padding). Families with
multimodal rotary positions (M-RoPE: Qwen2-VL, Qwen2.5-VL and kin, recognised by the model's
``get_rope_index``) take ``[4, B, T]`` at prefill (text positions, then temporal/height/width, as
``transformers``' ``generate`` builds them) and, at decode, the row's next position on all three axes.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

TEXT_KEYS = ("input_ids", "attention_mask")


class NoSuchFolder(ValueError):
    """A model folder that is not there (the CLI prints it as one line)."""


def local_folder(path, what: str) -> None:
    """Models load from local folders only: a missing one is a clear ``NoSuchFolder`` (a ValueError) at once
    (``from_pretrained`` would take it for a hub id and retry the network for a minute before failing)."""
    if not Path(path).is_dir():
        raise NoSuchFolder(f"{what} {path}: no such folder (models load from local folders)")


def row_inputs(processor_output) -> dict[str, torch.Tensor]:
    """Every tensor of a processor's output for one prompt except the ids and their mask."""
    return {k: v for k, v in processor_output.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}


def per_token(value: torch.Tensor, n_tokens: int) -> bool:
    """Whether a tensor holds one integer per prompt token (``token_type_ids``, ``mm_token_type_ids``)."""
    return value.ndim == 2 and tuple(value.shape) == (1, n_tokens) and not value.is_floating_point()


def signature(inputs: dict[str, torch.Tensor], n_tokens: int) -> tuple | None:
    """What must match for rows to share a prefill: the image tensors' names, trailing shapes and dtypes
    (None: a row without image tensors, which can join any group)."""
    sig = tuple(sorted((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in inputs.items() if not per_token(v, n_tokens)))
    return sig or None


def prefill_groups(rows) -> list[list[int]]:
    """Row indices per prefill forward, in order of first appearance; rows without images join the first group."""
    groups: dict[tuple | None, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(signature(r.inputs, len(r.prompt_ids)), []).append(i)
    if None in groups and len(groups) > 1:
        blind = groups.pop(None)
        first = next(iter(groups))
        groups[first] = sorted(groups[first] + blind)
    return list(groups.values())


def batch_inputs(rows, width: int) -> dict[str, torch.Tensor]:
    """The rows' tensors as one forward takes them (``width``: the left-padded prompt length)."""
    out: dict[str, torch.Tensor] = {}
    keys = dict.fromkeys(k for r in rows for k in r.inputs)
    for k in keys:
        token_wise = [per_token(r.inputs[k], len(r.prompt_ids)) for r in rows if k in r.inputs]
        if all(token_wise):
            first = next(r.inputs[k] for r in rows if k in r.inputs)
            padded = first.new_zeros((len(rows), width))
            for i, r in enumerate(rows):
                if k in r.inputs:
                    padded[i, width - len(r.prompt_ids):] = r.inputs[k][0]
            out[k] = padded
        else:
            out[k] = torch.cat([r.inputs[k] for r in rows if k in r.inputs])
    return out


def inputs_for(processor, config, prompt_ids: list[int], images: list) -> dict[str, torch.Tensor]:
    """A row's processor tensors from prompt ids whose image placeholders are already expanded, and its
    images, for a caller that holds ids but not the prompt text (vLLM's worker): the image processor's
    output and, where the processor returns them, per-token type ids (image tokens marked 1)."""
    out = row_inputs(processor.image_processor(images=images, return_tensors="pt")) if images else {}
    image_token = getattr(config, "image_token_id", None)
    for key in getattr(processor, "model_input_names", []):
        if key.endswith("token_type_ids") and image_token is not None:
            out[key] = (torch.tensor([prompt_ids]) == image_token).long()
    return out


def extended(inputs: dict[str, torch.Tensor], n_prompt: int, n_more: int) -> dict[str, torch.Tensor]:
    """The tensors of a prompt of ``n_prompt`` tokens followed by ``n_more`` generated (text) tokens."""
    if not n_more:
        return inputs
    return {k: torch.cat([v, v.new_zeros((1, n_more))], dim=1) if per_token(v, n_prompt) else v for k, v in inputs.items()}


class Positions:
    """1-D positions: each row counts its own tokens (left padding takes none)."""

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(position_ids for the forward, next position per row [B])``."""
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return pos, pos[:, -1] + 1

    def decode(self, next_pos: torch.Tensor) -> torch.Tensor:
        return next_pos.view(-1, 1)

    def span(self, next_pos: torch.Tensor, n: int) -> torch.Tensor:
        """Position ids of ``n`` text tokens per row from ``next_pos`` [B] on (a catch-up forward)."""
        return next_pos.view(-1, 1) + torch.arange(n, device=next_pos.device)


class MultimodalRotaryPositions(Positions):
    """M-RoPE (Qwen2-VL family): the model's ``get_rope_index`` places image tokens on a 3-D grid; text
    after an image continues from the grid's largest position, so a row's next position is its maximum + 1."""

    def __init__(self, inner_model):
        self.rope_index = inner_model.get_rope_index
        self.accepts = set(inspect.signature(self.rope_index).parameters)

    def prefill(self, ids, mask, inputs):
        text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if any(inputs.get(k) is not None for k in ("image_grid_thw", "video_grid_thw")):
            grid, _ = self.rope_index(ids, attention_mask=mask, **{k: v for k, v in inputs.items() if k in self.accepts})
        else:
            grid = text[None].expand(3, -1, -1)
        next_pos = grid.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1
        return torch.cat([text[None], grid]), next_pos

    def decode(self, next_pos):
        return next_pos.view(1, -1, 1)

    def span(self, next_pos, n):
        return (next_pos.view(-1, 1) + torch.arange(n, device=next_pos.device))[None]


def positions_for(model) -> Positions:
    inner = getattr(model, "model", None)
    return MultimodalRotaryPositions(inner) if hasattr(inner, "get_rope_index") else Positions()
