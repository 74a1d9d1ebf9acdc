"""Tiny random-weight checkpoints of other VLM families, built offline (seeded, no download).

``build(family, path)`` writes a hub-shaped folder (config, safetensors, processor, tokenizer, chat
template) that ``AutoProcessor`` and ``AutoModelForImageTextToText`` load: LLaVA-1.5 (CLIP tower, Llama,
SentencePiece-style tokenizer), LLaVA-NeXT (any-resolution crops), Qwen2.5-VL (window-attention tower,
M-RoPE, byte-level BPE) and Gemma 3 (SigLIP tower, bidirectional image attention). ``build_verifier``
writes a CLIP or SigLIP dual encoder with the same image size. These checkpoints prove code paths and
equality with transformers, not quality. Sizes: ``tiny`` for tests, ``mid`` (about 300 M language-model
parameters) and ``7b``-shaped for speed benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from reward_models.checkpoints import save_checkpoint

FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "gemma3")
SLIDING_WINDOW = int(__import__("os").environ.get("FAMILIES_SLIDING_WINDOW", 16))  # Gemma 3: shorter than the prompts

# A few hundred sentences: enough for a BPE with words, sub-words and the bytes of accented and CJK text.
_WORDS = ("a red circle , a blue square and a green triangle . there is a yellow star next to the purple "
          "heart . is there a cat on the table ? yes . no . the image shows two dogs playing in a park with "
          "a ball . describe the image . what colour is the car ? a café in 日本 with coffee and cake").split()
_SENTENCES = [" ".join(_WORDS[i:i + 9]) for i in range(0, len(_WORDS) - 9)] * 6 + [
    "Yes, there is.", "No, there is not.", "The answer is yes", "The answer is no", "a café in 日本",
    "Describe the image in detail.", "What is in the picture?", "un café à Paris, naïve résumé",
]


def _sentences(n: int = 300) -> list[str]:
    g = torch.Generator().manual_seed(0)
    out = list(_SENTENCES)
    while len(out) < n:
        idx = torch.randint(len(_WORDS), (8,), generator=g).tolist()
        out.append(" ".join(_WORDS[i] for i in idx))
    return out


def train_tokenizer(kind: str, specials: list[str], vocab_size: int = 600) -> Tokenizer:
    """A BPE trained on ``_sentences``: ``kind`` "spm" (Llama / Gemma style: ``▁`` marks a word start,
    byte fallback) or "bytelevel" (GPT-2 / Qwen style)."""
    if kind == "spm":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        # trained on words (as SentencePiece is: no merge across a word boundary), then used as Llama's
        # tokenizer.json is: a normalizer that prepends "▁" and turns spaces into "▁", no pre-tokenizer
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        bytes_ = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*specials, *bytes_],
                                      initial_alphabet=["▁"], show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_sentences(), trainer)
    if kind == "spm":  # the byte pieces are vocabulary, not special tokens (decoding must not drop them)
        spec = json.loads(tok.to_str())
        spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
        tok = Tokenizer.from_str(json.dumps(spec))
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return tok


# LLaVA-1.5 / NeXT's hub template (llava-hf): iterates over content parts, as the hub's does.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<start_of_image>' }}{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

SIZES = {  # language model: hidden, layers, heads, kv heads, intermediate, vocabulary rows (None: the tokenizer's);
    # vision: hidden, layers, heads, image size, patch
    "tiny": dict(hidden=128, layers=2, heads=2, kv=1, inter=256, vocab=None, v_hidden=64, v_layers=2, v_heads=2, image=32, patch=8),
    "tiny_rm": dict(hidden=64, layers=1, heads=1, kv=1, inter=128, vocab=None, v_hidden=64, v_layers=2, v_heads=2, image=32, patch=8),
    # output layers padded past the tokenizer, or short of it (Qwen2.5-VL-7B vs 3B: 152,064 vs 151,936 rows)
    "tiny_padded": dict(hidden=128, layers=2, heads=2, kv=1, inter=256, vocab=700, v_hidden=64, v_layers=2, v_heads=2, image=32, patch=8),
    "tiny_rm_short": dict(hidden=64, layers=1, heads=1, kv=1, inter=128, vocab=64, v_hidden=64, v_layers=2, v_heads=2, image=32, patch=8),
    # a LLaVA-1.5-shaped target of about 240 M language-model parameters (Llama vocabulary rows) and a
    # reward model of about 1/4 of its FLOPs per token, small images: a CPU-sized speed benchmark
    "mid": dict(hidden=1024, layers=16, heads=16, kv=16, inter=2816, vocab=32064, v_hidden=256, v_layers=4, v_heads=4, image=32, patch=8),
    "mid_rm": dict(hidden=512, layers=12, heads=8, kv=8, inter=1408, vocab=32064, v_hidden=256, v_layers=4, v_heads=4, image=32, patch=8),
    # the same with LLaVA-1.5's image grid (336 px in patches of 14: 576 image tokens per prompt), for the
    # steered-arrival benchmark, whose cost is the reward model's prefill of a prompt of that length
    "mid_576": dict(hidden=1024, layers=16, heads=16, kv=16, inter=2816, vocab=32064, v_hidden=256, v_layers=4, v_heads=4, image=336, patch=14),
    "mid_rm_576": dict(hidden=512, layers=12, heads=8, kv=8, inter=1408, vocab=32064, v_hidden=256, v_layers=4, v_heads=4, image=336, patch=14),
    # real shapes, for the GPU check: LLaVA-1.5-7B with a TinyLlama-1.1B-shaped reward model (CLIP-L/14 336)
    "7b": dict(hidden=4096, layers=32, heads=32, kv=32, inter=11008, vocab=32064, v_hidden=1024, v_layers=24, v_heads=16, image=336, patch=14),
    "1b": dict(hidden=2048, layers=22, heads=32, kv=4, inter=5632, vocab=32064, v_hidden=1024, v_layers=24, v_heads=16, image=336, patch=14),
    # Qwen2.5-VL-7B with a Qwen2.5-VL-3B-shaped reward model
    "qwen7b": dict(hidden=3584, layers=28, heads=28, kv=4, inter=18944, vocab=152064, v_hidden=1280, v_layers=32, v_heads=16, image=448, patch=14),
    "qwen3b": dict(hidden=2048, layers=36, heads=16, kv=2, inter=11008, vocab=151936, v_hidden=1280, v_layers=32, v_heads=16, image=448, patch=14),
}


def _fast(tok: Tokenizer, **kw) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def _llama(vocab: int, s: dict, tok, **kw) -> dict:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=s["vocab"] or vocab, hidden_size=s["hidden"], intermediate_size=s["inter"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                       head_dim=s["hidden"] // s["heads"], max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                       **kw).to_dict()


def _clip_vision(s: dict, image_size: int, patch: int) -> dict:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=2 * s["v_hidden"], num_hidden_layers=s["v_layers"],
                            num_attention_heads=s["v_heads"], image_size=image_size, patch_size=patch,
                            projection_dim=s["v_hidden"]).to_dict()


def _spm_tokenizer(extra: list[str], image: str) -> PreTrainedTokenizerFast:
    tok = train_tokenizer("spm", ["<unk>", "<s>", "</s>", "<pad>", *extra])
    fast = _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", padding_side="left",
                 extra_special_tokens={"image_token": image})
    return fast


def _llava(path: Path, size: str, next_: bool) -> None:
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor,
                              LlavaProcessor)

    s = SIZES[size]
    tok = _spm_tokenizer(["<image>"], "<image>")
    tok.add_special_tokens({"bos_token": AddedToken("<s>", special=True)})  # the template writes none: the tokenizer adds it
    image_size, patch = s["image"], s["patch"]
    image_id = tok.convert_tokens_to_ids("<image>")
    common = dict(vision_config=_clip_vision(s, image_size, patch), text_config=_llama(len(tok), s, tok),
                  image_token_id=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
                  pad_token_id=tok.pad_token_id)
    if next_:
        pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
        config = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
        model = LlavaNextForConditionalGeneration(config)
        ip = LlavaNextImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                     image_grid_pinpoints=pinpoints)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, chat_template=LLAVA_TEMPLATE,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    else:
        config = LlavaConfig(image_seq_length=(image_size // patch) ** 2, **common)
        model = LlavaForConditionalGeneration(config)
        ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, chat_template=LLAVA_TEMPLATE,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    _save(model, proc, path)


def _qwen(path: Path, size: str) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    s = SIZES[size]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    tok = _fast(train_tokenizer("bytelevel", specials), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                padding_side="left", extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                           "vision_bos_token": "<|vision_start|>",
                                                           "vision_eos_token": "<|vision_end|>"})
    head_dim = s["hidden"] // s["heads"]
    q = head_dim // 2  # M-RoPE sections (temporal, height, width) over head_dim / 2 frequencies
    section = [q - 2 * (3 * q // 8), 3 * q // 8, 3 * q // 8]
    text = dict(vocab_size=s["vocab"] or len(tok), hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv"], max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    vision = dict(depth=s["v_layers"], hidden_size=s["v_hidden"], intermediate_size=2 * s["v_hidden"],
                  num_heads=s["v_heads"], out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[s["v_layers"] - 1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                              video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                              vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                              vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    model = Qwen2_5_VLForConditionalGeneration(config)
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * (16 if s["image"] <= 64 else (s["image"] // 28) ** 2))
    ip = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, **pixels)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    video = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, **pixels)
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=video, chat_template=QWEN_TEMPLATE)
    _save(model, proc, path)


def _gemma(path: Path, size: str) -> None:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    s = SIZES[size]
    extra = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    raw = train_tokenizer("spm", ["<unk>", "<bos>", "<eos>", "<pad>", *extra])
    raw.normalizer = normalizers.Replace(" ", "▁")  # Gemma's SentencePiece adds no dummy prefix
    tok = _fast(raw, bos_token="<bos>",
                eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", padding_side="left",
                extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                      "image_token": "<image_soft_token>"})
    # Gemma's vocabulary has newline runs as tokens (vLLM looks them up), matched on the raw text
    tok.add_tokens([AddedToken("\n" * k, normalized=False) for k in (4, 3, 2, 1)])
    image_size, patch = s["image"], s["patch"]
    text = Gemma3TextConfig(vocab_size=s["vocab"] or len(tok), hidden_size=s["hidden"], intermediate_size=s["inter"],
                            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                            head_dim=s["hidden"] // s["heads"], max_position_embeddings=2048, sliding_window=SLIDING_WINDOW,
                            bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
                            pad_token_id=tok.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=s["v_hidden"], intermediate_size=2 * s["v_hidden"],
                                num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                                image_size=image_size, patch_size=patch)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                          image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    model = Gemma3ForConditionalGeneration(config)
    # transformers leaves the projector's weight at zeros (images would change nothing): a random one
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    ip = Gemma3ImageProcessor(size={"height": image_size, "width": image_size}, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA_TEMPLATE, image_seq_length=4)
    _save(model, proc, path)


def _save(model, proc, path: Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    save_checkpoint(model, proc, path)


def build(family: str, path: str | Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
          device: str = "cpu") -> Path:
    """A random-weight checkpoint of ``family`` (one of ``FAMILIES``) at ``path``; same seed, same weights.
    ``dtype``/``device``: where the weights are made (real shapes: bfloat16 on a GPU)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if family in ("llava", "llava_next"):
                _llava(Path(path), size, family == "llava_next")
            elif family == "qwen2_5_vl":
                _qwen(Path(path), size)
            else:
                _gemma(Path(path), size)
    finally:
        torch.set_default_dtype(default)
    return Path(path)


def build_verifier(kind: str, path: str | Path, image_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    """A random CLIP or SigLIP dual encoder (hub layout) with its own tokenizer; no vocabulary or
    calibration files (the commands of ``reward_models`` write those)."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, SiglipConfig,
                              SiglipImageProcessor, SiglipModel, SiglipProcessor)

    torch.manual_seed(seed)
    path = Path(path)
    tok = _spm_tokenizer([], "<unk>")
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))
        proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                crop_size={"height": image_size, "width": image_size}),
                             tokenizer=tok)
    elif kind == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        proc = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer=tok)
    else:
        raise ValueError(f"unknown verifier kind {kind!r}: clip or siglip")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


VOCABULARY = ["red circle", "blue square", "green triangle", "yellow star", "cat", "dog", "table", "car", "ball", "café"]


def build_set(family: str, root: str | Path, size: str = "tiny", reward_size: str = "tiny_rm", verifier: str = "clip",
              seed: int = 0, **where) -> dict[str, Path]:
    """A target, a reward model of the same family and tokenizer, and a verifier with an object vocabulary
    and (arbitrary, fixed) calibration files, under ``root``: what `vlm-steer serve` or `bench speed` take."""
    root = Path(root)
    out = {"model": build(family, root / "vlm", size, seed, **where),
           "reward": build(family, root / "reward", reward_size, seed + 1, **where)}
    s = SIZES[size]
    out["verifier"] = build_verifier(verifier, root / "verifier", image_size=min(s["image"], 224), patch=s["patch"], seed=seed)
    (out["verifier"] / "objects.json").write_text(json.dumps({"phrases": VOCABULARY, "template": "a {}"}))
    (out["verifier"] / "calibration.json").write_text(json.dumps({"low": -0.3, "high": 0.3, "group_low": -0.3,
                                                                  "group_high": 0.3, "note": "arbitrary: random weights"}))
    return out


def build_fork(target: str | Path, path: str | Path, layers: int = 1, seed: int = 0, noise: float = 0.02) -> Path:
    """A forked reward model (``decoding.fork``) of the checkpoint at ``target``: its top ``layers`` layers,
    final norm and head, each weight moved by ``noise`` x a standard normal draw (seeded), so that it differs
    from the target the way a trained fork does."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from decoding.fork import fork_prefixes, save_fork, untied_copy

    model = AutoModelForImageTextToText.from_pretrained(target)
    prefixes, _ = fork_prefixes(model, layers)
    fork = untied_copy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fork.named_parameters():
            if any(name.startswith(q) for q in prefixes):
                p.add_(noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return save_fork(fork, model, layers, AutoProcessor.from_pretrained(target), path)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build a random-weight target, reward model and verifier of one family")
    ap.add_argument("family", choices=FAMILIES)
    ap.add_argument("out")
    ap.add_argument("--size", default="tiny", choices=list(SIZES))
    ap.add_argument("--reward-size", default="tiny_rm", choices=list(SIZES))
    ap.add_argument("--verifier", default="clip", choices=["clip", "siglip"])
    ap.add_argument("--model-only", action="store_true")
    ap.add_argument("--fork-layers", type=int, default=0, help="also a forked reward model of N layers, in OUT/fork")
    a = ap.parse_args()
    if a.model_only:
        print(json.dumps(str(build(a.family, a.out, a.size))))
    else:
        paths = build_set(a.family, a.out, a.size, a.reward_size, a.verifier)
        if a.fork_layers:
            paths["fork"] = build_fork(paths["model"], Path(a.out) / "fork", a.fork_layers)
        print(json.dumps({k: str(v) for k, v in paths.items()}))
