"""Train the embedded VLM: a tiny LlavaForConditionalGeneration on ShapeWorld captioning and yes/no QA.

As in LLaVA, the vision tower (the verifier's) stays frozen; the projector and the Llama language
model are trained. Because the tower is frozen its patch features are computed once up front, and
each step runs only the projector and the language model. The training scenes carry the planted
co-occurrence bias (``shapeworld.world.BiasConfig``), which is what later makes the model
hallucinate on ``bait`` scenes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import trange
from transformers import CLIPModel, LlavaForConditionalGeneration

from shapeworld.data import patch_labels, render_all
from shapeworld.models import (
    MODELS_DIR, LMShape, count_parameters, llava_processor, pixels_to_tensor, save_vlm, vlm_config,
)
from shapeworld.text import CAPTION_PROMPT, NO, YES, caption, no_answer, question
from shapeworld.world import OBJECTS, Scene, make_scenes
from shapeworld.train_utils import optimizer_step

IGNORE = -100


@dataclass
class VLMTrainConfig:
    seed: int = 0
    scenes: int = 30000
    steps: int = 3000
    batch: int = 64
    lr: float = 1.5e-3
    warmup: int = 150
    weight_decay: float = 0.05
    caption_fraction: float = 0.5
    questions_per_conversation: int = 3
    hard_negative_fraction: float = 0.5
    # Share of the negative questions asked about a "cross" object when the scene allows one: the colour
    # of one present object with the shape of another (only bound colour and shape tell it absent).
    cross_negative_fraction: float = 0.5
    # A no names the present objects that share the asked colour or shape ("no , there is a red square
    # ."): the words after the answer train the same look-up that the answer needs.
    explain_no: bool = True
    verifier: Path = MODELS_DIR / "verifier"
    out: Path = MODELS_DIR / "vlm"
    lm: LMShape = LMShape()
    # Curriculum option (off: the committed model is trained mixed from the start): yes/no questions only
    # for the first steps. Measured, held-out hard-negative accuracy (the progress bar's qa_acc): mixed
    # from the start the questions stay on the 50/50 plateau (always "yes"); 600 question-only steps
    # reached 0.63, and the mixed steps after only 0.65 by step 1,300 (run stopped). Question-only steps
    # from the committed model plateau at 0.72 (yes to same-colour or same-shape objects: no binding).
    qa_first_steps: int = 0
    beta2: float = 0.98
    monitor_seed: int = 70  # held-out (unbiased) scenes whose yes/no accuracy the progress bar shows
    # Grounding loss: a linear probe (training only, not saved) must read each image slot's object
    # (colour x shape, or background) from the projector's output, which puts colour and shape bound
    # together into the image tokens.
    grounding_weight: float = 1.0
    # Projector-only steps on the grounding loss before the language model trains (0: none), so the
    # language model learns from image tokens that already carry each slot's object.
    grounding_warmup: int = 500


# Named training recipes (`vlm-steer train vlm --recipe NAME`); the defaults above are "committed", the
# recipe of the committed model: colour bound to shape in yes/no answers (grounding loss, cross
# negatives, no-answers that name the near misses), 3,000 steps. Measured on tuning seed 60, n=300
# (docs/benchmarks.md, "Base model recipes"): "plain" (the model committed before: no grounding, plain yes/no)
# answers every question "yes" (POPE F1 0.667); "bound-qa" (1,500 steps at lr 1e-3) answers well
# (F1 0.948) but captions worse (recall 0.837); "committed" keeps both (F1 0.915, recall 0.907).
RECIPES: dict[str, dict] = {
    "committed": {},
    "plain": dict(scenes=40000, steps=2000, caption_fraction=0.4, questions_per_conversation=4,
                  cross_negative_fraction=0.0, explain_no=False, grounding_weight=0.0, grounding_warmup=0),
    "bound-qa": dict(steps=1500, lr=1e-3),
}


def lr_at(step: int, cfg: VLMTrainConfig) -> float:
    """Linear warm-up, constant through the question-only steps, then cosine down to 5%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    start = max(cfg.warmup, cfg.qa_first_steps)
    if step < start:
        return cfg.lr
    t = (step - start) / max(1, cfg.steps - start)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * t)))


def build_vlm(verifier: CLIPModel, lm: LMShape) -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration(vlm_config(verifier.config.vision_config, lm))
    missing, unexpected = model.model.vision_tower.load_state_dict(
        verifier.vision_model.state_dict(), strict=False
    )
    if missing or unexpected:
        raise RuntimeError(f"vision tower mismatch: missing={missing} unexpected={unexpected}")
    model.model.vision_tower.requires_grad_(False)
    return model


@torch.no_grad()
def vision_features(model: LlavaForConditionalGeneration, pixels: np.ndarray, batch: int = 256) -> torch.Tensor:
    """The frozen tower's selected features (layer -2, CLS dropped), as the Llava forward takes them."""
    cfg = model.config
    out = []
    for i in trange(0, len(pixels), batch, desc="vision features", leave=False):
        hs = model.model.vision_tower(pixels_to_tensor(pixels[i : i + batch]), output_hidden_states=True)
        feats = hs.hidden_states[cfg.vision_feature_layer]
        out.append(feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats)
    return torch.cat(out)


class Prompts:
    """Prompt token ids made by the real processor (so training sees exactly what inference sees)."""

    def __init__(self):
        self.processor = llava_processor()
        self.tok = self.processor.tokenizer
        blank = Image.new("RGB", (64, 64))
        self._cache: dict = {}
        self._blank = blank
        self.eos = self.tok.eos_token_id

    def prompt(self, text: str) -> list[int]:
        if text not in self._cache:
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            s = self.processor.apply_chat_template(chat, add_generation_prompt=True)
            self._cache[text] = self.processor(images=self._blank, text=s).input_ids[0]
        return self._cache[text]

    def answer(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids + [self.eos]

    def next_turn(self, text: str) -> list[int]:
        """A later user turn of the same conversation (no image, no BOS)."""
        key = ("turn", text)
        if key not in self._cache:
            self._cache[key] = self.tok(f"USER: {text} ASSISTANT:", add_special_tokens=False).input_ids
        return self._cache[key]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels (answers only) of a conversation about one image."""
        ids, labels = [], []
        for k, (q, a) in enumerate(turns):
            p = self.prompt(q) if k == 0 else self.next_turn(q)
            ans = self.answer(a)
            ids += p + ans
            labels += [IGNORE] * len(p) + ans
        return ids, labels


def sample_conversation(scene: Scene, rng: np.random.Generator, cfg: VLMTrainConfig) -> list[tuple[str, str]]:
    """A caption request, or a few yes/no questions (multi-turn, as in LLaVA's instruction data)."""
    if rng.random() < cfg.caption_fraction:
        return [(CAPTION_PROMPT, caption(scene.objects))]
    return [sample_question(scene, rng, cfg) for _ in range(cfg.questions_per_conversation)]


def sample_question(scene: Scene, rng: np.random.Generator, cfg: VLMTrainConfig) -> tuple[str, str]:
    """A yes/no question about a present object or an absent one (often a confusable one)."""
    objs = scene.objects
    if rng.random() < 0.5:
        return question(objs[int(rng.integers(len(objs)))]), YES
    cross = ([(p[0], q[1]) for p in objs for q in objs if p != q and (p[0], q[1]) not in objs]
             if cfg.cross_negative_fraction else [])  # off: neither the list nor a random draw
    if cross and rng.random() < cfg.cross_negative_fraction:
        obj = cross[int(rng.integers(len(cross)))]
    else:
        absent = [o for o in OBJECTS if o not in objs]
        if rng.random() < cfg.hard_negative_fraction:  # same colour or same shape as something present
            hard = [o for o in absent if any(o[0] == p[0] or o[1] == p[1] for p in objs)]
            absent = hard or absent
        obj = absent[int(rng.integers(len(absent)))]
    return question(obj), no_answer(obj, objs) if cfg.explain_no else NO


def collate(examples: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, labels and attention mask from (ids, labels) pairs."""
    n = max(len(s) for s, _ in examples)
    ids = torch.full((len(examples), n), pad, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (s, lab) in enumerate(examples):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return ids, labels, mask


def answer_logits(model: LlavaForConditionalGeneration, feats: torch.Tensor, ids, labels, mask):
    """The Llava forward with precomputed vision features (projector, scatter into the image slots, LM),
    returning the logits that predict each answer token and those tokens: ([n_answer, V], [n_answer])."""
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    image_embeds = inner.multi_modal_projector(feats)
    slots = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    return model.lm_head(hidden[:, :-1][keep]), target[keep]


def lm_loss(model: LlavaForConditionalGeneration, feats: torch.Tensor, ids, labels, mask) -> torch.Tensor:
    logits, target = answer_logits(model, feats, ids, labels, mask)
    return F.cross_entropy(logits, target)


def grounding_loss(model: LlavaForConditionalGeneration, probe: torch.nn.Linear, feats: torch.Tensor,
                   slot_objects: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the object under each image slot (0 = background), read linearly from the projector."""
    slots = model.model.multi_modal_projector(feats)
    return F.cross_entropy(probe(slots).flatten(0, 1), slot_objects.flatten())


class QAMonitor:
    """Teacher-forced yes/no accuracy on held-out unbiased scenes (a hard negative for every absent object),
    shown in the progress bar so a run stuck on the 50/50 plateau is visible while it trains."""

    def __init__(self, model, prompts: "Prompts", seed: int, n: int = 200):
        scenes = make_scenes("random", n, seed)
        self.feats = vision_features(model, render_all(scenes, "render monitor scenes"))
        rng = np.random.default_rng(seed)
        hard = VLMTrainConfig(hard_negative_fraction=1.0, cross_negative_fraction=0.0, explain_no=False)
        qa = [sample_question(s, rng, hard) for s in scenes]
        self.batch = collate([prompts.conversation([t]) for t in qa], prompts.tok.pad_token_id)
        self.truth = torch.tensor([a == YES for _, a in qa])
        self.yes, self.no = prompts.answer(YES)[0], prompts.answer(NO)[0]

    @torch.no_grad()
    def accuracy(self, model) -> float:
        was = model.training
        model.eval()
        logits, _ = answer_logits(model, self.feats, *self.batch)
        first = logits.view(len(self.truth), -1, logits.shape[-1])[:, 0]  # answer token, then </s>
        model.train(was)
        return float(((first[:, self.yes] > first[:, self.no]) == self.truth).float().mean())


def warm_up_projector(model, probe, feats, slot_objects, cfg: VLMTrainConfig, rng: np.random.Generator) -> None:
    """The grounding loss alone on the projector (and its probe) for ``cfg.grounding_warmup`` steps."""
    if not cfg.grounding_warmup:
        return
    params = list(model.model.multi_modal_projector.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.beta2))
    bar = trange(cfg.grounding_warmup, desc="projector warm-up")
    for _ in bar:
        idx = rng.choice(len(feats), size=cfg.batch, replace=False)
        loss = grounding_loss(model, probe, feats[idx], slot_objects[idx])
        optimizer_step(opt, loss, params)
        bar.set_postfix(grounding=f"{float(loss.detach()):.3f}")


def train_steps(model, scenes, cfg: VLMTrainConfig, rng: np.random.Generator) -> dict:
    feats = vision_features(model, render_all(scenes, "render training scenes"))
    probe = slot_objects = None
    if cfg.grounding_weight:  # labels and probe only when the loss is on (the default run skips both)
        slot_objects = torch.from_numpy(patch_labels(scenes, model.config.vision_config.patch_size))
        probe = torch.nn.Linear(model.config.text_config.hidden_size, len(OBJECTS) + 1)
        warm_up_projector(model, probe, feats, slot_objects, cfg, rng)
    prompts = Prompts()
    monitor = QAMonitor(model, prompts, cfg.monitor_seed)
    trainable = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if probe else [])
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.beta2))
    qa_only = VLMTrainConfig(**{**cfg.__dict__, "caption_fraction": 0.0})
    model.train()
    bar = trange(cfg.steps, desc="train vlm")
    loss, history = torch.tensor(0.0), []
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        mix = qa_only if step < cfg.qa_first_steps else cfg
        idx = rng.choice(len(scenes), size=cfg.batch, replace=False)
        examples = [prompts.conversation(sample_conversation(scenes[i], rng, mix)) for i in idx]
        ids, labels, mask = collate(examples, prompts.tok.pad_token_id)
        loss = lm_loss(model, feats[idx], ids, labels, mask)
        if cfg.grounding_weight:
            loss = loss + cfg.grounding_weight * grounding_loss(model, probe, feats[idx], slot_objects[idx])
        optimizer_step(opt, loss, trainable)
        if step % 100 == 0 or step == cfg.steps - 1:
            history.append((step, round(float(loss.detach()), 4), round(monitor.accuracy(model), 3)))
            bar.set_postfix(loss=f"{history[-1][1]:.4f}", qa_acc=f"{history[-1][2]:.3f}")
    model.eval()
    return {"final_loss": history[-1][1], "monitor": history}


def train_vlm(cfg: VLMTrainConfig) -> LlavaForConditionalGeneration:
    """Projector and language model trained from scratch on questions, then captions and questions
    (vision tower frozen)."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    verifier = CLIPModel.from_pretrained(cfg.verifier)
    model = build_vlm(verifier, cfg.lm)
    print(f"vlm: {count_parameters(model) / 1e6:.2f} M parameters")
    scenes = make_scenes("train", cfg.scenes, cfg.seed)
    meta = {"config": {k: str(v) for k, v in asdict(cfg).items()}}
    meta.update(train_steps(model, scenes, cfg, np.random.default_rng(cfg.seed)))
    meta["train_seconds"] = round(time.time() - t0, 1)
    save_vlm(model, cfg.out, meta)
    print(f"saved vlm to {cfg.out} ({meta['train_seconds']} s)")
    return model
