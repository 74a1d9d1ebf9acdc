"""The embedded models' tokenizer: a word-level PreTrainedTokenizerFast (Llama-style ▁ word marks),
with ``<image>`` as an added special token and a LLaVA-1.5 style chat template."""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from shapeworld.text import JSON_OPEN, JSON_TOKENS, VOCABULARY

PAD, BOS, UNK, EOS, IMAGE = "<pad>", "<s>", "<unk>", "</s>", "<image>"
# CLIP's text tower pools at the first EOS, except that eos id 2 selects a legacy code path: keep EOS at 3.
SPECIALS = (PAD, BOS, UNK, EOS, IMAGE)
VOCAB_MULTIPLE = 16

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), on one line. Content may be a
# string or a list of OpenAI-style parts; system text is prepended to the first user turn.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{%- set ns.system = ns.system + p['text'] + ' ' -%}{%- endfor -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- for p in parts if p['type'] in ('image', 'image_url') -%}{{- '<image> ' -}}{%- endfor -%}"
    "{{- ns.system -}}{%- set ns.system = '' -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- p['text'] -}}{%- endfor -%}"
    "{{- ' ASSISTANT:' -}}"
    "{%- else -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- ' ' + p['text'] -}}{%- endfor -%}{{- ' </s> ' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def build_tokenizer(for_clip_text: bool = False) -> PreTrainedTokenizerFast:
    """The project's tokenizer. ``for_clip_text`` appends EOS (CLIP's text tower pools there); the chat
    tokenizer (not CLIP's) also holds ``JSON_TOKENS`` as added tokens (matched before the word split, so
    JSON text in a conversation encodes to them)."""
    words = [f"▁{w}" for w in VOCABULARY]
    raw = [] if for_clip_text else list(JSON_TOKENS)
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words, *raw])}
    while len(vocab) % VOCAB_MULTIPLE:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Replace(Regex(r"\s+"), " ")  # words split at any whitespace (newlines too)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    single = f"{BOS} $A {EOS}" if for_clip_text else f"{BOS} $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=256,
        padding_side="left",
        chat_template=None if for_clip_text else CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE} if not for_clip_text else {},
    )
    # Special tokens swallow the spaces around them, so "USER: <image> text" has no stray '▁' word.
    fast.add_special_tokens(
        {
            "eos_token": AddedToken(EOS, lstrip=True, rstrip=True, special=True, normalized=False),
            "additional_special_tokens": [AddedToken(IMAGE, lstrip=True, rstrip=True, special=True, normalized=False)],
        }
    )
    # The opening swallows the space before it (the chat template writes "ASSISTANT: " + answer).
    fast.add_tokens([AddedToken(t, special=False, normalized=False, lstrip=t == JSON_OPEN) for t in raw])
    return fast
