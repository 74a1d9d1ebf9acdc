"""A load generator for a running server: C concurrent streaming clients, N requests, mixed steering
methods, optionally some clients hanging up mid-stream. Reports tokens/s, TTFT and latency
percentiles and error counts by status."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import signal
import socket
import subprocess
import sys
import time

from collections.abc import Callable

import aiohttp
import httpx
import numpy as np
from tqdm import tqdm

# Where a benchmark's requests come from: (n, seed) -> (n images, the caption prompt); a data set folder's
# ``DataSet.sample_images``, or the embedded world's scenes (the CLI chooses).
ImageSource = Callable[[int, int], tuple[list, str]]


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(model: str, image_url: str, prompt: str, max_tokens: int, method: str = "none") -> dict:
    """A streaming greedy caption request with usage."""
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "steering": {"method": method},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": prompt}]}]}


def _session(concurrency: int) -> aiohttp.ClientSession:
    """The load generator's HTTP client: aiohttp (a C HTTP parser), since it shares the machine with the
    server under test and should take as little of it as it can (as vLLM's serving benchmark does)."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                 connector=aiohttp.TCPConnector(limit=max(1, concurrency)))


async def _sse_data(r: aiohttp.ClientResponse):
    """The ``data:`` payloads of a server-sent event stream, as bytes."""
    buf = b""
    async for piece in r.content.iter_any():
        buf += piece
        *events, buf = buf.split(b"\n\n")
        for ev in events:
            for line in ev.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:]


async def _one(client: aiohttp.ClientSession, url: str, body: dict, disconnect_after: int | None, api_key: str | None) -> dict:
    t0 = time.perf_counter()
    out = {"status": None, "ttft": None, "latency": None, "tokens": 0, "disconnected": False, "stopped": False}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with client.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            out["status"] = r.status
            if r.status != 200:
                await r.read()
                return out
            chunks = 0
            async for data in _sse_data(r):
                if data == b"[DONE]":
                    continue
                msg = json.loads(data)
                if "error" in msg:
                    out["status"] = msg["error"].get("code", 500)
                    return out
                if msg.get("usage"):
                    out["tokens"] = msg["usage"]["completion_tokens"]
                for c in msg.get("choices", []):
                    if c.get("finish_reason") == "stop":
                        out["stopped"] = True
                    if c["delta"].get("content"):
                        chunks += 1
                        if out["ttft"] is None:
                            out["ttft"] = time.perf_counter() - t0
                if disconnect_after is not None and chunks >= disconnect_after:
                    out["disconnected"] = True
                    return out
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # a hang-up above closes the connection itself
        out["status"] = type(e).__name__
    out["latency"] = time.perf_counter() - t0
    return out


async def run_load(url: str, concurrency: int, requests: int, methods: list[str], source: ImageSource,
                   model: str = "shapeworld", max_tokens: int = 40, disconnect_fraction: float = 0.0, seed: int = 1234,
                   api_key: str | None = None) -> dict:
    """``requests`` streaming captions of 32 images of ``source`` (cycled), ``concurrency`` at a time."""
    rng = random.Random(seed)
    pictures, prompt = source(32, seed)
    images = [_data_url(im) for im in pictures]
    jobs = []
    for k in range(requests):
        body = _body(model, images[k % len(images)], prompt, max_tokens, methods[k % len(methods)])
        jobs.append((body, rng.randint(1, 3) if rng.random() < disconnect_fraction else None))
    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    results = []

    async def worker(client):
        while not queue.empty():
            body, cut = queue.get_nowait()
            results.append(await _one(client, url, body, cut, api_key))

    t0 = time.perf_counter()
    async with _session(concurrency) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    done = [r for r in results if r["status"] == 200 and not r["disconnected"]]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    lat = [r["latency"] for r in done if r["latency"] is not None]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    tokens = sum(r["tokens"] for r in done)
    return {
        "url": url, "concurrency": concurrency, "requests": requests, "methods": methods, "max_tokens": max_tokens,
        "wall_seconds": wall, "completed": len(done), "disconnected": sum(r["disconnected"] for r in results),
        "tokens": tokens, "tokens_per_second": tokens / wall,
        "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
        "latency_p50": pct(lat, 50), "latency_p90": pct(lat, 90), "latency_p99": pct(lat, 99),
        "statuses": statuses, "errors_5xx": sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500),
    }


def format_load(r: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"
    return (f"load: c={r['concurrency']} n={r['requests']} methods={','.join(r['methods'])}\n"
            f"  tokens/s {r['tokens_per_second']:.1f}  completed {r['completed']}  disconnected {r['disconnected']}\n"
            f"  TTFT p50/p90/p99 {f(r['ttft_p50'])}/{f(r['ttft_p90'])}/{f(r['ttft_p99'])} s  "
            f"latency p50/p90/p99 {f(r['latency_p50'])}/{f(r['latency_p90'])}/{f(r['latency_p99'])} s\n"
            f"  statuses {r['statuses']}  5xx {r['errors_5xx']}")


async def run_overhead(url: str, engine, requests: int, source: ImageSource, model: str = "shapeworld",
                       max_tokens: int = 40, seed: int = 1234, block: int = 8) -> dict:
    """What the server adds over its engine at concurrency 1: the same requests (greedy captions of the
    images of ``source``) through this process's own engine (``generate``, batch 1) and through HTTP streaming, in
    alternating blocks of ``block`` requests (and which side goes first alternates) so that both see
    the same machine, whose speed drifts, and each side runs warm, as a busy server does. The engine
    side decodes with one intra-op thread, its fastest setting at batch 1 (a second thread only waits at
    barriers and, spinning, slows what runs next), and prefills on every core, as the server's engine
    process does. Both sides are warmed up first. Tokens are decode
    steps on both sides (the end-of-sequence step included)."""
    import torch

    from decoding.request import GenerationRequest, SamplingParams

    images, prompt = source(requests, seed)
    urls = [_data_url(im) for im in images]
    seconds = {"engine": 0.0, "http": 0.0}
    tokens = {"engine": 0, "http": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine.prefill_threads = threads  # what the server's engine process does

    async with _session(1) as client:
        async def via_http(i: int) -> int:
            r = await _one(client, url, _body(model, urls[i], prompt, max_tokens), None, None)
            if r["status"] != 200:
                raise RuntimeError(f"request failed: {r['status']}")
            return r["tokens"] + r["stopped"]

        async def via_engine(i: int) -> int:
            c = engine.generate([GenerationRequest.single_turn(prompt, [images[i]],
                                                               sampling=SamplingParams(max_tokens=max_tokens))])[0]
            return len(c.token_ids) + (c.finish_reason == "stop")

        try:
            for i in range(min(4, requests)):  # warm-up
                await via_engine(i)
                await via_http(i)
            sides = {"engine": via_engine, "http": via_http}
            starts = range(0, requests, block)
            for k, start in enumerate(tqdm(starts, desc="overhead", leave=False)):
                for side in (("engine", "http") if k % 2 == 0 else ("http", "engine")):
                    t0 = time.perf_counter()
                    for i in range(start, min(start + block, requests)):
                        tokens[side] += await sides[side](i)
                    seconds[side] += time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
    tps = {k: tokens[k] / seconds[k] for k in seconds}
    return {"url": url, "requests": requests, "max_tokens": max_tokens, "tokens": tokens,
            "block": block, "seconds": seconds, "tokens_per_second": tps, "http_over_engine": tps["http"] / tps["engine"]}


def format_overhead(r: dict) -> str:
    t = r["tokens_per_second"]
    return (f"overhead at concurrency 1 (n={r['requests']}, alternating blocks of {r['block']}): engine {t['engine']:.1f} tok/s, "
            f"HTTP {t['http']:.1f} tok/s, HTTP / engine {r['http_over_engine']:.2f}")


def _serve(engine: str, port: int, model_name: str, max_batch: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--engine", engine, "--port", str(port),
                             "--served-model-name", model_name, "--max-batch", str(max_batch), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_engines(engines: list[str], concurrencies: list[int], requests: int, methods: list[str],
                      source: ImageSource, max_tokens: int = 40, rounds: int = 3, seed: int = 1234, max_batch: int = 16) -> dict:
    """Each engine behind its own `vlm-steer serve` on loopback (started here), loaded at each concurrency,
    round by round in turn, so that every engine and concurrency sees the same machine."""
    model = "shapeworld"
    urls, procs = {}, {}
    try:
        for e in engines:
            port = _free_port()
            procs[e], urls[e] = _serve(e, port, model, max_batch), f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=5) as client:
            for e, url in urls.items():
                print(f"waiting for the {e} server ({url}) ...", flush=True)
                for _ in range(1200):
                    if procs[e].poll() is not None:
                        raise RuntimeError(f"the {e} server exited with {procs[e].returncode}")
                    try:
                        if (await client.get(url + "/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.5)
                await run_load(url, max(concurrencies), max(concurrencies), methods, source, model, max_tokens,
                               seed=seed + 99)  # warm-up
        runs = {(e, c): [] for e in engines for c in concurrencies}
        for r in tqdm(range(rounds), desc="rounds"):
            for c in concurrencies:
                for e in engines:
                    runs[e, c].append(await run_load(urls[e], c, max(c, requests // rounds), methods, source, model, max_tokens,
                                                              seed=seed + r))
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    out = {"engines": engines, "concurrencies": concurrencies, "methods": methods, "max_tokens": max_tokens,
           "rounds": rounds, "results": []}
    for (e, c), reps in runs.items():
        wall, tokens = sum(x["wall_seconds"] for x in reps), sum(x["tokens"] for x in reps)
        statuses: dict[str, int] = {}
        for x in reps:
            for s, n in x["statuses"].items():
                statuses[s] = statuses.get(s, 0) + n
        out["results"].append({"engine": e, "concurrency": c, "requests": sum(x["requests"] for x in reps),
                               "tokens": tokens, "wall_seconds": wall, "tokens_per_second": tokens / wall,
                               "ttft_p50": float(np.median([x["ttft_p50"] for x in reps])),
                               "latency_p50": float(np.median([x["latency_p50"] for x in reps])), "statuses": statuses})
    return out


def format_engines(r: dict) -> str:
    lines = [f"engines at concurrency {r['concurrencies']} ({r['rounds']} interleaved rounds, methods {','.join(r['methods'])})",
             f"{'engine':12s} {'conc':>4s} {'tok/s':>8s} {'TTFT p50':>9s} {'lat p50':>8s}  statuses"]
    base = {x["engine"]: x["tokens_per_second"] for x in r["results"] if x["concurrency"] == min(r["concurrencies"])}
    for x in r["results"]:
        ratio = x["tokens_per_second"] / base[x["engine"]]
        lines.append(f"{x['engine']:12s} {x['concurrency']:>4d} {x['tokens_per_second']:8.1f} {x['ttft_p50']:9.3f} "
                     f"{x['latency_p50']:8.3f}  {x['statuses']}  ({ratio:.2f}x its c={min(r['concurrencies'])})")
    return "\n".join(lines)
