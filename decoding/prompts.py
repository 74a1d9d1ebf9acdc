"""Chat messages into the prompt text a checkpoint's own chat template renders."""

from __future__ import annotations


def as_parts(messages: list[dict]) -> list[dict]:
    """Messages whose string content is one text part: hub chat templates (llava-hf, LLaVA-NeXT, Idefics3)
    iterate over content parts and render a plain string as nothing; every template renders parts."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages]


def render_prompt(processor, messages: list[dict]) -> str:
    return processor.apply_chat_template(as_parts(messages), add_generation_prompt=True)
