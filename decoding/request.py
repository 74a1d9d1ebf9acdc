"""What flows into and out of an engine: a request (prompt, images, sampling, steering) and its completion."""

from __future__ import annotations

import bisect
import uuid
from dataclasses import dataclass, field

from PIL import Image

from decoding.grammar import StructuredOutput


SAMPLING_EPS = 1e-5  # temperatures below it sample greedily (vLLM's _SAMPLING_EPS): logits / 1e-300 are inf


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # below SAMPLING_EPS (0 included) = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k best
    ignore_eos: bool = False  # go on past the end-of-sequence token (vLLM's option; for benchmarks)
    presence_penalty: float = 0.0  # subtracted from a token's logit once it has been generated (OpenAI's)
    frequency_penalty: float = 0.0  # subtracted once per time it has been generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits before steering (OpenAI's)
    # vLLM's sampling extensions (its SamplingParams' names and meanings)
    top_k: int = 0  # sample among the k most likely tokens only (0: all of them; vLLM's -1 is read as 0)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one, in [0, 1] (0: none)
    repetition_penalty: float = 1.0  # > 0: logits of prompt and output tokens divided by it where positive, else multiplied
    min_tokens: int = 0  # the EOS and stop_token_ids are masked until this many tokens have been generated
    stop_token_ids: tuple[int, ...] = ()  # generating one ends the completion ("stop"); like the EOS it is not part of it

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def repeats_penalized(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


@dataclass(frozen=True)
class SteeringSpec:
    method: str = "none"
    strength: float | None = None
    explain: bool = False  # per generated token: what steering changed (``decoding.explain``)


@dataclass
class GenerationRequest:
    """A chat (OpenAI-style messages whose image parts are filled, in order, by ``images``)."""

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    steering: SteeringSpec = field(default_factory=SteeringSpec)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    structured: StructuredOutput | None = None  # a grammar the completion must follow (``decoding.grammar``)

    @classmethod
    def single_turn(cls, text: str, images: list[Image.Image] | None = None, **kw) -> "GenerationRequest":
        images = list(images or [])
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        return cls(messages=[{"role": "user", "content": content}], images=images, **kw)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    steered_tokens: int = 0
    explain: list | None = None  # one ``decoding.explain.TokenExplain`` per token, when the request asked


def tokens_covering(text_ends: list[int], length: int) -> int:
    """How many tokens produce the first ``length`` characters of a completion, given the text's length
    after each token: where a stop string cuts the text, the tokens after the cut leave the completion
    (and its logprobs), as their text is not in it; a token the cut splits stays."""
    return 0 if length <= 0 else min(len(text_ends), bisect.bisect_left(text_ends, length) + 1)


# What a running request reports, in order: Delta..., then Finished or Failed.


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list = field(default_factory=list)
    explain: list = field(default_factory=list)  # these tokens' ``TokenExplain``, when the request asked


@dataclass
class Finished:
    completion: Completion


@dataclass
class Failed:
    error: Exception


class EngineMissing(RuntimeError):
    """The engine asked for is not installed here (vLLM in a virtualenv without it)."""


class EngineDead(RuntimeError):
    """The engine itself is gone (its process died, or vLLM's engine core did: vLLM's ``EngineDeadError``):
    every request in flight fails with it, and no request can be served until the server restarts."""
