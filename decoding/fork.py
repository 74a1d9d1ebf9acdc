"""A forked TITA reward model: a copy of the target's top ``k`` decoder layers, final norm and output head,
fed the target's own hidden state entering layer ``L - k``, with its own KV cache for those ``k`` layers.

At initialisation the fork is the target (the log-ratio is zero everywhere); DPO trains only the fork
(``reward_models.train_reward``, ``--fork-layers``). Per token it costs ``k / L`` of the target's layers
plus one output head, instead of a second model: the inference-time relative of reward heads inside the
policy (Otter, arXiv 2408.10764) that ../notes call "a reward model that shares the target's trunk".

On disk (``save_fork``): ``fork.json`` (format, ``layers`` k, ``first_layer`` L - k, the trunk's
fingerprint), ``fork.safetensors`` (the fork's tensors under the target's own state-dict names), the
target's ``config.json`` and processor files (so tokenizer checks read it like any reward model; there is
deliberately no ``model.safetensors``: ``from_pretrained`` on a fork fails loudly instead of loading
random weights). A fork serves only the target whose trunk it was trained on: ``check_trunk`` refuses
any other at load.

Engines use it in two ways:
- ``Fork``: inside the transformers engine, the fork's layers run on the target's captured hidden states,
  lazily (``catch_up`` feeds every token since the last consultation in one forward);
- ``materialise``: a whole reward model (the target with the fork's layers in place), for engines that
  run a separate reward model (the vllm engine, until the reward model lives inside vLLM's model).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from decoding.kv_cache import GrowingCache, merge_caches, select_cache
from decoding.llama_decode import LlamaDecoder, supported

FORK_FILE = "fork.json"
FORK_WEIGHTS = "fork.safetensors"
FORMAT = "vlm-steer-fork/1"


def is_fork(path: str | Path | None) -> bool:
    """Whether a reward-model folder holds a fork (``fork.json``) rather than a whole model."""
    return path is not None and (Path(path) / FORK_FILE).is_file()


def fork_prefixes(model, k: int) -> tuple[list[str], int]:
    """State-dict prefixes of the fork's modules in ``model`` (its top ``k`` decoder layers, final norm,
    output head) and the index of the first forked layer. Raises ValueError for k outside 1..L."""
    text = model.get_decoder()
    n = len(text.layers)
    if not 0 < k <= n:
        raise ValueError(f"fork of {k} layers: the target has {n} decoder layers (1..{n})")
    names = {id(m): name for name, m in model.named_modules()}
    mods = [*text.layers[n - k:], text.norm, model.get_output_embeddings()]
    return [names[id(m)] + "." for m in mods], n - k


def _in(key: str, prefixes: list[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def trunk_fingerprint(model, k: int) -> str:
    """SHA-256 over the target's trunk (every tensor outside the fork: vision tower, projector, embeddings,
    layers below ``L - k``): names, shapes and, per tensor, up to 65,536 evenly spaced values cast to
    bfloat16, so the same checkpoint loaded in float32, float16 or bfloat16 gives the same fingerprint and
    any other checkpoint a different one, at a cost of a strided read per tensor rather than a full hash
    (a 7B trunk would take tens of seconds)."""
    prefixes, _ = fork_prefixes(model, k)
    return fingerprint((name, lambda t=t: t) for name, t in model.state_dict().items() if not _in(name, prefixes))


def fingerprint(tensors) -> str:
    """``trunk_fingerprint``'s hash over (state-dict name, a callable giving the tensor) pairs, in name
    order: the tensors are fetched one at a time (``decoding.vllm.fork_spec`` reads them from files)."""
    h = hashlib.sha256()
    for name, get in sorted(tensors, key=lambda item: item[0]):
        t = get()
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 65536)
        sample = flat[::step][:65536].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(sample)
    return h.hexdigest()


def fork_tensors(model, k: int) -> dict[str, torch.Tensor]:
    """The fork's tensors of a (trained) full model, under their state-dict names."""
    prefixes, _ = fork_prefixes(model, k)
    return {n: t.detach().to("cpu").contiguous().clone() for n, t in model.state_dict().items() if _in(n, prefixes)}


def save_fork(model, target, k: int, processor, out: str | Path, meta: dict | None = None) -> Path:
    """Write the fork of a full model ``model`` whose trunk is ``target``'s (checked: a fork is only ever
    saved for the trunk it was trained on) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fp = trunk_fingerprint(target, k)
    if trunk_fingerprint(model, k) != fp:
        raise ValueError("the trained model's trunk differs from the target's: only the fork may be trained")
    _, first = fork_prefixes(target, k)
    for stale in out.glob("model*.safetensors*"):  # a whole model written here before: a fork folder holds none
        stale.unlink()
    save_file(fork_tensors(model, k), out / FORK_WEIGHTS, metadata={"format": "pt"})
    target.config.save_pretrained(out)
    processor.save_pretrained(out)
    info = {"format": FORMAT, "layers": k, "first_layer": first, "num_layers": first + k,
            "model_type": target.config.model_type, "trunk_sha256": fp, **(meta or {})}
    (out / FORK_FILE).write_text(json.dumps(info, indent=2))
    return out


def read_fork(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    info = json.loads((path / FORK_FILE).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path / FORK_FILE}: unknown format {info.get('format')!r} (expected {FORMAT!r})")
    return info, load_file(path / FORK_WEIGHTS)


def check_trunk(info: dict, target, path, trunk=None) -> None:
    """Refuse a fork trained on another target: its layers would read hidden states they never saw.
    ``trunk``: a callable giving the target's fingerprint (default ``trunk_fingerprint`` of ``target``;
    the vllm engine reads it from files, ``target`` then on the meta device), called after the layer check."""
    n = len(target.get_decoder().layers)
    if info["num_layers"] != n or info.get("model_type") != target.config.model_type:
        raise ValueError(f"the forked reward model at {path} was built for a {info.get('model_type')} target of "
                         f"{info['num_layers']} layers; this target is a {target.config.model_type} of {n}")
    if (trunk or (lambda: trunk_fingerprint(target, info["layers"])))() != info["trunk_sha256"]:
        raise ValueError(f"the forked reward model at {path} was trained on another target's weights (trunk "
                         "fingerprint differs): a fork serves only the exact target it was built from")


def untied_copy(model):
    """A deep copy of ``model`` whose output head owns its weights (a tied head, Gemma 3's, shares the input
    embedding: a fork trains and stores the head, never the trunk's embedding)."""
    model = copy.deepcopy(model)
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg.tie_word_embeddings = False  # saved as a whole model, the head keeps its own weights
    return model


def materialise(target, path: str | Path):
    """A whole reward model: a copy of ``target`` with the fork's tensors in place (same arithmetic as
    ``Fork``; what an engine that runs a separate reward model loads)."""
    info, tensors = read_fork(path)
    check_trunk(info, target, path)
    model = untied_copy(target)
    state = model.state_dict()
    for name, t in tensors.items():
        if name not in state or state[name].shape != t.shape:
            raise ValueError(f"{path}: tensor {name} does not fit the target")
        state[name].copy_(t)
    return model.eval()


def head_rows(weight: torch.Tensor, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """An output head [V, D] over only the ``candidates`` [n, K] of each row of ``hidden`` [n, D]:
    logits [n, K] in float32, at K rows' cost instead of V."""
    return torch.bmm(weight[candidates], hidden.unsqueeze(-1)).squeeze(-1).float()


@dataclass
class ForkState:
    """The fork's rows: its KV cache (k layers), mask [B, T_f], next position [B], the final-normed hidden
    state [B, D] after the last token it has read, and the trunk's hidden states [B, P, D] of the tokens
    fed since (read at the next consultation)."""

    cache: GrowingCache
    mask: torch.Tensor
    next_pos: torch.Tensor
    last: torch.Tensor
    pending: torch.Tensor | None = None


class Fork:
    """The fork's layers inside a target engine (``decoding.transformers_engine``). The engine captures the
    hidden state entering layer ``first`` (``capture``) at prefill and at every decode step; TITA calls
    ``prefill``, ``feed`` (cheap: the hidden states wait), ``catch_up`` (one forward over the waiting
    tokens) and ``logits`` (the head, for the rows being consulted only)."""

    def __init__(self, target_model, positions, path: str | Path):
        info, tensors = read_fork(path)
        check_trunk(info, target_model, path)
        self.path, self.k, self.capture = str(path), info["layers"], info["first_layer"]
        text = target_model.get_decoder()
        # A text model of the same class over k layers: the target's modules shared by reference (rotary
        # embeddings, the input embedding, which the fork never reads), its own copies of the k layers and
        # the norm, renumbered 0..k-1 (a layer's index picks its slot in the KV cache).
        fork = copy.copy(text)
        for attr in ("_modules", "_parameters", "_buffers"):
            setattr(fork, attr, OrderedDict(getattr(text, attr)))
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            if hasattr(text, attr):
                setattr(fork, attr, OrderedDict())
        cfg = copy.deepcopy(text.config)
        cfg.num_hidden_layers = self.k
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[self.capture:]
        fork.config = cfg
        layers = torch.nn.ModuleList(copy.deepcopy(layer) for layer in text.layers[self.capture:])
        for j, layer in enumerate(layers):
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = j
        fork.layers = layers
        fork.norm = copy.deepcopy(text.norm)
        head = copy.deepcopy(target_model.get_output_embeddings())
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        names = {id(m): n + "." for n, m in target_model.named_modules()}
        mods = {names[id(m)]: mine for m, mine in zip([*text.layers[self.capture:], text.norm], [*layers, fork.norm])}
        mods[names[id(target_model.get_output_embeddings())]] = head
        for name, t in tensors.items():
            prefix = next((p for p in mods if name.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"{path}: tensor {name} is not part of a fork of {self.k} layers")
            param = mods[prefix].get_parameter(name[len(prefix):])
            param.data = t.to(param.device, param.dtype)
        fork.requires_grad_(False)
        self.text, self.head, self.positions = fork, head, positions
        cap = getattr(text.config, "final_logit_softcapping", None)
        self.softcap = cap or getattr(target_model.config.get_text_config(), "final_logit_softcapping", None)
        self.fast = LlamaDecoder(fork, None) if supported(text) else None
        self.vocab_size = head.weight.shape[0]

    def _forward(self, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """The fork's layers over ``hidden`` [B, P, D] (positions ``pos``, mask over cache + new) ->
        final-normed hidden state of the last position [B, D]."""
        if self.fast is not None:  # ``pos``: each row's first new position [B]
            return self.fast(None, mask, pos, cache, embeds=hidden, head=False)
        out = self.text(inputs_embeds=hidden, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1]

    @torch.inference_mode()
    def prefill(self, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, next_pos: torch.Tensor,
                masks: dict | None = None) -> ForkState:
        """The fork over left-padded prompts: ``hidden`` [B, T, D] entering layer ``first``, ``mask`` [B, T],
        ``pos`` the position ids the target's forward took, ``next_pos`` [B]; ``masks``: the prebuilt 4-D
        masks the target's language model was given, by attention type (Gemma 3: image tokens attend both
        ways), used instead of ``mask`` for this forward."""
        cache = GrowingCache()  # prefill goes through transformers' forward, as the target's does
        out = self.text(inputs_embeds=hidden, attention_mask=masks or mask, position_ids=pos, past_key_values=cache,
                        use_cache=True)
        return ForkState(cache, mask, next_pos, out.last_hidden_state[:, -1])

    @staticmethod
    def feed(state: ForkState, hidden: torch.Tensor) -> None:
        """Tokens the target just read: their hidden states [B, P, D] wait for the next ``catch_up``."""
        state.pending = hidden if state.pending is None else torch.cat([state.pending, hidden], 1)

    @torch.inference_mode()
    def catch_up(self, state: ForkState) -> None:
        """One forward of the fork over every token fed since the last one (all rows: the cache stays
        aligned); afterwards ``state.last`` is current."""
        if state.pending is None:
            return
        p = state.pending.shape[1]
        mask = torch.cat([state.mask, state.mask.new_ones((state.mask.shape[0], p))], 1)
        pos = state.next_pos if self.fast is not None else self.positions.span(state.next_pos, p)
        state.last = self._forward(state.pending, mask, pos, state.cache)
        state.mask, state.next_pos, state.pending = mask, state.next_pos + p, None

    @torch.inference_mode()
    def logits(self, state: ForkState, rows: torch.Tensor | None = None,
               candidates: torch.Tensor | None = None) -> torch.Tensor:
        """The fork's logits [n, V] for ``rows`` (indices; default all) after ``catch_up``; with
        ``candidates`` [n, K] token ids, only those [n, K]: the head costs K rows of its weight, not V."""
        h = state.last if rows is None else state.last[rows]
        out = F.linear(h, self.head.weight).float() if candidates is None else head_rows(self.head.weight, h, candidates)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def select(self, state: ForkState, keep: list[int]) -> ForkState:
        idx = torch.tensor(keep, dtype=torch.long, device=state.mask.device)
        mask = select_cache(state.cache, state.mask, idx)
        pending = state.pending[idx] if state.pending is not None else None
        return ForkState(state.cache, mask, state.next_pos[idx], state.last[idx], pending)

    def merge(self, a: ForkState, b: ForkState) -> ForkState:
        self.catch_up(a)  # rows that join read their own tokens first: both caches end at their last token
        self.catch_up(b)
        cache, mask = merge_caches(a.cache, a.mask, b.cache, b.mask)
        return ForkState(cache, mask, torch.cat([a.next_pos, b.next_pos]), torch.cat([a.last, b.last]))
