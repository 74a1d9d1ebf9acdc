"""The in-place KV cache gives what transformers' DynamicCache gives, through decode steps, row
selection and cropping (the operations the engine performs on it)."""

import torch
from transformers import DynamicCache

from decoding.kv_cache import GrowingCache
from shapeworld.models import MODELS_DIR


def _run(model, cache_cls):
    torch.manual_seed(0)
    ids = torch.randint(5, 60, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    cache = cache_cls()
    lm = model.model.language_model
    out = lm(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    logits = [model.lm_head(out.last_hidden_state[:, -1])]
    last = logits[-1]
    for step in range(40):  # past the first spare capacity (32)
        if step == 5:  # a row leaves
            cache.batch_select_indices(torch.tensor([0, 2, 3]))
            mask, last = mask[[0, 2, 3]], last[[0, 2, 3]]
        if step == 20:  # the engine drops columns that are padding for every row left
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, 1:], layer.values[:, :, 1:]
            mask = mask[:, 1:]
        mask = torch.cat([mask, mask.new_ones((len(mask), 1))], 1)
        tok = last.argmax(-1, keepdim=True)
        out = lm(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
        last = model.lm_head(out.last_hidden_state[:, -1])
        logits.append(last)
    return logits, cache


@torch.inference_mode()
def test_growing_cache_matches_dynamic_cache():
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(MODELS_DIR / "vlm").eval()
    ref, ref_cache = _run(model, DynamicCache)
    got, cache = _run(model, GrowingCache)
    assert len(ref) == len(got) == 41
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 9 + 40 - 1
    for a, b in zip(ref_cache.layers, cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)
