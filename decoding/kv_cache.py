"""A KV cache that appends in place: ``transformers``' DynamicCache grows each layer by concatenation,
copying the whole cache at every decode step; this one keeps spare capacity and writes into it.

Anything that replaces a layer's ``keys``/``values`` from outside (row selection, left-padding on merge)
is picked up at the next update: the layer then re-adopts the new tensors into a fresh buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def _owns_prefix(self, n: int) -> bool:
        """Whether ``keys``/``values`` are still the first ``n`` positions of this layer's buffers."""
        kb, vb = self._kbuf, self._vbuf
        return (kb is not None and n > 0 and self.keys.data_ptr() == kb.data_ptr()
                and self.values.data_ptr() == vb.data_ptr() and self.keys.shape == (*kb.shape[:2], n, kb.shape[3])
                and self.values.shape == self.keys.shape and self.keys.stride() == kb.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.get_seq_length(), key_states.shape[-2]
        if not self._owns_prefix(n) or n + t > self._kbuf.shape[-2]:
            capacity = n + t + max(32, (n + t) // 2)
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
            kb, vb = key_states.new_empty(shape), value_states.new_empty(shape)
            if n:
                kb[:, :, :n], vb[:, :, :n] = self.keys, self.values
            self._kbuf, self._vbuf = kb, vb
        self._kbuf[:, :, n : n + t] = key_states
        self._vbuf[:, :, n : n + t] = value_states
        self.keys, self.values = self._kbuf[:, :, : n + t], self._vbuf[:, :, : n + t]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """DynamicCache whose layers append in place (same interface, same results)."""

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer


def select_cache(cache, mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keep rows ``idx`` of a left-padded cache (in place) and return their mask [len(idx), T'], with the
    leading columns that are now padding for every row dropped from both."""
    cache.batch_select_indices(idx)
    mask = mask[idx]
    drop = int((mask.sum(0) == 0).long().cumprod(0).sum())
    if drop:
        mask = mask[:, drop:]
        for layer in cache.layers:
            if layer.keys is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
    return mask


def merge_caches(a, mask_a: torch.Tensor, b, mask_b: torch.Tensor) -> tuple[GrowingCache, torch.Tensor]:
    """One left-padded cache from two: the shorter is left-padded (masked) to the longer one."""
    ta, tb = mask_a.shape[1], mask_b.shape[1]
    t = max(ta, tb)
    cache = GrowingCache()
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        k = torch.cat([F.pad(la.keys, (0, 0, t - ta, 0)), F.pad(lb.keys, (0, 0, t - tb, 0))])
        v = torch.cat([F.pad(la.values, (0, 0, t - ta, 0)), F.pad(lb.values, (0, 0, t - tb, 0))])
        cache.update(k, v, i)
    return cache, torch.cat([F.pad(mask_a, (t - ta, 0)), F.pad(mask_b, (t - tb, 0))])
