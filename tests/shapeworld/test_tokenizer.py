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


def test_json_answers_encode_to_the_json_tokens_and_decode_back():
    """A JSON answer is the raw JSON tokens around word tokens (no unknown token), decodes to itself, and
    encodes the same inside a conversation (the opening swallows the template's space); CLIP's text
    tokenizer keeps the unused slots (the verifier never reads JSON)."""
    from shapeworld.text import JSON_TOKENS, json_answer

    tok = build_tokenizer()
    text = json_answer([("red", "square"), ("blue", "circle")])
    assert text == '{"objects":["red square","blue circle"]}'
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ['{"objects":[', '"red', "▁square", '",', '"blue', "▁circle", '"]}']
    assert tok.decode(ids) == text
    chat = [{"role": "user", "content": "describe the image ."}, {"role": "assistant", "content": text},
            {"role": "user", "content": "is there a red square ?"}]
    conv = tok(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)).input_ids
    assert tok.unk_token_id not in conv and ids == conv[7 : 7 + len(ids)]
    assert len(tok) == 64 and all(tok.convert_tokens_to_ids(t) != tok.unk_token_id for t in JSON_TOKENS)
    clip = build_tokenizer(for_clip_text=True)
    assert clip.convert_ids_to_tokens(list(range(53, 64))) == [f"<extra_{i}>" for i in range(53, 64)]


def test_the_committed_tokenizers_are_the_builders():
    """The embedded VLM's and reward model's tokenizer files are ``build_tokenizer``'s (JSON tokens included)."""
    from transformers import AutoTokenizer

    from shapeworld.models import MODELS_DIR

    want = build_tokenizer().get_vocab()
    for d in ("vlm", "reward"):
        assert AutoTokenizer.from_pretrained(MODELS_DIR / d).get_vocab() == want
