"""One decode step of a Llama language model, written out (gpt-fast style) over the model's own weights.

A decode step feeds one token per row. ``transformers``' forward pays, per step and per layer, for what
only prefill needs (mask building for every attention backend, output capture, config look-ups, module
hooks); on a small model that overhead is most of the step. This is the same arithmetic in a dozen tensor
ops per layer, on the same weights and the same KV cache object (so row selection and merging, done on
the cache, stay as they are). Prefill stays with ``transformers``.

Used only where it is the same model: plain Llama layers with the default rotary embedding (what
``supported`` checks); anything else decodes through ``transformers``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supported(text_model) -> bool:
    cfg = getattr(text_model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    return (rope.get("rope_type", "default") == "default" and not cfg.attention_bias and not cfg.mlp_bias
            and cfg.hidden_act == "silu" and getattr(cfg, "pretraining_tp", 1) == 1
            and all(type(layer).__name__ == "LlamaDecoderLayer" for layer in text_model.layers))


def _fuse(*linears: torch.nn.Linear) -> torch.Tensor:
    """One weight for several projections of the same input (one matmul instead of several). The modules'
    weights become views into it, so nothing is stored twice and prefill reads the same numbers."""
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused[start : start + n], requires_grad=False)
        start += n
    return fused


class LlamaDecoder:
    """``decoder(tokens [B], mask [B, T], positions [B], cache) -> logits [B, V]`` (the cache grows by one)."""

    def __init__(self, text_model, head: torch.nn.Module):
        cfg = text_model.config
        self.embed = text_model.embed_tokens.weight
        self.head = head.weight if head is not None else None
        self.norm = (text_model.norm.weight, text_model.norm.variance_epsilon)
        self.inv_freq = text_model.rotary_emb.inv_freq
        self.rope_scale = text_model.rotary_emb.attention_scaling
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = text_model.layers[0].self_attn.scaling
        self.layers = []
        for layer in text_model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                                _fuse(a.q_proj, a.k_proj, a.v_proj), a.o_proj.weight,
                                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                                _fuse(m.gate_proj, m.up_proj), m.down_proj.weight))
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim

    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def __call__(self, tokens: torch.Tensor | None, mask: torch.Tensor, positions: torch.Tensor, cache,
                 embeds: torch.Tensor | None = None, capture: int | None = None, head: bool = True) -> torch.Tensor:
        """Feed ``tokens`` [B] (one per row), or ``embeds`` [B, P, D] (hidden states entering the first layer,
        P new positions per row: a forked reward model's catch-up). ``mask`` [B, T] covers the cache and the
        new positions, ``positions`` [B] (the first new position; the others follow). ``capture``: keep the
        hidden state entering that layer in ``self.captured`` [B, P, D]. Returns the logits [B, V] of the
        last position, or with ``head=False`` its final-normed hidden state [B, D]."""
        x = F.embedding(tokens.view(-1, 1), self.embed) if embeds is None else embeds  # [B, P, D]
        b, p = x.shape[:2]
        pos = positions.view(b, 1).float() + torch.arange(p, device=x.device, dtype=torch.float32)
        freqs = pos[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(x.dtype)[:, None]  # [B, 1, P, hd]
        sin = (emb.sin() * self.rope_scale).to(x.dtype)[:, None]
        attend = mask.bool()[:, None, None, :]  # [B, 1, 1, T]: padding is not attended
        if p > 1:  # the new positions see each other causally
            t = mask.shape[1]
            causal = torch.ones(p, t, dtype=torch.bool, device=x.device).tril(t - p)
            attend = attend & causal
        gqa = self.kv_heads != self.heads
        for i, (w_in, eps_in, wqkv, wo, w_post, eps_post, w_gate_up, wd) in enumerate(self.layers):
            if i == capture:
                self.captured = x
            h = self._rms(x, w_in, eps_in)
            q, k, v = F.linear(h, wqkv).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = q.view(b, p, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(b, p, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(b, p, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            k, v = cache.update(k, v, i)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=self.scale, enable_gqa=gqa)
            x = x + F.linear(o.transpose(1, 2).reshape(b, p, -1), wo)
            h = self._rms(x, w_post, eps_post)
            gate, up = F.linear(h, w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, wd)
        if capture == len(self.layers):
            self.captured = x
        out = self._rms(x[:, -1], *self.norm)
        return F.linear(out, self.head) if head else out
