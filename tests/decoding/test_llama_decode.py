"""The written-out Llama decode step computes what transformers' forward computes, row by row, on
left-padded batches, through steps, and with fused projections that prefill reads unchanged."""

import torch
from transformers import AutoModelForImageTextToText

from decoding.kv_cache import GrowingCache
from decoding.llama_decode import LlamaDecoder, supported
from shapeworld.models import MODELS_DIR


@torch.inference_mode()
def test_decode_step_matches_transformers():
    model = AutoModelForImageTextToText.from_pretrained(MODELS_DIR / "vlm").eval()
    lm, head = model.get_decoder(), model.get_output_embeddings()
    assert supported(lm)
    torch.manual_seed(0)
    ids = torch.randint(5, 60, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    before = lm(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    decoder = LlamaDecoder(lm, head)  # fuses q/k/v and gate/up: prefill must not change
    torch.testing.assert_close(lm(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state, before,
                               rtol=0, atol=0)
    caches = {"hf": GrowingCache(), "ours": GrowingCache()}
    for c in caches.values():
        lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=c, use_cache=True)
    nxt, tok = pos[:, -1] + 1, torch.tensor([7, 20, 33])
    for _ in range(6):
        mask = torch.cat([mask, mask.new_ones((3, 1))], 1)
        ref = head(lm(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt[:, None],
                      past_key_values=caches["hf"], use_cache=True).last_hidden_state[:, -1])
        got = decoder(tok, mask, nxt, caches["ours"])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        tok, nxt = ref.argmax(-1), nxt + 1
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
