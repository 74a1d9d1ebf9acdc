"""Structured outputs: a grammar's token mask applied to a row's logits before steering, as vLLM applies its
structured-output bitmask before logits processors (``vllm/v1/worker/gpu_model_runner.py``:
``apply_grammar_bitmask``, then the sampler's logits processors).

The grammar library is xgrammar (Dong et al., "XGrammar: Flexible and Efficient Structured Generation
Engine for Large Language Models", MLSys 2025, arXiv 2411.15100), vLLM's default structured-output backend,
set up as vLLM 0.32's ``XgrammarBackend`` sets it up (``TokenizerInfo.from_huggingface`` with the model's
vocabulary size; ``compile_json_schema(spec, any_whitespace=True)``; choices as an EBNF grammar; the
request's stop tokens override the tokenizer's): the transformers engine and the vllm engine (whose own
structured outputs are pinned to xgrammar) then mask the same tokens at every step.

- ``StructuredOutput``: one constraint (vLLM's ``StructuredOutputsParams``, one field of it).
- ``Grammars``: xgrammar's compiler for one tokenizer; ``check`` refuses, before generation, a constraint
  that no token sequence of the vocabulary can satisfy (``Unsatisfiable``, a ``ValueError``: HTTP 400).
- ``RowGrammar``: one row's matcher; ``apply_masks`` masks a batch's logits [B, V] in place.
- ``unmasked``: the rows whose steered scores gave a masked token a score or hold a NaN (steering must
  keep masked tokens at -inf).

xgrammar is imported when the first grammar is built (it is a dependency; importing it costs about 0.3 s).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass

import torch

KINDS = ("json", "json_object", "regex", "choice", "grammar")
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # what vLLM compiles for json_object (and response_format json_object)
SEARCH_BUDGET = 64  # matcher states the satisfiability check may visit (each costs one mask fill)
COMPILE_TIMEOUT_S = 5.0  # vLLM's VLLM_REGEX_COMPILATION_TIMEOUT_S default: a constraint slower to compile is refused
# JSON-schema keywords xgrammar 0.2.8 ignores or mishandles: vLLM 0.32 refuses them for its xgrammar backend
# (``has_xgrammar_unsupported_json_features``); both engines refuse them here, with the keyword named.
STRING_FORMATS = {"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
                  "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"}


class Unsatisfiable(ValueError):
    """No sequence of the model's tokens satisfies the constraint (found before generation)."""


class GrammarDeadEnd(ValueError):
    """During generation, the constraint allowed no token of the vocabulary (the request fails, no token
    the grammar forbids is forced). ``param``: the request field that closed the way (``min_tokens``), for
    the 400's ``param``; kept through pickling (the engine process sends it across a pipe)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):
        return type(self), (str(self), self.param)


def min_tokens_dead_end(n: int) -> GrammarDeadEnd:
    """The failure of a row whose format must end after ``n`` generated tokens while ``min_tokens`` masks its
    end (both engines say it alike)."""
    return GrammarDeadEnd(f"min_tokens: the requested output format must end after {n} tokens", param="min_tokens")


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on a completion: ``kind`` one of ``KINDS`` (vLLM's ``StructuredOutputsParams`` fields
    ``json``, ``json_object``, ``regex``, ``choice``, ``grammar``); ``spec`` its text: the JSON schema as
    JSON (key order kept: xgrammar writes properties in schema order), the regular expression, the choices
    as a JSON list, the EBNF (GBNF) or Lark grammar; empty for ``json_object``."""

    kind: str
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}; one of {KINDS}")

    def vllm_params(self) -> dict:
        """Keyword arguments of ``vllm.sampling_params.StructuredOutputsParams``."""
        if self.kind == "json_object":
            return {"json_object": True}
        if self.kind == "choice":
            return {"choice": json.loads(self.spec)}
        return {self.kind: self.spec}


def choice_as_grammar(choices: list[str]) -> str:
    """The EBNF grammar of a choice among strings, written exactly as vLLM 0.32 writes it
    (``vllm/v1/structured_output/utils.py``: ``choice_as_grammar``) so that both engines compile the same
    grammar (vLLM is not importable beside the transformers engine, hence the copy)."""
    escapes = {"\\": r"\\", '"': r"\"", "\n": r"\n", "\r": r"\r", "\t": r"\t"}

    def escape(ch: str) -> str:
        if ch in escapes:
            return escapes[ch]
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

    return "root ::= " + " | ".join('"' + "".join(escape(c) for c in s) + '"' for s in choices)


def is_lark(grammar: str) -> bool:
    """Whether a grammar is Lark rather than EBNF: no rule is written with ``::=`` (vLLM's heuristic,
    ``grammar_is_likely_lark``, on lines without comments)."""
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in grammar.splitlines())


def unsupported_json_features(schema) -> str | None:
    """The first JSON-schema keyword of ``schema`` that xgrammar does not enforce, or None. The same
    list as vLLM 0.32's ``has_xgrammar_unsupported_json_features`` (its xgrammar backend refuses such
    schemas; the transformers engine must refuse them too rather than ignore the keyword)."""
    if isinstance(schema, list):
        return next((f for f in map(unsupported_json_features, schema) if f), None)
    if not isinstance(schema, dict):
        return None
    t = schema.get("type")
    types = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
    if types & {"integer", "number"} and "multipleOf" in schema:
        return "multipleOf"
    if "array" in types:
        for key in ("uniqueItems", "contains", "minContains", "maxContains"):
            if key in schema:
                return key
    if "string" in types:
        if "format" in schema and schema["format"] not in STRING_FORMATS:
            return f"format {schema['format']!r}"
        if ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema):
            return "pattern or format with minLength or maxLength"
    if "object" in types and "propertyNames" in schema:
        names = schema["propertyNames"]
        if (isinstance(names, dict) and ("pattern" in names or "format" in names)
                and ("minLength" in names or "maxLength" in names)):
            return "propertyNames with a pattern and a length"
        if "patternProperties" in schema or "properties" in schema or schema.get("unevaluatedProperties", True) is not True:
            return "propertyNames with properties, patternProperties or unevaluatedProperties"
    if "object" in types and isinstance(schema.get("patternProperties"), dict):
        if "properties" in schema or len(schema["patternProperties"]) > 1:
            return "patternProperties with properties, or more than one pattern"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) >= 2:
        return "allOf with several schemas"
    return next((f for f in map(unsupported_json_features, schema.values()) if f), None)


def allowed_tokens(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids [k] a bitmask row (xgrammar's int32 words, bit j of word w = token 32 w + j) allows."""
    bits = (bitmask_row.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    return bits.reshape(-1)[:vocab_size].nonzero().squeeze(-1)


class RowGrammar:
    """One row's grammar state (an xgrammar ``GrammarMatcher``). Once the matcher has accepted a stop token
    it is terminated and masks nothing (vLLM fills a full mask for a terminated grammar: ``ignore_eos``)."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.terminated = False

    def fill(self, bitmask: torch.Tensor, i: int) -> None:
        if self.terminated:
            bitmask[i] = -1
        else:
            self.matcher.fill_next_token_bitmask(bitmask, i)

    def accept(self, token: int) -> bool:
        """Advance by the chosen token; False if the grammar refuses it."""
        if self.terminated:
            return True
        ok = self.matcher.accept_token(token)
        self.terminated = self.matcher.is_terminated()
        return ok


class EndGuard:
    """A completion's tokens followed through its grammar, to tell when ``min_tokens`` closes the only way on:
    after fewer than ``min_tokens`` tokens the grammar allows nothing but tokens ``min_tokens`` masks (its
    ends). The vllm engine needs it in the API process: vLLM stops masking a grammar it has terminated, so
    there the row would run on past its format's end (the transformers engine sees the dead end in its step)."""

    def __init__(self, row: RowGrammar, vocab_size: int, min_tokens: int, ends):
        self.row, self.vocab_size, self.min_tokens, self.ends = row, vocab_size, min_tokens, frozenset(ends)
        self.n = 0
        self.bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)

    def dead_after(self, token: int) -> bool:
        """Take one generated token; True when the format must end now and ``min_tokens`` forbids it."""
        self.row.accept(token)
        self.n += 1
        if self.n >= self.min_tokens or self.row.terminated:
            return False
        self.row.fill(self.bitmask, 0)
        return self.ends.issuperset(allowed_tokens(self.bitmask[0], self.vocab_size).tolist())


class Grammars:
    """xgrammar's compiler for one tokenizer. ``vocab_size``: the model's logits width (the text config's
    ``vocab_size``, which may pad the tokenizer); ``stop_ids``: the tokens that end a completion (the
    tokenizer's EOS and the generation config's), which end the grammar too. Compiled grammars are cached
    by xgrammar (per constraint text)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids, cache_mb: int = 512):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.stop_ids = sorted(int(t) for t in stop_ids if t is not None)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=8, cache_enabled=True,
                                            cache_limit_bytes=cache_mb * 1024 * 1024)
        self._checked: dict[tuple, str | None] = {}  # (constraint, max_tokens) -> why unsatisfiable, or None

    def compile(self, so: StructuredOutput):
        """The compiled grammar, or ``ValueError`` saying what is wrong with the constraint (or that it took
        over ``COMPILE_TIMEOUT_S`` to compile: vLLM's guard against patterns whose automaton explodes; the
        compilation runs on in its daemon thread, as in vLLM, but no request waits for it)."""
        box: dict = {}

        def run():
            try:
                box["out"] = self._compile(so)
            except Exception as e:
                box["err"] = e

        worker = threading.Thread(target=run, name="vlm-steer-grammar-compile", daemon=True)
        worker.start()
        worker.join(COMPILE_TIMEOUT_S)
        if worker.is_alive():
            raise ValueError(f"compiling the {so.kind.replace('_', ' ')} constraint took over {COMPILE_TIMEOUT_S:g} s; "
                             "it may be too complex")
        if "err" in box:
            raise box["err"]
        return box["out"]

    def _compile(self, so: StructuredOutput):
        c = self.compiler
        try:
            if so.kind == "json":
                feature = unsupported_json_features(json.loads(so.spec))
                if feature:
                    raise ValueError(f"the JSON schema uses {feature}, which is not supported")
                return c.compile_json_schema(so.spec, any_whitespace=True)
            if so.kind == "json_object":
                return c.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=True)
            if so.kind == "regex":
                return c.compile_regex(so.spec)
            grammar = choice_as_grammar(json.loads(so.spec)) if so.kind == "choice" else so.spec
            return c.compile_lark(grammar) if so.kind == "grammar" and is_lark(grammar) else c.compile_grammar(grammar)
        except ValueError:
            raise
        except Exception as e:  # xgrammar's parse errors (RuntimeError and its own classes)
            first = re.sub(r"^\[[0-9:]+\] \S+:[0-9]+: ", "", str(e).strip().splitlines()[0])  # its log prefix
            raise ValueError(f"invalid {so.kind.replace('_', ' ')} constraint: {first[:300]}") from None

    def matcher(self, so: StructuredOutput, stop_ids=()) -> RowGrammar:
        """A fresh row state; ``stop_ids``: the request's own stop tokens beside the model's."""
        stops = sorted({*self.stop_ids, *map(int, stop_ids)})
        return RowGrammar(self.xgr.GrammarMatcher(self.compile(so), override_stop_tokens=stops or None))

    def check(self, so: StructuredOutput, max_tokens: int, stop_ids=(), min_tokens: int = 0) -> None:
        """Refuse (``Unsatisfiable``) a constraint that no sequence of at most ``max_tokens`` tokens of the
        vocabulary satisfies, or ``ValueError`` for an invalid one. Always caught: a grammar whose first
        token no token of the vocabulary can begin (the embedded ShapeWorld model's 64 tokens write no digit,
        and no ``{`` but that of its one JSON shape). Caught within ``SEARCH_BUDGET`` matcher states: a grammar that every token sequence leaves
        in a dead end, or that needs more than ``max_tokens`` tokens (a depth-first search over the allowed
        tokens that skips a loop back to a root parser state on its path and a state known to end nowhere,
        so a root string no token closes is refused whatever ``max_tokens``; a larger search space is let
        through, and a dead end met during generation fails the request: ``GrammarDeadEnd``). ``min_tokens``: the end (EOS, stop ids) is masked before that many
        tokens (vLLM's ``min_tokens``), so a format that must end sooner is refused too. Results are cached per
        constraint, ``max_tokens`` and ``min_tokens``."""
        key = (so, max_tokens, tuple(stop_ids), min_tokens)
        if key not in self._checked:
            if len(self._checked) > 4096:
                self._checked.clear()
            self._checked[key] = self._search(self.matcher(so, stop_ids).matcher, max_tokens,
                                              {*self.stop_ids, *stop_ids}, min_tokens)
        why = self._checked[key]
        if why:
            raise Unsatisfiable(why)

    def _search(self, m, max_tokens: int, stops: set[int], min_tokens: int = 0) -> str | None:
        """Why no completion exists (None: one exists, or the budget ran out before a proof)."""
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        visited = 0

        def allowed() -> list[int]:
            nonlocal visited
            visited += 1
            m.fill_next_token_bitmask(bitmask, 0)
            return allowed_tokens(bitmask[0], self.vocab_size).tolist()

        on_path: set[str] = set()  # states of the current path (past min_tokens): a loop back to one adds nothing
        dead: dict[str, int] = {}  # state -> the shallowest depth (past min_tokens) from which it cannot complete

        def completes(ids: list[int], depth: int) -> bool | None:
            """From a state whose allowed tokens are ``ids``, after ``depth`` tokens: True if a completion
            is reachable, False if none is within ``max_tokens``, None when the budget ran out."""
            if depth >= min_tokens and stops.intersection(ids):
                return True
            if depth == max_tokens:
                return False
            here = state_key() if depth >= min_tokens else None
            if here is not None:
                on_path.add(here)
            try:
                for t in ids:
                    if visited >= SEARCH_BUDGET:
                        return None
                    if t in stops or not m.accept_token(t):  # an end before min_tokens is masked
                        continue
                    key = state_key() if depth + 1 >= min_tokens else None
                    if key is not None and (key in on_path or dead.get(key, max_tokens + 1) <= depth + 1):
                        m.rollback(1)  # a loop, or a state already known to end nowhere from no deeper
                        continue
                    found = completes(allowed(), depth + 1)
                    m.rollback(1)
                    if found is not False:
                        return found
                    if key is not None:
                        dead[key] = min(dead.get(key, max_tokens + 1), depth + 1)
                return False
            finally:
                on_path.discard(here)

        def state_key() -> str | None:
            """The matcher's parser state when it depends on nothing before it (every Earley item of the last
            step at the root, ``rule_start_pos=-1``), read from xgrammar's debug print (no public API): two
            such states have the same futures. None otherwise, or if the print is not there."""
            try:
                last = m._debug_print_internal_state().split("Last step:", 1)[1]
            except Exception:
                return None
            starts = re.findall(r"rule_start_pos=(-?\d+)", last)
            return last if starts and all(p == "-1" for p in starts) else None

        first = allowed()
        if not first:
            return "no token of this model's vocabulary can begin an output that satisfies it"
        if completes(first, 0) is False:
            return f"no sequence of at most {max_tokens} tokens of this model's vocabulary satisfies it"
        return None


def apply_masks(logits: torch.Tensor, grammars: list, vocab_size: int) -> list[int]:
    """Mask (to -inf, in place) the tokens each row's grammar forbids at this step; ``grammars`` [B]
    holds a ``RowGrammar`` or None per row of ``logits`` [B, V]. Returns the rows whose grammar allows no
    token at all (dead ends)."""
    import xgrammar as xgr

    idx = [i for i, g in enumerate(grammars) if g is not None and not g.terminated]
    if not idx:
        return []
    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
    for i in idx:
        grammars[i].fill(bitmask, i)
    if logits.dtype == torch.float32 or not logits.is_cpu:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=idx)
    else:  # xgrammar's CPU kernel takes float32 (vLLM does the same, vllm issue 31901)
        f32 = logits.float()
        xgr.apply_token_bitmask_inplace(f32, bitmask, indices=idx)
        logits.copy_(f32)
    alive = torch.isfinite(logits[idx]).any(-1).tolist()
    return [i for i, a in zip(idx, alive) if not a]


def unmasked(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Rows [n] (bool) whose scores ``after`` a steering method give a score to a token that was at -inf
    ``before`` it (a grammar's mask), or hold a NaN; ``before``, ``after`` [n, V]."""
    return (torch.isneginf(before) & ~torch.isneginf(after)).any(-1) | torch.isnan(after).any(-1)
