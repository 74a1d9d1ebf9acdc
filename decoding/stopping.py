"""Stopping and detokenizing a row, token by token: the end-of-sequence token, stop strings (their text
and the tokens after the cut leave the completion), ``max_tokens`` and the context length (OpenAI's
finish reasons ``stop`` and ``length``)."""

from __future__ import annotations

from decoding.request import tokens_covering


def append_token(row, token: int, tokenizer, eos_ids: set[int], max_context: int) -> None:
    """Add a sampled ``token`` to ``row`` (``token_ids``, ``text``, ``text_ends``) and set its
    ``finish_reason`` when it ends. The EOS token is not part of the completion (unless ``ignore_eos``);
    ``text`` is the whole completion decoded (a partial UTF-8 character decodes as U+FFFD until its last
    byte arrives: the scheduler holds it back from streams)."""
    s = row.request.sampling
    if token in eos_ids and not s.ignore_eos:
        row.finish_reason = "stop"
        return
    row.token_ids.append(token)
    row.text = tokenizer.decode(row.token_ids, skip_special_tokens=True)
    row.text_ends.append(len(row.text))
    for stop in s.stop:
        at = row.text.find(stop)
        if at >= 0:
            row.text, row.finish_reason = row.text[:at], "stop"
            keep = tokens_covering(row.text_ends, at)  # the tokens after the cut leave with the stop string
            del row.token_ids[keep:], row.logprobs[keep:], row.text_ends[keep:], row.explain[keep:]
            return
    if len(row.token_ids) >= s.max_tokens or len(row.prompt_ids) + len(row.token_ids) >= max_context:
        row.finish_reason = "length"
