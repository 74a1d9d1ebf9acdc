"""The chat service: an OpenAI chat-completions body into engine rows, with every check that can be made
before a request reaches the scheduler, in one place that both engines share.

    body bytes -> ``parse_request`` (media type, JSON, Unicode, strict schema)
               -> ``ChatService.prepare``: messages into the chat template's shape, the context-length
                  check on a prefix of the text, images (decoded in worker threads), sampling and
                  steering, the engine's ``encode`` (template, processor, tokenizer; in a worker thread,
                  long prompts in a lane of their own), token-count and vocabulary checks
               -> rows the scheduler takes.

Each refusal is an ``APIError`` (400 unless said) naming the field at fault, and it concerns that
request alone: nothing here touches another request.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from jinja2 import TemplateError
from pydantic import ValidationError

from decoding.grammar import Grammars
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from server.errors import APIError
from server.generation_defaults import GenerationDefaults, load_generation_defaults
from server.images import ImageLimits, load_image, processor_side
from server.protocol import INT64, ChatCompletionRequest
from server.settings import Settings
from server.structured_outputs import structured_output

JSON_TYPES = ("application/json",)
PARSE_INLINE_BYTES = 64 * 1024  # bodies below it are parsed on the event loop (tens of microseconds)
LONG_TEXT_CHARS = 64 * 1024  # prompts of more text are encoded in the long-prompt lane (ChatService.long_lane)
# The length check's prefix, in characters per token of the context: a prompt's text beyond it is not
# tokenised before the check. Natural-language text runs at 3-6 characters per token in the tokenizers of
# the supported families, so a prefix of 8 per token holds more tokens than the context for almost any
# prompt that is too long; a prompt of denser tokens is tokenised whole, as before.
PREFIX_CHARS_PER_TOKEN = 8


def check_media_type(content_type: str | None) -> None:
    """Bodies must be JSON: 415 for any other declared media type. A browser page may post a form
    (``application/x-www-form-urlencoded``, ``multipart/form-data``, ``text/plain``) to a local server
    without a CORS preflight; refusing those keeps it from driving the server (FastAPI does the same). A
    body with no Content-Type at all is refused too: ``fetch`` with a ``Blob`` body sends none, and needs no
    preflight either (the OpenAI clients, curl's ``-H`` and every SDK declare JSON)."""
    if content_type is None:
        raise APIError(415, "the request body must be application/json, and it has no Content-Type")
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime not in JSON_TYPES and not (mime.startswith("application/") and mime.endswith("+json")):
        raise APIError(415, f"the request body must be application/json, not {mime or 'empty'!r}")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _unpaired_surrogate(value, path: tuple = ()) -> tuple | None:
    """The path of the first string (or key) that is not valid Unicode: JSON's ``\\ud800`` escapes decode to
    lone surrogates that no encoder (tokenizer, UTF-8 response) can take."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _unpaired_surrogate(k, path) or _unpaired_surrogate(v, (*path, k))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _unpaired_surrogate(v, (*path, i))
            if found is not None:
                return found
    return None


def _param(loc, data=None) -> str | None:
    """A dotted path into the body (``messages.1.content``). Given the body, the steps of ``loc`` that
    are not in it (pydantic's names of union members, such as ``str`` or ``list[str]``) are left out."""
    if data is not None:
        path, node, took_last = [], data, False
        for x in loc:
            took_last = isinstance(node, dict) and x in node or isinstance(node, list) and isinstance(x, int) and 0 <= x < len(node)
            if took_last:
                node = node[x]
                path.append(x)
        if loc and not took_last and isinstance(loc[-1], str) and isinstance(node, dict):
            path.append(loc[-1])  # a required field that is missing
        loc = path
    return ".".join(str(x) for x in loc) or None


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The validated request, or APIError 400 naming the field (``messages.1.content``, ``seed``, ...)."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)  # RFC 8259: NaN and Infinity are not JSON
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    bad = _unpaired_surrogate(data)
    if bad is not None:
        param = _param(bad)
        raise APIError(400, f"{param}: not valid Unicode (an unpaired surrogate such as \\ud800)", param=param)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(_param(x["loc"], data) or ""))  # the most specific of a union's
        param = _param(err["loc"], data)
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None


def chat_messages(req: ChatCompletionRequest, max_images: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """Messages in the chat template's shape (``developer`` read as ``system``; image parts as
    ``{"type": "image"}``, filled in order by the returned (URL, its path in the body) pairs). Adjacent
    text parts of a message are joined with a newline, as vLLM joins them, so that no template glues two
    words together."""
    messages, urls = [], []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if not isinstance(m.content, list):
            messages.append({"role": role, "content": m.content or ""})
            continue
        parts: list = []  # {"type": "image"} or a list of adjacent texts (joined at the end: linear time)
        for j, p in enumerate(m.content):
            if p.type == "text":
                if parts and isinstance(parts[-1], list):
                    parts[-1].append(p.text)
                else:
                    parts.append([p.text])
                continue
            if len(urls) >= max_images:
                raise APIError(400, f"at most {max_images} images per request", param="messages")
            urls.append((p.image_url.url, f"messages.{i}.content.{j}.image_url.url"))
            parts.append({"type": "image"})
        messages.append({"role": role, "content": [{"type": "text", "text": "\n".join(p)} if isinstance(p, list) else p
                                                   for p in parts]})
    return messages, urls


PLACEHOLDER_ATTRIBUTES = ("image_token", "video_token", "audio_token", "boi_token", "eoi_token")


def placeholder_tokens(processor) -> list[str]:
    """The strings a processor expands into image (video, audio) features, or that its model reads as
    image positions: ``<image>`` for LLaVA, ``<|image_pad|>`` for Qwen2-VL, Gemma 3's ``<start_of_image>``
    (what its processor expands) and ``<image_soft_token>`` (its tokenizer's image token)."""
    found = [getattr(owner, a, None) for owner in (processor, getattr(processor, "tokenizer", None))
             for a in PLACEHOLDER_ATTRIBUTES]
    return list(dict.fromkeys(t for t in found if isinstance(t, str) and t))


def check_texts(req: ChatCompletionRequest, placeholders: list[str]) -> None:
    """Refuse message text that holds a placeholder token: the processor would count it as an image
    (and fail, or fill it with another image's features). Images go in ``image_url`` parts."""
    for i, m in enumerate(req.messages):
        parts = [(f"messages.{i}.content", m.content)] if isinstance(m.content, str) else [
            (f"messages.{i}.content.{j}.text", p.text) for j, p in enumerate(m.content or []) if p.type == "text"]
        for param, text in parts:
            for token in placeholders:
                if token in text:
                    raise APIError(400, f"{param}: contains {token!r}, the model's placeholder for an image; send "
                                        "images as image_url parts", param=param)


def message_texts(messages: list[dict]) -> list[str]:
    """The text of ``chat_messages``' messages, in order (what the chat template renders besides its own)."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m["content"])
        else:
            out += [p["text"] for p in m["content"] if p.get("type") == "text"]
    return out


def text_prefix(texts: list[str], chars: int) -> list[str]:
    """The first ``chars`` characters of ``texts`` (a list of strings), each piece cut at a whitespace when
    one is in its last 64 characters, so that the words before the cut tokenise as in the whole text."""
    out = []
    for t in texts:
        if chars <= 0:
            break
        if len(t) > chars:
            start = max(0, chars - 64)
            cut = max(t.rfind(" ", start, chars), t.rfind("\n", start, chars))
            out.append(t[: cut if cut > 0 else chars])
            break
        out.append(t)
        chars -= len(t)
    return out


def derived_seed(seed: int | None, i: int) -> int | None:
    """Choice ``i``'s seed: the request's plus ``i``, wrapped into the signed 64-bit range."""
    if seed is None:
        return None
    return (seed + i - INT64[0]) % 2**64 + INT64[0]


def image_side(settings: Settings, engine) -> int | None:
    """The short side decoded images are reduced to (``server.images.processor_side``): the largest that
    any model reading a request's images needs (the target's processor; a separate TITA reward model's,
    FiSAO's verifier's and the grounding judge's, from their folders); None (images kept as decoded) when
    one of them is not known to allow it."""
    from transformers import AutoImageProcessor

    from decoding.fork import is_fork

    sides = [processor_side(getattr(engine.processor, "image_processor", None))]
    for folder in (settings.reward_model, settings.verifier, settings.grounding_verifier):
        if folder is None or (folder == settings.reward_model and is_fork(folder)):
            continue  # a fork reads the target's inputs
        try:
            sides.append(processor_side(AutoImageProcessor.from_pretrained(str(folder))))
        except (OSError, ValueError):
            return None
    return None if None in sides else max(sides)


@dataclass
class Prepared:
    rows: list  # one engine row per choice
    prompt_tokens: int
    max_tokens: int


class ChatService:
    """Turns validated requests into engine rows (see the module docstring)."""

    def __init__(self, settings: Settings, engine, defaults: GenerationDefaults | None = None):
        self.settings, self.engine = settings, engine
        # the checkpoint's sampling defaults (vLLM's --generation-config), for the fields a request leaves unset
        self.defaults = defaults if defaults is not None else load_generation_defaults(
            settings.generation_config, settings.model, settings.max_tokens_limit)
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_image_aspect_ratio,
                                  keep_side=image_side(settings, engine))
        # Image decoding and the processor run here, off the event loop. They hold the interpreter lock
        # part of the time, and every thread doing so takes turns with the event loop: one thread by
        # default (measured on 2 cores, 4 concurrent 4096x4096 images, `vlm-steer bench health`: /health's
        # worst answer 15-22 ms with one thread, 64-110 ms with four, the same 1.1 s for the four requests).
        self.placeholders = placeholder_tokens(engine.processor)
        self.executor = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="vlm-steer-preprocess")
        self._grammars: Grammars | None = None  # the structured-output check's compiler (built at first use)
        # Long prompts are length-checked and encoded in a lane of their own, so that
        # ordinary requests never queue behind them (a 6 MB prompt held the one preprocessing thread 6-10 s,
        # and a concurrent 8-token image request with it). The tokenizers release the interpreter lock
        # while they run, so the two lanes overlap (measured: the event loop's sleeps of 1 ms took 1.1 ms at
        # the median while a thread tokenised 2 MB).
        self.long_lane = ThreadPoolExecutor(1, thread_name_prefix="vlm-steer-long-prompt")

    async def parse(self, raw: bytes) -> ChatCompletionRequest:
        """``parse_request``; a large body in the preprocessing thread (200,000 text parts take a second
        to validate), a small one here (a thread hop would cost more than it)."""
        if len(raw) < PARSE_INLINE_BYTES:
            return parse_request(raw)
        return await asyncio.get_running_loop().run_in_executor(self.executor, parse_request, raw)

    def max_tokens(self, req: ChatCompletionRequest) -> int:
        s = self.settings
        max_tokens = req.max_completion_tokens or req.max_tokens or self.defaults.values.get("max_tokens", s.max_tokens_default)
        if max_tokens > s.max_tokens_limit:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"max_tokens {max_tokens} exceeds the limit {s.max_tokens_limit}", param=param)
        return max_tokens

    def _check_token_ids(self, ids, param: str) -> None:
        vocab = self.engine.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise APIError(400, f"{param}: token id {t} is outside the vocabulary (0 to {vocab - 1})", param=param)

    def sampling_fields(self, req: ChatCompletionRequest, max_tokens: int) -> dict:
        """The request's sampling fields (``decoding.request.SamplingParams``' names): each one the request
        leaves unset takes the checkpoint's default (``self.defaults``, vLLM's --generation-config), else
        OpenAI's neutral value. APIError 400 for ``min_tokens`` over ``max_tokens`` and stop token ids
        outside the vocabulary."""
        defaults = self.defaults.values

        def pick(name: str, neutral):
            value = getattr(req, name)
            return value if value is not None else defaults.get(name, neutral)

        min_tokens = req.min_tokens or 0
        if min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({min_tokens}) must be at most max_tokens ({max_tokens})", param="min_tokens")
        stop_ids = tuple(dict.fromkeys(req.stop_token_ids or ()))
        self._check_token_ids(stop_ids, "stop_token_ids")
        top_k = pick("top_k", 0)  # -1 and 0 (vLLM's "no cut") and any k past the vocabulary cut nothing: 0
        top_k = top_k if 0 < top_k < self.engine.vocab_size else 0
        return dict(temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=top_k,
                    min_p=pick("min_p", 0.0), repetition_penalty=pick("repetition_penalty", 1.0),
                    presence_penalty=pick("presence_penalty", 0.0), frequency_penalty=pick("frequency_penalty", 0.0),
                    min_tokens=min_tokens, stop_token_ids=stop_ids)

    async def prepare(self, req: ChatCompletionRequest, spec: SteeringSpec, cid: str) -> Prepared:
        """One engine row per choice (``req.n``), or APIError (400 naming the field, 413 for an image too
        large); ``SteeringFailed`` from an engine that starts steering at encoding (vLLM's FiSAO)."""
        s = self.settings
        if req.n > max(1, s.max_queue):
            raise APIError(400, f"n ({req.n}) exceeds the {s.max_queue} rows the queue can hold", param="n")
        max_tokens = self.max_tokens(req)
        bias = req.token_bias
        self._check_token_ids(bias, "logit_bias")
        fields = self.sampling_fields(req, max_tokens)
        check_texts(req, self.placeholders)
        structured = structured_output(req)  # (constraint, its field) or None
        if structured is not None:  # compiling is CPU work: off the loop
            await asyncio.get_running_loop().run_in_executor(self.executor, self._check_structured, req, structured,
                                                             max_tokens, fields.get("min_tokens", 0))
        messages, urls = chat_messages(req, s.max_images)
        texts = message_texts(messages)
        long_prompt = sum(map(len, texts)) > LONG_TEXT_CHARS
        await self._check_length_bound(texts, max_tokens)  # before images are decoded or the prompt tokenised
        images = list(await asyncio.gather(*(self._image(url, path) for url, path in urls)))
        gens = []
        for i in range(req.n):
            sampling = SamplingParams(
                max_tokens=max_tokens, seed=derived_seed(req.seed, i), stop=tuple(req.stop or ()),
                top_logprobs=(req.top_logprobs or 0) if req.logprobs else None, ignore_eos=req.ignore_eos,
                logit_bias=tuple(sorted(bias.items())), **fields)
            gens.append(GenerationRequest(messages, images, sampling, spec, request_id=f"{cid}-{i}",
                                          structured=structured[0] if structured else None))
        # template and processor: CPU work, off the loop
        lane = self.long_lane if long_prompt else self.executor
        rows = await asyncio.get_running_loop().run_in_executor(lane, self._encode, gens)
        prompt_tokens = len(rows[0].prompt_ids)
        if prompt_tokens + max_tokens > self.engine.max_context:
            raise self._too_long(f"{prompt_tokens} tokens", max_tokens)
        return Prepared(rows, prompt_tokens, max_tokens)

    def _check_structured(self, req: ChatCompletionRequest, structured: tuple, max_tokens: int, min_tokens: int = 0) -> None:
        """400 for a constraint that is invalid or that no sequence of at most ``max_tokens`` of the model's
        tokens satisfies (``decoding.grammar.Grammars.check``), naming the field it came from; naming
        ``min_tokens`` when only its mask of the end makes it so (the format must end sooner)."""
        so, param = structured
        engine = self.engine
        if self._grammars is None:
            stops = {engine.tokenizer.eos_token_id, *getattr(engine, "eos_ids", ())}
            self._grammars = Grammars(engine.tokenizer, engine.vocab_size, stops)
        stop_ids = tuple(getattr(req, "stop_token_ids", None) or ())
        try:
            self._grammars.check(so, max_tokens, stop_ids)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None
        if min_tokens:
            try:
                self._grammars.check(so, max_tokens, stop_ids, min_tokens)
            except ValueError:
                raise APIError(400, f"min_tokens ({min_tokens}): the output format of {param} cannot run that long "
                                    "(its end would be masked where it must end)", param="min_tokens") from None

    def _too_long(self, prompt: str, max_tokens: int) -> APIError:
        return APIError(400, f"prompt ({prompt}) plus max_tokens ({max_tokens}) exceeds the context limit of "
                             f"{self.engine.max_context}", param="messages")

    async def _check_length_bound(self, texts: list[str], max_tokens: int) -> None:
        """The context-length check on a prefix of the prompt's text, before the prompt is tokenised whole:
        a prompt whose text is longer than ``PREFIX_CHARS_PER_TOKEN`` characters per token of the context
        has the prefix of that length tokenised (each message's text on its own, in the long-prompt lane);
        when that prefix alone holds more tokens than the context leaves, the prompt is refused with the
        400 of the whole-prompt check, its count a lower bound ("at least N tokens"). A 6 MB prompt is then
        refused in milliseconds instead of seconds. The bound counts 2 tokens fewer per piece than the
        tokenizer gave, for tokens the chat template's text around a piece may merge with."""
        budget = self.engine.max_context - max_tokens
        chars = (self.engine.max_context + 1) * PREFIX_CHARS_PER_TOKEN
        if sum(map(len, texts)) <= chars:
            return  # short enough to be tokenised whole
        prefix = text_prefix(texts, chars)
        tokenizer = self.engine.tokenizer

        def count() -> int:
            return sum(map(len, tokenizer(prefix, add_special_tokens=False)["input_ids"]))

        least = await asyncio.get_running_loop().run_in_executor(self.long_lane, count) - 2 * len(prefix)
        if least > budget:
            raise self._too_long(f"at least {least} tokens", max_tokens)

    async def _image(self, url: str, path: str):
        """One image part's image; its refusal names the part (``messages.0.content.1.image_url.url``)."""
        s = self.settings
        try:
            return await load_image(url, self.limits, s.image_url_hosts, s.image_url_timeout, self.executor)
        except APIError as e:
            e.message, e.param = f"{path}: {e.message}", path
            raise

    def _encode(self, gens: list[GenerationRequest]) -> list:
        """Rows for the choices of one request: the template and processor run once, every further
        choice shares the encoded prompt and pixels with its own sampler (``engine.row_for``)."""
        try:
            first = self.engine.encode(gens[0])
            return [first, *(self.engine.row_for(first, g) for g in gens[1:])]
        except (ValueError, TemplateError) as e:  # the template or processor refused this request's messages
            raise APIError(400, str(e), param="messages") from None
        except StopIteration:  # a processor that ran out of images for its placeholders (it cannot cross a Future)
            raise APIError(400, "the prompt's image placeholders do not match its images", param="messages") from None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.long_lane.shutdown(wait=False, cancel_futures=True)
