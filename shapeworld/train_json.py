"""JSON answers for the embedded models: the raw tokens of ``shapeworld.text.JSON_TOKENS`` (``{"objects":[``, a
string opened on each colour, ``",`` and ``"]}``) taught to the committed VLM and its forked TITA reward model,
without changing anything else they say.

- Only the new tokens' rows train: the VLM's input-embedding and output-head rows, then the fork's head rows.
  Every other weight is frozen and checked unchanged, bit for bit, before saving; captions and yes/no answers
  keep their greedy tokens (the goldens of ``tests/`` check it), and free text keeps the new tokens' logits
  low (a cross-entropy term on the model's own captions and on yes/no answers).
- Each JSON position learns the model's own distribution at the matching caption position (self-distillation
  over the model's sampled captions, temperature 1): the choice of ``"red`` is the caption's choice of ``▁red``,
  ``",`` / ``"]}`` are the caption's ``▁and`` / ``▁.`` after a shape, the shape is the shape. A JSON answer thus
  lists what the model would caption, its hallucinations included, and the fork's log-ratio on a JSON token is
  its log-ratio on the caption word: TITA steers the JSON as it steers captions (docs/benchmarks.md,
  `vlm-steer bench quality --json-captions`). No ground-truth label reaches the JSON targets.

`vlm-steer train json --out DIR` rewrites ``DIR/vlm`` and ``DIR/reward`` in place (weights, tokenizer files,
the fork's trunk fingerprint, a ``json_tokens`` entry in each ``training.json``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import trange
from transformers import LlavaForConditionalGeneration

from decoding.fork import FORK_FILE, FORK_WEIGHTS, materialise, trunk_fingerprint
from reward_models.train_reward import portable
from shapeworld.data import render_all
from shapeworld.models import llava_processor
from shapeworld.text import CAPTION_PROMPT, JSON_CLOSE, JSON_NEXT, JSON_OPEN, JSON_TOKENS
from shapeworld.train_vlm import IGNORE, Prompts, VLMTrainConfig, answer_logits, collate, sample_question, vision_features
from shapeworld.world import COLOURS, SHAPES, make_scenes

WEIGHTS = "model.safetensors"


@dataclass
class JsonTokensConfig:
    """The recipe (seeds from the reserved training range: ``shapeworld.commands.RESERVED_SEEDS``)."""

    seed: int = 3
    scenes: int = 2000  # half random, half bait (the bait split is where the VLM hallucinates)
    max_tokens: int = 30  # caption samples longer than this are dropped
    steps: int = 800
    batch: int = 64
    lr: float = 3e-3
    free_weight: float = 1.0  # weight of the free-text loss (captions and yes/no answers)
    margin: float = 10.0  # free text: every JSON token's logit this far below the top token's (``leak_hinge``)


class Vocab:
    """The ids the JSON answers and their caption counterparts use."""

    def __init__(self, tok):
        ids = lambda toks: [tok.convert_tokens_to_ids(t) for t in toks]
        self.new = ids(JSON_TOKENS)
        self.open, self.next, self.close = ids([JSON_OPEN, JSON_NEXT, JSON_CLOSE])
        self.colours = ids([f"▁{c}" for c in COLOURS])
        self.json_colours = ids([f'"{c}' for c in COLOURS])
        self.shapes = ids([f"▁{s}" for s in SHAPES])
        self.a, self.and_, self.stop = ids(["▁a", "▁and", "▁."])
        self.eos = tok.eos_token_id
        if tok.unk_token_id in self.new:
            raise ValueError("the tokenizer has no JSON tokens (shapeworld.tokenizer.build_tokenizer)")


def as_json(cap: list[int], v: Vocab) -> tuple[list[int], list[tuple[str, int]]] | None:
    """The JSON answer of a sampled caption ``▁a C S (▁and ▁a C S)* ▁. </s>`` and, per JSON token, which
    caption position (index into ``cap``) its target distribution comes from and of what kind; None for a
    caption of any other form."""
    out, align, t = [v.open], [("open", 0)], 0
    while True:
        if t + 2 >= len(cap) or cap[t] != v.a or cap[t + 1] not in v.colours or cap[t + 2] not in v.shapes:
            return None
        out += [v.json_colours[v.colours.index(cap[t + 1])], cap[t + 2]]
        align += [("colour", t + 1), ("shape", t + 2)]
        t += 3
        if t < len(cap) and cap[t] == v.and_:
            out.append(v.next)
            align.append(("decision", t))
            t += 1
            continue
        if cap[t:] != [v.stop, v.eos]:
            return None
        out += [v.close, v.eos]
        align += [("decision", t), ("eos", t + 1)]
        return out, align


@torch.no_grad()
def sample_captions(model, feats: torch.Tensor, prompt: list[int], v: Vocab, max_tokens: int, seed: int,
                    batch: int = 256) -> list[list[int]]:
    """The model's own captions (temperature 1, full-vocabulary sampling), one per image (ids, </s> included
    when it ended). Full forwards per step, no cache: the model is tiny."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in trange(0, len(feats), batch, desc="sample captions", leave=False):
        f = feats[i : i + batch]
        ids = torch.tensor(prompt).repeat(len(f), 1)
        done = torch.zeros(len(f), dtype=torch.bool)
        for _ in range(max_tokens):
            logits = _logits_at(model, f, [(row, [IGNORE] * len(row) + [0]) for row in ids.tolist()], dummy=True)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
            nxt = torch.where(done, torch.full_like(nxt, v.eos), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == v.eos
            if done.all():
                break
        for row in ids[:, len(prompt):].tolist():
            out.append(row[: row.index(v.eos) + 1] if v.eos in row else row)
    return out


def teacher(probs: torch.Tensor, align: list[tuple[str, int]], v: Vocab, vocab: int) -> torch.Tensor:
    """[len(align), V] target distributions of one JSON answer from its caption's [len(cap), V] probabilities."""
    q = torch.zeros(len(align), vocab)
    for u, (kind, t) in enumerate(align):
        if kind == "open":  # not learnt (all zero): its context is the caption's, where free text must say "▁a"
            continue
        if kind == "eos":  # likewise forced: after "]} the grammar allows only the end
            continue
        if kind == "colour":  # learnt among the six openers only (``json_log_probs``)
            q[u, v.json_colours] = probs[t, v.colours]
        elif kind == "shape":
            q[u, v.shapes] = probs[t, v.shapes]
        else:
            q[u, v.next], q[u, v.close] = probs[t, v.and_], probs[t, v.stop]
    return q / q.sum(-1, keepdim=True).clamp_min(1e-30)


@torch.no_grad()
def teacher_targets(model, feats, prompt, caps, aligns, v: Vocab, batch: int = 256) -> list[torch.Tensor]:
    """Per JSON answer, the model's caption distributions mapped onto the JSON tokens (``teacher``)."""
    out = []
    for i in trange(0, len(caps), batch, desc="caption distributions", leave=False):
        ex = [(prompt + c, [IGNORE] * len(prompt) + c) for c in caps[i : i + batch]]
        logits = _logits_at(model, feats[i : i + batch], ex)
        probs = logits.float().softmax(-1).split([len(c) for c in caps[i : i + batch]])
        out += [teacher(p, a, v, logits.shape[-1]) for p, a in zip(probs, aligns[i : i + batch])]
    return out


def json_log_probs(logits: torch.Tensor, q: torch.Tensor, v: Vocab) -> torch.Tensor:
    """Log-probabilities [n, V] the JSON loss reads: over the whole vocabulary, except at colour positions
    (rows where ``q`` has mass on the colour openers), where they are over the tokens that open a string
    there (the six openers, and ``",`` / ``"]}``, which a grammar reads as a quote opening a string of
    punctuation; the teacher gives those two nothing). A grammar allows nothing else there, so only their
    order matters, and their level can stay far below the colour words', which is what keeps free text from
    writing them; where a string may go on or close (after a shape) the grammar allows every word, and
    ``",`` / ``"]}`` must beat "▁and" / "▁." outright."""
    logp = logits.log_softmax(-1)
    colour = (q[:, v.json_colours].sum(-1) > 0).nonzero()[:, 0]
    if len(colour):
        cols = torch.tensor(v.json_colours + [v.next, v.close])
        logp = logp.clone()
        logp[colour[:, None], cols[None, :]] = logits[colour[:, None], cols[None, :]].log_softmax(-1)
    return logp


def leak_hinge(logits: torch.Tensor, v: Vocab, margin: float) -> torch.Tensor:
    """Mean over free-text positions of max(0, best JSON token's logit - best other token's + ``margin``)."""
    old = torch.ones(logits.shape[-1], dtype=torch.bool)
    old[v.new] = False
    return F.relu(logits[:, v.new].max(-1).values - logits[:, old].max(-1).values + margin).mean()


def row_mask_hook(rows: list[int], vocab: int):
    keep = torch.zeros(vocab, 1)
    keep[rows] = 1
    return lambda grad: grad * keep


def train_rows(model, params: list[torch.Tensor], feats, prompt, jsons, targets, free_feats, free, v: Vocab,
               cfg: JsonTokensConfig, rng: np.random.Generator, desc: str) -> dict:
    """Adam (no weight decay: rows whose gradient is always zero never move) on the new rows of ``params``:
    soft cross-entropy of each JSON answer against its teacher, plus ``free_weight`` x the cross-entropy of
    free-text answers (``free``: (feature index, ids, labels))."""
    vocab = params[0].shape[0]
    hooks = [p.register_hook(row_mask_hook(v.new, vocab)) for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    bar = trange(cfg.steps, desc=desc)
    last = {}
    for _ in bar:
        idx = rng.choice(len(jsons), size=cfg.batch, replace=False)
        logits = _logits_at(model, feats[idx], [(prompt + jsons[i], [IGNORE] * len(prompt) + jsons[i]) for i in idx])
        q = torch.cat([targets[i] for i in idx])
        loss_json = -(q * json_log_probs(logits, q, v)).sum() / (q.sum() + 1e-9)  # per learnt position
        fidx = rng.choice(len(free), size=cfg.batch, replace=False)
        ex = [free[i][1:] for i in fidx]
        fl = _logits_at(model, free_feats[[free[i][0] for i in fidx]], ex)
        loss_free = (F.cross_entropy(fl, torch.tensor([t for _, lab in ex for t in lab if t != IGNORE]))
                     + leak_hinge(fl, v, cfg.margin))
        opt.zero_grad()
        (loss_json + cfg.free_weight * loss_free).backward()
        opt.step()
        last = {"json": round(float(loss_json.detach()), 4), "free": round(float(loss_free.detach()), 4)}
        bar.set_postfix(**last)
    for h in hooks:
        h.remove()
    for p in params:
        p.requires_grad_(False)
    return last


def _logits_at(model, feats, examples, dummy: bool = False) -> torch.Tensor:
    """Logits [n, V] predicting the labelled tokens of (ids, labels) examples (labels: the token at its own
    position, IGNORE elsewhere), in example then position order. ``dummy``: the labels hold one more position
    than the ids, whose logits (the next token's) are read."""
    if dummy:
        examples = [(ids + [0], lab) for ids, lab in examples]
    return answer_logits(model, feats, *collate(examples, 0))[0]


@torch.no_grad()
def json_fit(model, feats, prompt, jsons, targets, v: Vocab) -> dict:
    """Over held-out JSON answers' learnt positions (``json_log_probs``), per kind (the colour choice, the
    shape, whether the list goes on): the mean KL(teacher || model) and how often the model's top token is
    the teacher's."""
    logits = _logits_at(model, feats, [(prompt + j, [IGNORE] * len(prompt) + j) for j in jsons])
    q = torch.cat(targets)
    learnt = q.sum(-1) > 0
    q, logits = q[learnt], logits[learnt]
    logp = json_log_probs(logits, q, v)
    kl = (q * (q.clamp_min(1e-12).log() - logp)).sum(-1)
    agree = logp.argmax(-1) == q.argmax(-1)
    kinds = {"colour": q[:, v.json_colours].sum(-1) > 0, "shape": q[:, v.shapes].sum(-1) > 0,
             "goes_on": q[:, [v.next, v.close]].sum(-1) > 0}
    return {k: {"kl": round(float(kl[m].mean()), 4), "top_agrees": round(float(agree[m].float().mean()), 4)}
            for k, m in kinds.items()}


@torch.no_grad()
def free_text_leak(model, feats, free, v: Vocab, batch: int = 256) -> dict:
    """Over free-text answers (captions, yes/no): how often a JSON token is the top token, and the largest
    probability one gets (both should be ~0: free text never writes them)."""
    top, mass = 0, 0.0
    for i in range(0, len(free), batch):
        chunk = free[i : i + batch]
        probs = _logits_at(model, feats[[c[0] for c in chunk]], [c[1:] for c in chunk]).softmax(-1)
        top += int(torch.isin(probs.argmax(-1), torch.tensor(v.new)).sum())
        mass = max(mass, float(probs[:, v.new].max()))
    return {"json_token_on_top": top, "max_json_token_probability": round(mass, 6)}


def free_examples(scenes, caps, prompts: Prompts, rng) -> list[tuple[int, list[int], list[int]]]:
    """(image index, ids, labels) of the model's own captions and of one yes/no question per image."""
    out = []
    p = prompts.prompt(CAPTION_PROMPT)
    for i, (s, c) in enumerate(zip(scenes, caps)):
        out.append((i, p + c, [IGNORE] * len(p) + c))
        ids, labels = prompts.conversation([sample_question(s, rng, VLMTrainConfig())])
        out.append((i, ids, labels))
    return out


def _check_frozen(before: dict[str, torch.Tensor], model, new: list[int]) -> None:
    for name, t in model.state_dict().items():
        old = before[name]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            keep = torch.ones(t.shape[0], dtype=torch.bool)
            keep[new] = False
            t, old = t[keep], old[keep]
        if not torch.equal(t, old):
            raise RuntimeError(f"{name} changed outside the JSON tokens' rows")


def train_json_tokens(models: str | Path, cfg: JsonTokensConfig | None = None) -> dict:
    """Teach ``models/vlm`` and its fork ``models/reward`` the JSON tokens; rewrite both in place."""
    cfg = cfg or JsonTokensConfig()
    models = Path(models)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    prompts = Prompts()
    v = Vocab(prompts.tok)
    target = LlavaForConditionalGeneration.from_pretrained(models / "vlm").eval()
    reward = materialise(target, models / "reward")  # checks the fork against the trunk as committed
    before_t = {k: t.clone() for k, t in target.state_dict().items()}
    before_r = {k: t.clone() for k, t in reward.state_dict().items()}

    half = cfg.scenes // 2
    scenes = make_scenes("random", half, cfg.seed) + make_scenes("bait", cfg.scenes - half, cfg.seed)
    feats = vision_features(target, render_all(scenes, "render scenes"))
    prompt = prompts.prompt(CAPTION_PROMPT)
    caps = sample_captions(target, feats, prompt, v, cfg.max_tokens, cfg.seed)
    pairs = [(i, as_json(c, v)) for i, c in enumerate(caps)]
    keep = [i for i, p in pairs if p is not None]
    jsons = [pairs[i][1][0] for i in keep]
    aligns = [pairs[i][1][1] for i in keep]
    order = rng.permutation(len(keep))
    held = order[: max(1, len(keep) // 10)]  # held-out tenth: the fit reported in training.json
    train = order[len(held):]
    kfeats = feats[keep]
    free = free_examples(scenes, caps, prompts, rng)
    free_held = [free[i] for i in rng.choice(len(free), size=min(len(free), 512), replace=False)]
    report = {"config": asdict(cfg), "captions": len(caps), "json_answers": len(keep)}

    for name, model, params, fit_first in (
        ("vlm", target, [target.get_input_embeddings().weight, target.get_output_embeddings().weight], True),
        ("reward", reward, [reward.get_output_embeddings().weight], False),
    ):
        if name == "reward":  # the fork reads the VLM's trunk: its new embedding rows are the VLM's
            reward.get_input_embeddings().weight.data[v.new] = target.get_input_embeddings().weight.data[v.new]
        targets = teacher_targets(model, kfeats, prompt, [caps[i] for i in keep], aligns, v)
        sub = lambda idx: ([jsons[i] for i in idx], [targets[i] for i in idx])
        before = json_fit(model, kfeats[held], prompt, *sub(held), v)
        losses = train_rows(model, params, kfeats[train], prompt, *sub(train), feats, free, v, cfg, rng,
                            f"JSON rows [{name}]")
        report[name] = {"held_out_before": before, "held_out_after": json_fit(model, kfeats[held], prompt, *sub(held), v),
                        "final_loss": losses, "free_text": free_text_leak(model, feats, free_held, v)}
    _check_frozen(before_t, target, v.new)
    _check_frozen(before_r, reward, v.new)
    report["train_seconds"] = round(time.time() - t0, 1)
    save(models, target, reward, v, report)
    return report


def save(models: Path, target, reward, v: Vocab, report: dict) -> None:
    """The new rows into the committed files (everything else as it was), the tokenizer files, the fork's
    new trunk fingerprint, and ``report`` as ``json_tokens`` in each ``training.json``."""
    processor = llava_processor()
    weights = load_file(models / "vlm" / WEIGHTS)
    weights["language_model.model.embed_tokens.weight"] = target.get_input_embeddings().weight.detach().clone()
    weights["language_model.lm_head.weight"] = target.get_output_embeddings().weight.detach().clone()
    save_file(weights, models / "vlm" / WEIGHTS, metadata={"format": "pt"})
    fork = load_file(models / "reward" / FORK_WEIGHTS)
    fork["lm_head.weight"] = reward.get_output_embeddings().weight.detach().clone()
    save_file(fork, models / "reward" / FORK_WEIGHTS, metadata={"format": "pt"})
    info = json.loads((models / "reward" / FORK_FILE).read_text())
    info["trunk_sha256"] = trunk_fingerprint(target, info["layers"])
    (models / "reward" / FORK_FILE).write_text(json.dumps(info, indent=2))
    for d in ("vlm", "reward"):
        processor.save_pretrained(models / d)
        meta_path = models / d / "training.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        meta["json_tokens"] = {"command": f"vlm-steer train json --out {portable(models)}", **report}
        meta_path.write_text(json.dumps(meta, indent=2, default=str))
