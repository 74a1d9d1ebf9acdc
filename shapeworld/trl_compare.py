"""Measured reason for the hand-written DPO loop of ``shapeworld.train_reward``: it against TRL's DPOTrainer on the same
labelled pairs (scene seeds 91, held-out 92), the same start (the committed reward model, vision tower
frozen, the committed model as reference), the same loss and hyper-parameters (sigmoid loss, beta 0.1,
plus the chosen answers' NLL with weight 1.0, lr 5e-5 with 20 warm-up steps, batch 32): seconds per
step, and held-out preference accuracy (margin > 0 against the reference) after N steps.

TRL is not a dependency of the project; to run it (from the repository root):
    .venv/bin/pip install --target /tmp/trlpkgs --no-deps trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 \
        dill==0.4.1 multiprocess==0.70.19 pandas==3.1.1 psutil==7.2.2 pyarrow==26.0.1 xxhash==4.1.0
    PYTHONPATH=.:/tmp/trlpkgs .venv/bin/python shapeworld/trl_compare.py 60
"""
import copy, sys, time
import numpy as np, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from shapeworld.train_reward import RewardTrainConfig, dpo, make_pairs, sequence_logps
from shapeworld.train_vlm import Prompts
from shapeworld.world import make_scenes
from shapeworld.models import MODELS_DIR
from decoding.transformers_engine import TransformersEngine

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 40
cfg = RewardTrainConfig(pairs="labelled", dpo_steps=STEPS)
rng = np.random.default_rng(7)
scenes = make_scenes("random", 96, 91)
held = make_scenes("random", 48, 92)
engine = TransformersEngine(MODELS_DIR / "vlm")
pairs = make_pairs(engine, scenes, cfg, rng)
hpairs = make_pairs(engine, held, cfg, rng)
print(len(pairs), "pairs,", len(hpairs), "held-out")
load = lambda: AutoModelForImageTextToText.from_pretrained(MODELS_DIR / "reward")
ref = load().eval()
proc = AutoProcessor.from_pretrained(MODELS_DIR / "reward")

def feats_of(model, ss):
    px = proc.image_processor(images=[s.image() for s in ss], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.model.vision_tower(px, output_hidden_states=True)
        f = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    return f

def held_acc(model):
    f = feats_of(model, held)
    prompts = Prompts()
    with torch.no_grad():
        both = [(i, p, c) for i, p, c, _ in hpairs] + [(i, p, r) for i, p, _, r in hpairs]
        idx = [i for i, *_ in hpairs] * 2
        lp = sequence_logps(model, f[idx], prompts, both)
        rp = sequence_logps(ref, f[idx], prompts, both)
    n = len(hpairs)
    return float((((lp[:n] - rp[:n]) - (lp[n:] - rp[n:])) > 0).float().mean())

# ours
torch.manual_seed(0)
ours = load(); ours.model.vision_tower.requires_grad_(False); ours.train()
f = feats_of(ours, scenes)
t0 = time.perf_counter(); dpo(ours, f, pairs, cfg, np.random.default_rng(0)); t_ours = time.perf_counter() - t0
ours.eval()
print(f"ours: {t_ours / STEPS:.3f} s/step, held-out preference accuracy {held_acc(ours):.3f}", flush=True)

# TRL
import uuid
import datasets.fingerprint
# this machine's datasets/pyarrow/dill cannot pickle pyarrow's MonthDayNano when hashing: random fingerprints
datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: uuid.uuid4().hex)
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
def conv(p): return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
def ans(a): return [{"role": "assistant", "content": [{"type": "text", "text": a}]}]
ds = Dataset.from_list([{"images": [scenes[i].image()], "prompt": conv(p), "chosen": ans(c), "rejected": ans(r)} for i, p, c, r in pairs])
torch.manual_seed(0)
theirs = load(); theirs.model.vision_tower.requires_grad_(False)
args = DPOConfig(output_dir="/tmp/trl-out", beta=cfg.beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, cfg.rpo_alpha], learning_rate=cfg.dpo_lr,
                 per_device_train_batch_size=cfg.dpo_batch, max_steps=STEPS, warmup_steps=20, lr_scheduler_type="constant_with_warmup",
                 logging_steps=10, report_to=[], use_cpu=True, save_strategy="no", seed=0, dataloader_num_workers=0,
                 remove_unused_columns=False)
trainer = DPOTrainer(model=theirs, ref_model=copy.deepcopy(ref), args=args, train_dataset=ds, processing_class=proc)
t0 = time.perf_counter(); trainer.train(); t_trl = time.perf_counter() - t0
theirs.eval()
print(f"TRL: {t_trl / STEPS:.3f} s/step, held-out preference accuracy {held_acc(theirs):.3f}", flush=True)
print(f"TRL / ours time per step: {t_trl / t_ours:.2f}")
