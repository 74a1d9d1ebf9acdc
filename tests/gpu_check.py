"""The GPU check (`make gpu-check`): on a machine with a CUDA GPU, build real-shape random-weight pairs in
bfloat16 (a LLaVA-1.5-7B-shaped target with a TinyLlama-1.1B-shaped reward model; a Qwen2.5-VL-7B-shaped
target with a 3B-shaped one), then, per pair and engine: tokens/s of none, tita, fisao, tita+fisao in one
interleaved run at batch 8 (`--ignore-eos`), TITA's ratio against its FLOPs limit, and greedy `none`
equality with transformers' `generate`, a sampled batch of every method, and peak GPU memory. Prints one table
(and writes runs/gpu-check.json after every row). Refuses on CPU.

It installs nothing: it runs with the machine's own python and torch (`make gpu-check` uses `python3`, or
PYTHON=...); it needs transformers there and says which package is missing otherwise. The vllm rows say why
they did not run where vllm is absent; an error in one row is that row's error and the table still prints.

Random weights say nothing about quality: this measures speed and code paths at real shapes."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PAIRS = {"llava-1.5-7b": ("llava", "7b", "1b"), "qwen2.5-vl-7b": ("qwen2_5_vl", "qwen7b", "qwen3b")}
TINY = {"llava-1.5-7b": ("llava", "tiny", "tiny_rm"), "qwen2.5-vl-7b": ("qwen2_5_vl", "tiny", "tiny_rm")}
METHODS = ["none", "tita", "fisao", "tita+fisao"]


def equality(engine, reference: list | None = None, n: int = 4, max_tokens: int = 16) -> tuple[int, int, list]:
    """Greedy `none` of the engine's batch vs transformers' generate per request (the transformers engine)
    or vs the transformers engine's tokens (``reference``, the vllm engine): (equal, total, tokens)."""
    from decoding.prompts import render_prompt
    from decoding.request import GenerationRequest, SamplingParams
    from shapeworld.world import make_scenes

    reqs = [GenerationRequest.single_turn("describe the image .", [s.image()], sampling=SamplingParams(max_tokens=max_tokens))
            for s in make_scenes("random", n, 4321)]
    got = engine.generate(reqs)
    model = getattr(engine, "model", None)
    if model is None:  # vllm: compare with the transformers engine's greedy tokens of this run
        tokens = [c.token_ids for c in got]
        return (-1 if reference is None else sum(a == b for a, b in zip(tokens, reference))), n, tokens
    equal = 0
    for r, c in zip(reqs, got):
        out = engine.processor(images=r.images, text=render_prompt(engine.processor, r.messages), return_tensors="pt").to(model.device)
        out["pixel_values"] = out["pixel_values"].to(model.dtype)  # bfloat16 weights
        g = model.generate(**out, max_new_tokens=max_tokens, do_sample=False)[0, out["input_ids"].shape[1]:].tolist()
        g = g[: next((i for i, t in enumerate(g) if t in engine.eos_ids), len(g))]
        equal += g == c.token_ids
    return equal, n, [c.token_ids for c in got]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="runs/gpu-check.json")
    ap.add_argument("--tiny-on-cpu", action="store_true", help="the same script on tiny pairs on the CPU (a dry run "
                                                                "of its code paths; no figure means anything)")
    a = ap.parse_args(argv)
    if not _importable("torch"):
        sys.exit(f"gpu-check needs torch in this python ({sys.executable}); it installs nothing (PYTHON=... picks another)")
    import torch

    device, dtype = ("cpu", torch.float32) if a.tiny_on_cpu else ("cuda", torch.bfloat16)
    pairs = TINY if a.tiny_on_cpu else PAIRS
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here); on CPU run "
                 "`make bench-speed-mid` for the CPU-sized speed table")
    missing = [m for m in ("transformers", "tokenizers", "safetensors", "PIL", "numpy", "tqdm") if not _importable(m)]
    if missing:
        sys.exit(f"gpu-check needs {', '.join(missing)} in this python ({sys.executable}); it installs nothing")
    from tests.families import build_set

    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for name in a.pairs.split(","):
            family, size, rm = pairs[name]
            paths = build_set(family, Path(tmp) / name, size, rm, dtype=dtype, device=device)
            print(f"[{time.time() - t0:.0f}s] built {name}", flush=True)
            reference = None
            for kind in a.engines.split(","):
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                try:
                    r, tokens = check_row(name, kind, paths, device, dtype, a, reference)
                except Exception as e:  # one row's error is that row's; the others still run
                    r, tokens = {"pair": name, "engine": kind, "error": f"{type(e).__name__}: {e}"[:300]}, None
                if kind == "transformers":
                    reference = tokens
                rows.append(r)
                print(f"[{time.time() - t0:.0f}s] {json.dumps(r)}", flush=True)
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps(rows, indent=2))
                if device == "cuda":
                    torch.cuda.empty_cache()
    print(f"\n{'pair':<15} {'engine':<12} {'none tok/s':>10} {'tita x':>7} {'limit':>6} {'share':>6} {'fisao x':>8} "
          f"{'t+f x':>6} {'greedy equal':>13} {'sampled ok':>10} {'peak GiB':>8}")  # transformers: vs generate; vllm: vs transformers
    for r in rows:
        if "error" in r:
            print(f"{r['pair']:<15} {r['engine']:<12} {r['error']}")
            continue
        eq = "n/a" if r["equal"][0] < 0 else f"{r['equal'][0]}/{r['equal'][1]}"
        print(f"{r['pair']:<15} {r['engine']:<12} {r['none']:>10.1f} {r['tita_x']:>7.2f} {r['limit']:>6.2f} "
              f"{r['tita_x'] / r['limit']:>6.2f} {r['fisao_x']:>8.2f} {r['tita+fisao_x']:>6.2f} {eq:>13} "
              f"{r['sampled'][0]}/{r['sampled'][1]:<8} {r['peak_gib']:>8.1f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))
    return rows


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_row(name, kind, paths, device, dtype, a, reference) -> tuple[dict, list | None]:
    """One engine on one pair: the speed run, greedy equality, a sampled batch, peak memory."""
    import torch

    from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
    from bench.speed import run_speed, tita_limit
    from shapeworld.commands import images

    dt = str(dtype).removeprefix("torch.")
    if kind == "vllm":
        if not _importable("vllm"):
            return {"pair": name, "engine": "vllm", "error": "vllm is not installed in this python"}, None
        from decoding.vllm.engine import VLLMEngine

        engine = VLLMEngine(paths["model"], device=device, dtype=dt, reward_path=paths["reward"],
                            verifier_path=paths["verifier"], max_batch=8,
                            gpu_memory_utilization=0.45 if device == "cuda" else None)
    else:
        from decoding.transformers_engine import TransformersEngine

        engine = TransformersEngine(paths["model"], device=device, dtype=dt, reward_path=paths["reward"],
                                    verifier_path=paths["verifier"])
    try:
        rep = run_speed(engine, METHODS, *images(a.n, 1234), batch=8, max_tokens=a.max_tokens, ignore_eos=True)
        lim = tita_limit(paths["model"], engine)["limit"]
        eq_count, eq_n, tokens = equality(engine, reference)
        pics = images(2, 4321)[0]
        sampled = engine.generate([GenerationRequest.single_turn("describe the image .", [im], steering=SteeringSpec(m),
                                                                 sampling=SamplingParams(max_tokens=8, temperature=1.0, seed=i))
                                   for i, im in enumerate(pics) for m in METHODS])
        ok = sum(bool(c.token_ids) and c.finish_reason in ("stop", "length") for c in sampled)
    finally:
        if hasattr(engine, "close"):
            engine.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    r = {"pair": name, "engine": kind, "limit": lim, "equal": (eq_count, eq_n), "sampled": (ok, len(sampled)),
         "peak_gib": round(peak, 1), **{m: rep["methods"][m]["tokens_per_second"] for m in METHODS},
         **{f"{m}_x": rep["methods"][m]["ratio_to_none"] for m in METHODS}}
    return r, tokens


if __name__ == "__main__":
    main()
