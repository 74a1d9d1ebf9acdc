"""Pure builders of the OpenAI response objects: chat.completion, chat.completion.chunk, and logprobs.

Nothing here touches the engine or the network; each builder takes what the route collected and
returns a JSON-ready dict that never holds NaN or Infinity (OpenAI writes -9999.0 for the log-prob of
a token that cannot be chosen; JSON has no -Infinity).
"""

from __future__ import annotations

import json
import math

from decoding.request import TokenLogprob

NO_LOGPROB = -9999.0  # OpenAI's value for a token outside what the sampler may choose
CONTEXT_TOKENS = 6  # tokens decoded before a token to get its text with its leading space (vLLM's window)


def finite(x: float) -> float:
    return x if math.isfinite(x) else NO_LOGPROB


class TokenTexts:
    """Token strings as they appear in one choice's content, for its logprobs (OpenAI's ``token`` and
    ``bytes``: concatenated, the chosen tokens' strings are the content).

    A token decoded alone loses what it contributes in context (a SentencePiece word mark decodes to a
    leading space only after another token), so each token is decoded after the few text tokens before
    it and its string is the difference (vLLM's incremental detokenization). The first text token of a
    completion has no space to keep, as the content starts without one. A chosen special token adds
    nothing to the content (it is decoded with ``skip_special_tokens``): its string is empty; among the
    alternatives (``top_logprobs``) special tokens show their literal text (``</s>``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.context: list[int] = []  # the choice's text (non-special) tokens so far
        self.length = 0  # characters of content the chosen tokens' strings have covered

    def _text(self, context: list[int], token: int, chosen: bool) -> str:
        if token in self.special:
            return "" if chosen else self.tokenizer.convert_ids_to_tokens(token)
        alone = self.tokenizer.decode([token], skip_special_tokens=True)
        if not context:
            return alone
        before = self.tokenizer.decode(context, skip_special_tokens=True)
        after = self.tokenizer.decode(context + [token], skip_special_tokens=True)
        return after[len(before):] if after.startswith(before) else alone

    def _entry(self, context: list[int], token: int, logprob: float, chosen: bool) -> dict:
        text = self._text(context, token, chosen)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8", "replace"))}

    def entries(self, items: list[TokenLogprob], content_length: int | None = None) -> list[dict]:
        """OpenAI ``logprobs.content`` entries for the next tokens of this choice (in order).
        ``content_length``: the characters of content sent so far, these tokens' included; a token that
        a stop string cut keeps only the part of its text that is in the content."""
        out = []
        for x in items:
            context = self.context[-CONTEXT_TOKENS:]
            entry = self._entry(context, x.token_id, x.logprob, chosen=True)
            if content_length is not None and self.length + len(entry["token"]) > content_length:
                text = entry["token"][: max(0, content_length - self.length)]
                entry.update(token=text, bytes=list(text.encode("utf-8", "replace")))
            self.length += len(entry["token"])
            entry["top_logprobs"] = [self._entry(context, t, v, chosen=False) for t, v in x.top]
            out.append(entry)
            if x.token_id not in self.special:
                self.context.append(x.token_id)
        return out


def logprobs_block(tokenizer, items: list[TokenLogprob] | None, content: str) -> dict | None:
    """A whole choice's ``logprobs`` object (None when the request asked for none)."""
    return None if items is None else {"content": TokenTexts(tokenizer).entries(items, len(content))}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, created: int, model: str, choices: list[dict], usage_: dict, steering: dict) -> dict:
    """A ``chat.completion`` object; ``choices`` as built by ``choice``."""
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_, "steering": steering}


def choice(index: int, text: str, finish_reason: str, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chunk(cid: str, created: int, model: str, choices: list[dict], include_usage: bool, **extra) -> str:
    """One server-sent event holding a ``chat.completion.chunk``. With ``include_usage`` every chunk
    has a ``usage`` key, null but in the last one (OpenAI's shape)."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if include_usage:
        body["usage"] = None
    body.update(extra)
    return "data: " + json.dumps(body, allow_nan=False) + "\n\n"


def delta(index: int, content: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}


def error_event(body: dict) -> str:
    return "data: " + json.dumps(body) + "\n\n"


def explain_entries(tokenizer, items: list) -> list[dict]:
    """A choice's ``explain`` entries (``decoding.explain.TokenExplain`` each): the chosen token and the
    unsteered model's top token (id and text), their log-probs, each method's contribution to the chosen
    token's score, and whether steering changed the choice. On the vllm engine a sampled token outside the
    worker's top candidates has unknown numbers: the API's "very unlikely" log-probs, base token null,
    no contributions."""
    text = lambda t: tokenizer.decode([t], skip_special_tokens=False) if t >= 0 else None  # noqa: E731  (-1: unknown)
    return [{"token": text(x.token_id), "token_id": x.token_id, "logprob": finite(x.logprob),
             "base_logprob": finite(x.base_logprob), "base_token": text(x.base_token_id),
             "base_token_id": x.base_token_id if x.base_token_id >= 0 else None, "base_top_logprob": finite(x.base_top_logprob),
             "contributions": {k: finite(v) for k, v in x.contributions.items()},
             "changed": x.changed} for x in items]
