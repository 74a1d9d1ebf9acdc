"""The embedded models' tokenizer and LLaVA processor."""

from PIL import Image

from shapeworld.models import llava_processor
from shapeworld.tokenizer import build_tokenizer


def test_round_trip_and_specials():
    tok = build_tokenizer()
    text = "a red circle and a blue square ."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.eos_token_id != 2  # CLIP's text tower treats eos id 2 as a legacy case
    assert "<image>" in tok.all_special_tokens


def test_chat_template_llava_style():
    tok = build_tokenizer()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]}]
    s = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert s == "USER: <image> describe the image . ASSISTANT:"
    toks = tok.convert_ids_to_tokens(tok(s).input_ids)
    assert toks == ["<s>", "▁USER:", "<image>", "▁describe", "▁the", "▁image", "▁.", "▁ASSISTANT:"]
    # plain string content and system messages
    s = tok.apply_chat_template([{"role": "system", "content": "be brief ."}, {"role": "user", "content": "hi"}],
                                tokenize=False, add_generation_prompt=True)
    assert s == "USER: be brief . hi ASSISTANT:"


def test_processor_expands_image_token_to_patch_count():
    proc = llava_processor()
    out = proc(images=Image.new("RGB", (64, 64)), text="USER: <image> describe the image . ASSISTANT:")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert out["input_ids"][0].count(image_id) == 64
    # other sizes are resized to the model's 64x64
    out = proc(images=Image.new("RGB", (200, 120)), text="USER: <image> hi ASSISTANT:", return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 3, 64, 64)
