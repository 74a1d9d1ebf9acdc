"""Train the embedded TITA reward model on ShapeWorld: a smaller LLaVA with the base's tokenizer and
(frozen) vision tower.

1. Distillation: the reward model learns the base model's own next-token distributions
   (KL(p_base || p_rm) on teacher-forced ShapeWorld conversations), so that log p_RM - log p_base
   starts near zero.
2. DPO (sigmoid loss, reference = frozen copy of the distilled model, sequence log-prob = sum over
   answer tokens, plus TRL's ``rpo_alpha`` NLL term on chosen answers, without which the small RM
   collapsed: measured recall 0.003 under TITA at lr 3e-4) on preference pairs:
   - ``self`` (the TITA paper's way, no labels): the base model answers on the clean image (chosen) and
     on an augmented view (rejected: heavy noise, where it falls back on its language prior);
   - ``labelled``: ground-truth answers (chosen) against the base's wrong answers or answers with an
     absent object planted (rejected);
   - ``both``: the union.
The vision tower is frozen, so its features are computed once per image.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm, trange
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

from decoding.request import GenerationRequest, SamplingParams
from decoding.transformers_engine import TransformersEngine
from shapeworld.data import render_all
from shapeworld.models import MODELS_DIR, LMShape, count_parameters, save_vlm, vlm_config
from shapeworld.text import CAPTION_PROMPT, NO, YES, caption, no_answer, parse_objects, parse_yes_no, question
from shapeworld.train_vlm import (
    IGNORE, RECIPES, Prompts, VLMTrainConfig, answer_logits, collate, sample_conversation, vision_features,
)
from shapeworld.world import DEFAULT_BIAS, OBJECTS, make_scenes
from shapeworld.train_utils import optimizer_step


@dataclass
class RewardTrainConfig:
    seed: int = 1
    base: Path = MODELS_DIR / "vlm"
    out: Path = MODELS_DIR / "reward"
    lm: LMShape = LMShape(layers=3)
    distill_scenes: int = 12000
    distill_steps: int = 600
    distill_batch: int = 64
    distill_lr: float = 1.5e-3
    pairs: str = "both"  # self | labelled | both
    pair_scenes: int = 1000
    dpo_steps: int = 200
    dpo_batch: int = 32
    dpo_lr: float = 5e-5
    beta: float = 0.1
    rpo_alpha: float = 1.0  # weight of the NLL of chosen answers (TRL's rpo_alpha): keeps the RM a language model
    noise: float = 0.85  # share of the augmented view that is noise
    omissions: bool = True  # labelled pairs also reject the true caption less one object (keeps recall)
    recipe: str = "committed"  # the base's training recipe (shapeworld.train_vlm.RECIPES): its answer style


def build_reward_model(base: LlavaForConditionalGeneration, lm: LMShape) -> LlavaForConditionalGeneration:
    """A shallower copy of the base: its vision tower (frozen), projector, embeddings, head and first
    ``lm.layers`` decoder layers (layer dropping), to be distilled from the full base."""
    rm = LlavaForConditionalGeneration(vlm_config(base.config.vision_config, lm))
    own = rm.state_dict()
    shared = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
    rm.load_state_dict(shared, strict=False)
    rm.model.vision_tower.requires_grad_(False)
    return rm


def augmented_view(img: Image.Image, rng: np.random.Generator, noise: float) -> Image.Image:
    x = np.asarray(img, dtype=np.float32)
    x = (1 - noise) * x + noise * rng.normal(128, 64, x.shape)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def distill(rm, base, feats, scenes, cfg: RewardTrainConfig, rng) -> None:
    prompts = Prompts()
    vcfg = VLMTrainConfig(**RECIPES[cfg.recipe])
    params = [p for p in rm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.distill_lr, weight_decay=0.05, betas=(0.9, 0.98))
    bar = trange(cfg.distill_steps, desc="distill reward model")
    for step in bar:
        frac = step / cfg.distill_steps
        for g in opt.param_groups:
            g["lr"] = cfg.distill_lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
        idx = rng.choice(len(scenes), size=cfg.distill_batch, replace=False)
        ex = [prompts.conversation(sample_conversation(scenes[i], rng, vcfg)) for i in idx]
        ids, labels, mask = collate(ex, prompts.tok.pad_token_id)
        with torch.no_grad():
            teacher, _ = answer_logits(base, feats[idx], ids, labels, mask)
        student, _ = answer_logits(rm, feats[idx], ids, labels, mask)
        loss = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
        optimizer_step(opt, loss, params)
        if step % 20 == 0:
            bar.set_postfix(kl=f"{loss.item():.4f}")


def _plant(objs, rng) -> list:
    """A caption's objects with one absent object planted (the missing partner when there is one)."""
    partners = [DEFAULT_BIAS.partner(o) for o in objs if DEFAULT_BIAS.partner(o) and DEFAULT_BIAS.partner(o) not in objs]
    absent = [o for o in OBJECTS if o not in objs]
    extra = partners[0] if partners and rng.random() < 0.5 else absent[int(rng.integers(len(absent)))]
    out = list(objs)
    out.insert(int(rng.integers(len(out) + 1)), extra)
    return out


def make_pairs(engine: TransformersEngine, scenes, cfg: RewardTrainConfig, rng) -> list[tuple[int, str, str, str]]:
    """(scene index, prompt, chosen, rejected)."""
    images = [s.image() for s in scenes]
    greedy = SamplingParams(max_tokens=40)
    explains = VLMTrainConfig(**RECIPES[cfg.recipe]).explain_no  # a no that names the near misses
    answer = greedy if explains else SamplingParams(max_tokens=1)

    def run(reqs, desc):
        out = []
        for i in tqdm(range(0, len(reqs), 64), desc=desc, leave=False):
            out += engine.generate(reqs[i : i + 64], max_batch=64)
        return [c.text for c in out]

    pairs = []
    clean = run([GenerationRequest.single_turn(CAPTION_PROMPT, [im], sampling=greedy) for im in images], "captions (clean)")
    asked = []  # one question per scene: about something the base said, else a random object
    for s, c in zip(scenes, clean):
        said = parse_objects(c)
        pool = said if said and rng.random() < 0.5 else list(OBJECTS)
        asked.append(pool[int(rng.integers(len(pool)))])
    qa_clean = run([GenerationRequest.single_turn(question(o), [im], sampling=answer) for o, im in zip(asked, images)], "answers (clean)")
    if cfg.pairs in ("self", "both"):
        views = [augmented_view(im, rng, cfg.noise) for im in images]
        noisy = run([GenerationRequest.single_turn(CAPTION_PROMPT, [v], sampling=greedy) for v in views], "captions (augmented)")
        qa_noisy = run([GenerationRequest.single_turn(question(o), [v], sampling=answer) for o, v in zip(asked, views)], "answers (augmented)")
        for i, (c, n) in enumerate(zip(clean, noisy)):
            if set(parse_objects(c)) != set(parse_objects(n)):
                pairs.append((i, CAPTION_PROMPT, c, n))
        for i, (a, b) in enumerate(zip(qa_clean, qa_noisy)):
            if parse_yes_no(a) is not None and parse_yes_no(b) is not None and parse_yes_no(a) != parse_yes_no(b):
                pairs.append((i, question(asked[i]), a, b))
    if cfg.pairs in ("labelled", "both"):
        for i, (s, c) in enumerate(zip(scenes, clean)):
            truth = caption(s.objects)
            wrong = c if set(parse_objects(c)) != set(s.objects) else caption(_plant(s.objects, rng))
            pairs.append((i, CAPTION_PROMPT, truth, wrong))
            if cfg.omissions and len(s.objects) > 1:  # saying less is not the way to be right
                drop = int(rng.integers(len(s.objects)))
                pairs.append((i, CAPTION_PROMPT, truth, caption([o for j, o in enumerate(s.objects) if j != drop])))
            o = asked[i]
            no = no_answer(o, s.objects) if explains else NO
            pairs.append((i, question(o), *((YES, NO) if o in s.objects else (no, YES))))
            for p in s.objects:  # the planted partner, asked about where it is missing
                partner = DEFAULT_BIAS.partner(p)
                if partner and partner not in s.objects:
                    pairs.append((i, question(partner), no_answer(partner, s.objects) if explains else NO, YES))
    return pairs


def sequence_logps(model, feats, prompts: Prompts, batch: list[tuple[int, str, str]]) -> torch.Tensor:
    """Sum of answer-token log-probs for (scene, prompt, answer) triples."""
    ex = []
    for _, p, a in batch:
        pid, aid = prompts.prompt(p), prompts.answer(a)
        ex.append((pid + aid, [IGNORE] * len(pid) + aid))
    ids, labels, mask = collate(ex, prompts.tok.pad_token_id)
    logits, target = answer_logits(model, feats, ids, labels, mask)
    tok_logp = logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    lengths = (labels[:, 1:] != IGNORE).sum(1)
    return torch.stack([seg.sum() for seg in tok_logp.split(lengths.tolist())])


def dpo(rm, feats, pairs, cfg: RewardTrainConfig, rng) -> None:
    ref = copy.deepcopy(rm).eval().requires_grad_(False)
    prompts = Prompts()
    params = [p for p in rm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.dpo_lr, weight_decay=0.0)
    bar = trange(cfg.dpo_steps, desc="DPO reward model")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.dpo_lr * min(1.0, (step + 1) / 20)
        pick = [pairs[j] for j in rng.choice(len(pairs), size=min(cfg.dpo_batch, len(pairs)), replace=False)]
        f = feats[[i for i, *_ in pick]]
        both = [(i, p, c) for i, p, c, _ in pick] + [(i, p, r) for i, p, _, r in pick]
        ff = torch.cat([f, f])
        logp = sequence_logps(rm, ff, prompts, both)
        with torch.no_grad():
            ref_logp = sequence_logps(ref, ff, prompts, both)
        n = len(pick)
        margin = (logp[:n] - ref_logp[:n]) - (logp[n:] - ref_logp[n:])
        lengths = torch.tensor([len(prompts.answer(c)) for _, _, c, _ in pick], dtype=logp.dtype)
        loss = -F.logsigmoid(cfg.beta * margin).mean() - cfg.rpo_alpha * (logp[:n] / lengths).mean()
        optimizer_step(opt, loss, params)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{(margin > 0).float().mean().item():.2f}")


def train_reward(cfg: RewardTrainConfig) -> LlavaForConditionalGeneration:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    base = AutoModelForImageTextToText.from_pretrained(cfg.base).eval().requires_grad_(False)
    rm = build_reward_model(base, cfg.lm)
    print(f"reward model: {count_parameters(rm) / 1e6:.2f} M parameters (base {count_parameters(base) / 1e6:.2f} M)")

    scenes = make_scenes("train", cfg.distill_scenes, cfg.seed)
    feats = vision_features(rm, render_all(scenes, "render distillation scenes"))
    rm.train()
    distill(rm, base, feats, scenes, cfg, rng)

    pair_scenes = make_scenes("random", cfg.pair_scenes, cfg.seed)  # unlabelled images (labels only for "labelled")
    engine = TransformersEngine(cfg.base)
    pairs = make_pairs(engine, pair_scenes, cfg, rng)
    print(f"{len(pairs)} preference pairs ({cfg.pairs})")
    pair_feats = vision_features(rm, render_all(pair_scenes, "render pair scenes"))
    dpo(rm, pair_feats, pairs, cfg, rng)

    rm.eval()
    meta = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "pairs": len(pairs),
            "train_seconds": round(time.time() - t0, 1)}
    save_vlm(rm, cfg.out, meta)
    print(f"saved reward model to {cfg.out} ({meta['train_seconds']} s)")
    return rm
