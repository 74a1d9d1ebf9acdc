"""The transformers engine: batched prefill and decode with KV caches over any image-text-to-text checkpoint
that ``transformers`` loads (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Gemma 3, ...).

Generation is a few small verbs: ``prefill`` (new rows, left-padded, one forward with their images per
group of rows whose image tensors batch: ``decoding.model_inputs``), ``decode_one_token`` (one forward
for every running row), ``select`` (finished rows leave the batch) and ``merge`` (rows prefilled later
join a running batch); ``step`` (steer, sample, stop: ``decoding.stopping``, feed the rows that stay)
is the body of every decode loop: ``generate``'s (the benchmarks) and the server's scheduler's. Each
row carries its own sampling parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from decoding.explain import explain_tokens
from decoding.fork import Fork, is_fork, materialise
from decoding.grammar import GrammarDeadEnd, Grammars, apply_masks
from decoding.kv_cache import GrowingCache, merge_caches, select_cache
from decoding.llama_decode import LlamaDecoder, supported
from decoding.methods import REGISTRY, Resources, resolve, usable_methods
from decoding.methods.tita import check_rows
from decoding.model_inputs import batch_inputs, inputs_for, local_folder, positions_for, prefill_groups, row_inputs
from decoding.prompts import render_prompt
from decoding.request import Completion, GenerationRequest, SteeringSpec, TokenLogprob
from decoding.sampling import (apply_penalties, apply_repetition_penalty, output_counts, sample_tokens, seen_tokens,
                               token_logprobs)
from decoding.steering_pipeline import SteeringPipeline
from decoding.stopping import append_token

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    """One request inside a batch: its prompt, what it has generated so far, its sampler state."""

    request: GenerationRequest
    prompt_ids: list[int]
    inputs: dict  # every tensor the processor returned beside the ids (pixel_values, image_sizes, ...)
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    steer: dict[str, float] = field(default_factory=dict)  # method -> strength, in application order
    steered_tokens: int = 0  # steps at which steering changed the top token
    image_pooled: torch.Tensor | None = None  # the vision tower's pooled output for the first image (prefill)
    image_features: torch.Tensor | None = None  # [images, patches, hidden] the tower's selected features (prefill)
    error: Exception | None = None  # its steering failed: the row must leave the batch, failed, not served unsteered
    text_ends: list[int] = field(default_factory=list)  # len(text) after each generated token (stop-string cuts)
    explain: list = field(default_factory=list)  # a TokenExplain per generated token, when the request asked
    trunk: tuple | None = None  # (hidden [n, D], positions, next position, prebuilt masks) of its prompt, for a fork
    verifier_scores: torch.Tensor | None = None  # [phrases] FiSAO's verifier scores of its image, computed at admission
    grammar: object = None  # its ``decoding.grammar.RowGrammar`` (built in the engine at its first step)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return self.inputs.get("pixel_values")


@dataclass
class Batch:
    """Running rows and their shared KV cache (left-padded to a common length)."""

    rows: list[Row]
    cache: GrowingCache
    mask: torch.Tensor  # [B, T] 1 = real token
    next_pos: torch.Tensor  # [B] position id of each row's next token
    logits: torch.Tensor  # [B, V] next-token logits
    states: dict = field(default_factory=dict)  # steering method -> state of the rows that use it
    trunk: torch.Tensor | None = None  # [B, 1, D] the hidden state entering a forked reward model's first layer
    trace: object = None  # this step's ``decoding.explain.StepTrace`` when a row asked for an explanation

    def rows_using(self, method: str) -> list[int]:
        return [i for i, r in enumerate(self.rows) if method in r.steer]


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, n - len(s) :] = 1
    return ids, mask


def new_generator(s) -> torch.Generator | None:
    """A sampling row's own random generator (seeded when the request gives a seed); None when greedy."""
    if s.greedy:
        return None
    return torch.Generator().manual_seed(s.seed if s.seed is not None else torch.seed())


def encode_row(processor, request: GenerationRequest, steering: dict[str, float]) -> Row:
    """A request as a row: chat template, prompt ids and every tensor of the processor's output."""
    out = processor(images=request.images or None, text=render_prompt(processor, request.messages), return_tensors="pt")
    return Row(request, out["input_ids"][0].tolist(), row_inputs(out), new_generator(request.sampling), steer=steering)


def row_for(row: Row, request: GenerationRequest) -> Row:
    """Another choice of an encoded request (same messages and images, its own sampling): the prompt ids
    and image tensors are shared, the sampler is its own."""
    return Row(request, row.prompt_ids, row.inputs, new_generator(request.sampling), steer=dict(row.steer))


class TransformersEngine:
    name = "transformers"

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "float32",
                 reward_path: str | Path | None = None, verifier_path: str | Path | None = None,
                 verifier_files: dict | None = None, tita_gate: float = 1.0, tita_candidates: int = 0,
                 fork_target: str | Path | None = None):
        """``reward_path``: a reward model folder, whole or forked (``decoding.fork``); ``tita_gate``: TITA
        consults the reward model only at steps where the target's top-1 probability is below it (1.0:
        every step); ``tita_candidates``: TITA takes the log-ratio inside the target's top K tokens only (0:
        the whole vocabulary; ``decoding.steer_math.tita_candidates``); ``fork_target``: when ``model_path`` itself is a fork, the target it was forked from
        (the engine then serves the materialised whole reward model: the vllm engine's worker)."""
        self.model_path = str(model_path)
        self.tita_gate, self.tita_candidates = tita_gate, tita_candidates
        local_folder(model_path, "model")
        if reward_path is not None:
            local_folder(reward_path, "reward model")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.tokenizer = self.processor.tokenizer
        if is_fork(self.model_path):
            if fork_target is None:
                raise ValueError(f"{self.model_path} is a forked reward model: it runs inside its target's engine")
            self.model = materialise(AutoModelForImageTextToText.from_pretrained(fork_target, dtype=self.dtype), self.model_path)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.config = self.model.config
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        text_config = self.model.config.get_text_config()
        self.vocab_size = text_config.vocab_size
        self.max_context = getattr(text_config, "max_position_embeddings", 4096)
        self.positions = positions_for(self.model)
        self._tower_out: list = []
        tower = getattr(self.model.model, "vision_tower", None)
        # LLaVA-1.5 runs its CLIP tower once per image: its outputs can be shared with a verifier or a reward
        # model that has the same tower (proven equal by tests). Other families (crops, windows, pooling)
        # leave the tower to whoever needs it.
        self.shares_tower_outputs = tower is not None and self.model.config.model_type == "llava"
        if self.shares_tower_outputs:  # keep what the tower computed: the verifier and the reward model share it
            # (read at hook time: Llava's forward later overwrites ``pooler_output`` with projected features)
            tower.register_forward_hook(lambda mod, args, out: self._tower_out.append(
                (out.pooler_output, self._selected_features(out) if out.hidden_states is not None else None)))
        reward = verifier = self.fork = None
        self._trunk = None  # the hidden state entering the fork's first layer, captured by the last forward
        self._masks = None  # prebuilt attention masks the language model was given (Gemma 3: images attend both ways)
        if reward_path is not None:
            self._check_vocabulary(reward_path)
        if is_fork(reward_path):  # the reward model's layers run on this model's own hidden states
            reward = self.fork = Fork(self.model, self.positions, reward_path)
            self.model.get_decoder().layers[self.fork.capture].register_forward_pre_hook(self._capture, with_kwargs=True)
            self.model.get_decoder().register_forward_pre_hook(self._capture_masks, with_kwargs=True)
        elif reward_path is not None:
            reward = TransformersEngine(reward_path, device=device, dtype=dtype)
            check_rows(reward.vocab_size, len(self.tokenizer), reward_path)
        if verifier_path is not None:
            from decoding.verifier import Verifier

            verifier = Verifier(verifier_path, device=device, dtype=self.dtype, **(verifier_files or {}))
        self.resources = Resources(self, reward, verifier)
        self.methods = {name: cls(self.resources) for name, cls in usable_methods(self.resources).items()}
        text_model = self.model.get_decoder()  # the language model under the image-text wrapper
        self._decoder = LlamaDecoder(text_model, self.model.get_output_embeddings()) if supported(text_model) else None
        self._capture_at = self.fork.capture if self.fork is not None else None
        # intra-op threads for prefill, when the caller runs decode steps on fewer (prefill is compute-bound:
        # 1 -> 2 threads took a 1-row prefill from 5.6 to 4.4 ms; a small batch's decode step is fastest on 1)
        self.prefill_threads: int | None = None
        self.steering = SteeringPipeline(self.methods, self.eos_ids)
        self._grammars: Grammars | None = None

    @property
    def grammars(self) -> Grammars:
        """xgrammar's compiler for this tokenizer (``decoding.grammar``), built at the first structured request."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars

    def _check_vocabulary(self, reward_path) -> None:
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(reward_path).get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"the reward model at {reward_path} does not share the target's vocabulary; "
                             "TITA needs identical tokenizers")

    def _capture(self, module, args, kwargs) -> None:
        self._trunk = args[0] if args else kwargs["hidden_states"]

    def _capture_masks(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._masks = mask if isinstance(mask, dict) else None

    def pop_steering_seconds(self) -> dict[str, float]:
        """Steering time per method since the last call."""
        return self.steering.pop_seconds()

    def pop_consultations(self) -> dict[str, tuple[int, int]]:
        """Per method that consults a reward model: (consulted, skipped) row-steps since the last call."""
        return {n: m.pop_consultations() for n, m in self.methods.items() if hasattr(m, "pop_consultations")}

    def pop_verb_seconds(self) -> dict[str, float]:
        """Steering time per method and verb (``tita.start``, ``tita.steer``, ``tita.advance``, ...)."""
        return self.steering.pop_verb_seconds()

    @property
    def available_methods(self) -> list[str]:
        return ["none", *self.methods]

    @property
    def unavailable(self) -> dict[str, str]:
        """Registered methods this engine cannot run, and why."""
        return {n: cls.unavailable(self.resources) for n, cls in REGISTRY.items() if n not in self.methods}

    def resolve(self, spec: SteeringSpec) -> dict[str, float]:
        """method -> strength for a steering spec (see ``decoding.methods.resolve``)."""
        return resolve(spec, self.methods, self.unavailable.get)

    # ------------------------------------------------------------ requests -> rows

    def encode(self, request: GenerationRequest, steer: bool = True) -> Row:
        return encode_row(self.processor, request, self.resolve(request.steering) if steer else {})

    row_for = staticmethod(row_for)

    def inputs_for(self, prompt_ids: list[int], images: list) -> dict:
        """See ``decoding.model_inputs.inputs_for``."""
        return inputs_for(self.processor, self.config, prompt_ids, images)

    # ------------------------------------------------------------ the verbs

    def _selected_features(self, out) -> torch.Tensor:
        """The tower's features as the projector takes them (Llava: one layer, CLS dropped by default)."""
        cfg = self.model.config
        feats = out.hidden_states[cfg.vision_feature_layer]
        return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats

    def _embeds_from_features(self, ids: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Input embeddings with the image slots filled from features a same-tower model computed
        (what Llava's forward does with pixels, minus the tower)."""
        inner = self.model.model
        embeds = inner.get_input_embeddings()(ids)
        feats = torch.cat([r.image_features for r in rows if r.image_features is not None]).to(self.device, self.dtype)
        image_embeds = inner.multi_modal_projector(feats).reshape(-1, embeds.shape[-1])
        slots = (ids == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))

    def prefill(self, rows: list[Row], steer: bool = True, reuse_features: bool = False) -> Batch:
        """One forward over new rows. With ``reuse_features``, rows whose ``image_features`` were computed
        by a model with the same vision tower (and processor) skip the tower."""
        threads = torch.get_num_threads()
        if not self.prefill_threads or self.prefill_threads == threads:
            return self._prefill(rows, steer, reuse_features)
        torch.set_num_threads(self.prefill_threads)
        try:
            return self._prefill(rows, steer, reuse_features)
        finally:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def _prefill(self, rows: list[Row], steer: bool, reuse_features: bool) -> Batch:
        groups = prefill_groups(rows)  # rows whose image tensors cannot be batched are prefilled apart
        batch = self._forward([rows[i] for i in groups[0]], reuse_features)
        for g in groups[1:]:
            batch = self.merge(batch, self._forward([rows[i] for i in g], reuse_features))
        if len(groups) > 1:  # back to the callers' order
            order = [i for g in groups for i in g]
            batch = self.select(batch, [order.index(i) for i in range(len(rows))])
        if steer:
            self.steering.start(batch)
        return batch

    def _forward(self, rows: list[Row], reuse_features: bool) -> Batch:
        """One prefill forward over rows whose image tensors batch together."""
        ids, mask = _left_pad([r.prompt_ids for r in rows], self.pad_id)
        extra = batch_inputs(rows, ids.shape[1])
        pixels = [r.pixel_values for r in rows if r.pixel_values is not None]
        reuse = reuse_features and bool(pixels) and all(r.image_features is not None for r in rows if r.pixel_values is not None)
        pos, next_pos = self.positions.prefill(ids, mask, extra)
        cache = GrowingCache()
        self._tower_out.clear()
        extra = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in extra.items()}
        if reuse:
            extra.pop("pixel_values")
            inputs = {"inputs_embeds": self._embeds_from_features(ids.to(self.device), rows), **extra}
        else:
            inputs = {"input_ids": ids.to(self.device), **extra}
        out = self.model(
            **inputs,
            attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch = Batch(rows, out.past_key_values, mask.to(self.device), next_pos.to(self.device), out.logits[:, -1].float())
        if self.fork is not None:  # each row's prompt as the fork reads it (TITA's ``start``)
            for i, r in enumerate(rows):
                n = len(r.prompt_ids)
                masks = {k: m[i : i + 1, ..., -n:, -n:] if m is not None else None
                         for k, m in self._masks.items()} if self._masks else None
                r.trunk = (self._trunk[i, -n:], pos[..., i, -n:].to(self.device), batch.next_pos[i], masks)
            self._trunk = self._masks = None
        if self._tower_out and pixels:
            pooled = torch.cat([p for p, _ in self._tower_out])
            feats = torch.cat([f for _, f in self._tower_out]) if all(f is not None for _, f in self._tower_out) else None
            j = 0
            for r in rows:
                if r.pixel_values is not None:
                    r.image_pooled = pooled[j]
                    r.image_features = feats[j : j + len(r.pixel_values)] if feats is not None else None
                    j += len(r.pixel_values)
        self._tower_out.clear()
        return batch

    def steer(self, batch: Batch) -> torch.Tensor:
        """Scores to sample from: each structured row's grammar mask first (in place on ``batch.logits``, as
        vLLM masks before its logits processors), then the steering (``SteeringPipeline.steer``)."""
        self._mask(batch)
        return self.steering.steer(batch)

    def _mask(self, batch: Batch) -> None:
        """The grammar masks of the rows that have one (``decoding.grammar``); a row whose grammar allows
        no token fails (``GrammarDeadEnd``: no token the grammar forbids is forced)."""
        rows = batch.rows
        if all(r.request.structured is None for r in rows):
            return
        for r in rows:
            if r.request.structured is not None and r.grammar is None and r.error is None:
                try:
                    r.grammar = self.grammars.matcher(r.request.structured, getattr(r.request.sampling, "stop_token_ids", ()) or ())
                except ValueError as e:
                    r.error = e
        for i in apply_masks(batch.logits, [r.grammar for r in rows], self.vocab_size):
            rows[i].error = rows[i].error or GrammarDeadEnd(
                f"the requested output format allows no token of this model's vocabulary after {len(rows[i].token_ids)} "
                "generated tokens")

    @torch.inference_mode()
    def decode_one_token(self, batch: Batch, tokens: torch.Tensor, steer: bool = True) -> None:
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        if self._decoder is not None:  # a decode step has no image: straight to the language model
            logits = self._decoder(tokens.to(self.device), batch.mask, batch.next_pos, batch.cache, capture=self._capture_at)
            self._trunk = self._decoder.captured if self._capture_at is not None else None
        else:
            out = self.model(input_ids=tokens.view(-1, 1).to(self.device), attention_mask=batch.mask,
                             position_ids=self.positions.decode(batch.next_pos), past_key_values=batch.cache,
                             use_cache=True)
            batch.cache, logits = out.past_key_values, out.logits[:, -1]
        batch.next_pos = batch.next_pos + 1
        batch.logits = logits.float()
        batch.trunk, self._trunk = self._trunk, None
        if steer:
            self.steering.advance(batch, tokens)

    def without_failed(self, batch: Batch) -> tuple[Batch | None, list[Row]]:
        """The batch less the rows whose steering failed (and those rows), or None when none is left."""
        failed = [r for r in batch.rows if r.error is not None]
        if not failed:
            return batch, []
        keep = [i for i, r in enumerate(batch.rows) if r.error is None]
        return (self.select(batch, keep) if keep else None), failed

    def select(self, batch: Batch, keep: list[int]) -> Batch:
        """The batch restricted to rows ``keep``, in that order (finished or cancelled rows leave; a
        permutation reorders)."""
        if keep == list(range(len(batch.rows))):
            return batch
        idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
        mask = select_cache(batch.cache, batch.mask, idx)
        states = self.steering.select(batch, keep)
        return Batch([batch.rows[i] for i in keep], batch.cache, mask, batch.next_pos[idx], batch.logits[idx], states)

    def merge(self, a: Batch, b: Batch) -> Batch:
        """One batch from two: the shorter cache is left-padded (masked) to the longer one."""
        cache, mask = merge_caches(a.cache, a.mask, b.cache, b.mask)
        states = self.steering.merge(a, b)
        return Batch(a.rows + b.rows, cache, mask, torch.cat([a.next_pos, b.next_pos]),
                     torch.cat([a.logits, b.logits]), states)

    def sample(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        """Choose each row's next token from (steered) logits and record it; marks finished rows."""
        params = [r.request.sampling for r in batch.rows]
        if any(p.repeats_penalized for p in params):  # vLLM's order: repetition, then frequency and presence
            seen = seen_tokens([r.prompt_ids + r.token_ids if p.repeats_penalized else [] for r, p in zip(batch.rows, params)],
                               logits.shape[-1], logits.device)
            logits = apply_repetition_penalty(logits, seen, torch.tensor([p.repetition_penalty for p in params],
                                                                         device=logits.device))
        if any(p.penalized for p in params):
            logits = apply_penalties(
                logits, output_counts([r.token_ids for r in batch.rows], logits.shape[-1], logits.device),
                torch.tensor([p.presence_penalty for p in params], device=logits.device),
                torch.tensor([p.frequency_penalty for p in params], device=logits.device))
        temp = torch.tensor([p.temperature for p in params], device=logits.device)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        top_k = torch.tensor([p.top_k for p in params], device=logits.device) if any(p.top_k for p in params) else None
        min_p = torch.tensor([p.min_p for p in params], device=logits.device) if any(p.min_p for p in params) else None
        tokens = sample_tokens(logits, temp, top_p, [r.generator for r in batch.rows], top_k=top_k, min_p=min_p)
        want = [p.top_logprobs for p in params]
        if any(k is not None for k in want):
            chosen, top_v, top_i = token_logprobs(logits, tokens, max(k or 0 for k in want))
        explained = explain_tokens(batch.trace, tokens) if batch.trace is not None else {}
        for i, (row, tok) in enumerate(zip(batch.rows, tokens.tolist())):
            if row.error is not None:
                continue
            n = len(row.token_ids)
            self._append(row, tok)
            if i in explained and len(row.token_ids) > n:
                row.explain.append(explained[i])
            if want[i] is not None and len(row.token_ids) > n:  # a logprob per completion token (not the EOS)
                k = want[i]
                top = list(zip(top_i[i, :k].tolist(), top_v[i, :k].tolist()))
                row.logprobs.append(TokenLogprob(tok, float(chosen[i]), top))
        return tokens

    def _append(self, row: Row, tok: int) -> None:
        if row.grammar is not None and not row.grammar.accept(tok):  # a masked token was sampled: never served
            row.error = RuntimeError(f"token {tok} was chosen where the requested output format forbids it")
            return
        append_token(row, tok, self.tokenizer, self.eos_ids, self.max_context)

    def step(self, batch: Batch, on_tokens=None) -> Batch | None:
        """One decoding step for every row of the batch, the body of every decode loop (``generate``'s and
        the server scheduler's): steer the logits, sample, let ``on_tokens(batch)`` see the new tokens
        (stream them) and say which rows stay (a list of bools; default: the unfinished rows that did
        not fail), then the rows that stay take their token through the model. Returns the batch that
        goes on, or None when no row stays."""
        tokens = self.sample(batch, self.steer(batch))
        stay = on_tokens(batch) if on_tokens else [r.finish_reason is None and r.error is None for r in batch.rows]
        keep = [i for i, s in enumerate(stay) if s]
        if not keep:
            return None
        batch = self.select(batch, keep)
        self.decode_one_token(batch, tokens[keep])
        return batch

    @staticmethod
    def completion(row: Row) -> Completion:
        lp = row.logprobs if row.request.sampling.top_logprobs is not None else None
        return Completion(row.request.request_id, row.token_ids, row.text, row.finish_reason or "length",
                          len(row.prompt_ids), lp, row.steered_tokens,
                          row.explain if row.request.steering.explain else None)

    # ------------------------------------------------------------ a whole batch of requests

    def generate(self, requests: list[GenerationRequest], max_batch: int = 32) -> list[Completion]:
        """Complete every request (in chunks of ``max_batch`` rows); results in request order."""
        done: dict[str, Completion] = {}
        for start in range(0, len(requests), max_batch):
            batch, failed = self.without_failed(self.prefill([self.encode(r) for r in requests[start : start + max_batch]]))
            if failed:
                raise failed[0].error

            def collect(b: Batch) -> list[bool]:
                for r in b.rows:
                    if r.error is not None:
                        raise r.error
                    if r.finish_reason is not None:
                        done[r.request.request_id] = self.completion(r)
                return [r.finish_reason is None for r in b.rows]

            while batch is not None:
                batch = self.step(batch, collect)
        return [done[r.request_id] for r in requests]
