"""Stopping and detokenizing a row, token by token: the end-of-sequence token, vLLM's ``stop_token_ids``,
stop strings (their text and the tokens after the cut leave the completion; none before ``min_tokens``),
``max_tokens`` and the context length (OpenAI's finish reasons ``stop`` and ``length``)."""

from __future__ import annotations

from decoding.request import tokens_covering


def append_token(row, token: int, tokenizer, eos_ids: set[int], max_context: int) -> None:
    """Add a sampled ``token`` to ``row`` (``token_ids``, ``text``, ``text_ends``) and set its
    ``finish_reason`` when it ends. The EOS token is not part of the completion (unless ``ignore_eos``);
    ``text`` is the whole completion decoded (a partial UTF-8 character decodes as U+FFFD until its last
    byte arrives: the scheduler holds it back from streams)."""
    s = row.request.sampling
    if token in eos_ids and not s.ignore_eos or token in s.stop_token_ids:
        row.finish_reason = "stop"  # a stop token, like the EOS, is not part of the completion
        return
    row.token_ids.append(token)
    row.text = tokenizer.decode(row.token_ids, skip_special_tokens=True)
    row.text_ends.append(len(row.text))
    # as vLLM's detokenizer: stop strings are looked for once more than min_tokens tokens are out, and one
    # must end after the text of the first min_tokens tokens
    stops = s.stop if len(row.token_ids) > s.min_tokens else ()
    after = row.text_ends[s.min_tokens - 1] if stops and s.min_tokens else 0
    for stop in stops:
        at = row.text.find(stop, max(0, after - len(stop) + 1))
        if at >= 0:
            row.text, row.finish_reason = row.text[:at], "stop"
            keep = tokens_covering(row.text_ends, at)  # the tokens after the cut leave with the stop string
            del row.token_ids[keep:], row.logprobs[keep:], row.text_ends[keep:], row.explain[keep:]
            return
    if len(row.token_ids) >= s.max_tokens or len(row.prompt_ids) + len(row.token_ids) >= max_context:
        row.finish_reason = "length"
